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
