package pebble

import (
	"strings"
	"sync"
	"testing"
	"time"

	pebbledb "github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/cockroachdb/pebble/v2/vfs/errorfs"

	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox"
)

// walGate holds WAL syncs while closed, so a test can look at the store
// between an append's publication and its durability.
type walGate struct {
	mu     sync.Mutex
	held   bool
	opened chan struct{}
}

func (g *walGate) String() string { return "wal-gate" }

func (g *walGate) MaybeError(op errorfs.Op) error {
	if !strings.HasSuffix(op.Path, ".log") {
		return nil
	}
	switch op.Kind {
	case errorfs.OpFileSync, errorfs.OpFileSyncData, errorfs.OpFileSyncTo:
	default:
		return nil
	}
	g.mu.Lock()
	held, opened := g.held, g.opened
	g.mu.Unlock()
	if held {
		<-opened
	}
	return nil
}

func (g *walGate) hold() {
	g.mu.Lock()
	g.held, g.opened = true, make(chan struct{})
	g.mu.Unlock()
}

func (g *walGate) release() {
	g.mu.Lock()
	g.held = false
	close(g.opened)
	g.mu.Unlock()
}

// An entry whose append is not yet durable is never read: a device shown
// it could lose it in a crash, and then see the sender's retry (stored
// under a new server id) as a second message.
func TestReadSkipsEntriesNotYetDurable(t *testing.T) {
	gate := &walGate{}
	s := mustOpen(t, "db", Options{FS: errorfs.Wrap(vfs.NewMem(), gate), MinFreeBytes: -1})
	defer s.Close()
	d := ident.Device{User: "alice", ID: 1}
	if _, err := s.Append(ctx, mailbox.Batch{Items: []mailbox.Item{item(d, "durable")}}); err != nil {
		t.Fatal(err)
	}

	gate.hold()
	done := make(chan error, 1)
	go func() {
		_, err := s.Append(ctx, mailbox.Batch{Items: []mailbox.Item{item(d, "in flight")}})
		done <- err
	}()
	// Wait until Pebble has made the second entry visible (its sync is
	// held by the gate).
	id, err := deviceID(d)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for rawEntries(t, s, id) < 2 {
		if time.Now().After(deadline) {
			gate.release()
			t.Fatal("the second append never became visible in Pebble")
		}
		time.Sleep(time.Millisecond)
	}
	select {
	case err := <-done:
		gate.release()
		t.Fatalf("Append returned (%v) while its WAL sync was held", err)
	default:
	}
	got, err := s.Read(ctx, d, 0, 10)
	if err != nil {
		gate.release()
		t.Fatal(err)
	}
	if len(got) != 1 || string(got[0].Data) != "durable" {
		gate.release()
		t.Fatalf("while the append was not durable, Read gave %d entries, want only the durable one", len(got))
	}
	if got, _ := s.Read(ctx, d, got[0].Seq, 10); len(got) != 0 {
		gate.release()
		t.Fatalf("Read after the durable entry gave %d entries, want 0", len(got))
	}

	gate.release()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, s, d); len(got) != 2 {
		t.Fatalf("once durable: %d entries, want 2", len(got))
	}
	if n := fenceCount(s); n != 0 {
		t.Fatalf("%d devices still fenced after every append completed", n)
	}
}

// rawEntries counts the entries of a device that Pebble would show any
// reader, fenced or not.
func rawEntries(t *testing.T, s *Store, id []byte) int {
	t.Helper()
	it, err := s.db.NewIter(&pebbledb.IterOptions{LowerBound: entryKey(id, 0), UpperBound: entryPrefixEnd(id)})
	if err != nil {
		t.Fatal(err)
	}
	defer it.Close()
	n := 0
	for ok := it.First(); ok; ok = it.Next() {
		n++
	}
	return n
}

func fenceCount(s *Store) int {
	n := 0
	for i := range s.fences.shards {
		sh := &s.fences.shards[i]
		sh.mu.Lock()
		n += len(sh.m)
		sh.mu.Unlock()
	}
	return n
}

// The fence table keeps a device's fences whatever order they are lifted
// in, answers the lowest, forgets a device with none, and fences a lone
// append without allocating.
func TestFenceTable(t *testing.T) {
	ft := newFenceTable()
	const d = "dev"
	if got := ft.limit(d); got != 0 {
		t.Fatalf("limit of an unknown device = %d", got)
	}
	for _, f := range []uint64{10, 12, 15, 20} {
		ft.add(d, f)
	}
	steps := []struct {
		remove uint64
		want   uint64
	}{
		{15, 10}, // from the middle
		{10, 12}, // the oldest: the next takes its place
		{99, 12}, // not fenced: nothing changes
		{20, 12}, // the newest
		{12, 0},  // the last
	}
	for _, s := range steps {
		ft.remove(d, s.remove)
		if got := ft.limit(d); got != s.want {
			t.Fatalf("after lifting %d, limit = %d, want %d", s.remove, got, s.want)
		}
	}
	if n := len(ft.shard(d).m); n != 0 {
		t.Fatalf("the table holds %d devices with no fence", n)
	}
	ft.add(d, 1) // the map's slot for the device
	ft.remove(d, 1)
	if n := testing.AllocsPerRun(100, func() {
		ft.add(d, 7)
		ft.remove(d, 7)
	}); n != 0 {
		t.Errorf("fencing a lone append allocated %v times, want 0", n)
	}
}
