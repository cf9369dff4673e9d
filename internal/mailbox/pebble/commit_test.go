package pebble

import (
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox"
)

// Batches started one after another, without waiting for each to be
// durable, get their seqs in the order they were started, for every
// device, and all become durable; a duplicate of a batch still in flight
// waits for it and reports it.
func TestStartAppendOrder(t *testing.T) {
	s := mustOpen(t, "db", Options{FS: vfs.NewMem()})
	defer s.Close()
	a, b := ident.Device{User: "alice", ID: 1}, ident.Device{User: "bob", ID: 1}
	// Other writers to the same devices, so that groups mix batches.
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for w := range 4 {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				if _, err := s.Append(ctx, mailbox.Batch{Items: []mailbox.Item{item(a, fmt.Sprint("other", w, "-", i)), item(b, "other")}}); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	const n = 200
	var pending []mailbox.Pending
	for i := range n {
		batch := mailbox.Batch{Items: []mailbox.Item{item(a, fmt.Sprint("mine", i)), item(b, fmt.Sprint("mine", i))}}
		if i%3 == 0 {
			batch.Key = fmt.Sprint("key-", i)
			batch.Receipt = []byte(fmt.Sprint("receipt-", i))
		}
		p, err := s.StartAppend(ctx, batch)
		if err != nil {
			t.Fatal(err)
		}
		pending = append(pending, p)
	}
	// A duplicate of the last keyed batch, which may still be in flight.
	dup, err := s.StartAppend(ctx, mailbox.Batch{Key: "key-198", Items: []mailbox.Item{item(a, "dup")}})
	if err != nil {
		t.Fatal(err)
	}
	var last [2]uint64
	for i, p := range pending {
		res, err := p.Wait(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if res.Duplicate || len(res.Seqs) != 2 {
			t.Fatalf("batch %d: %+v", i, res)
		}
		for j, seq := range res.Seqs {
			if seq <= last[j] {
				t.Fatalf("batch %d got seq %d on device %d after %d: not in start order", i, seq, j, last[j])
			}
			last[j] = seq
		}
		if again, err := p.Wait(ctx); err != nil || !slices.Equal(again.Seqs, res.Seqs) {
			t.Fatalf("second Wait: %+v, %v", again, err)
		}
	}
	if res, err := dup.Wait(ctx); err != nil || !res.Duplicate || string(res.Receipt) != "receipt-198" {
		t.Fatalf("duplicate of an in-flight batch: %+v, %v", res, err)
	}
	close(stop)
	wg.Wait()
	// Read order is seq order, so "mine" entries read back in start order.
	for _, d := range []ident.Device{a, b} {
		es, err := s.Read(ctx, d, 0, 1<<20)
		if err != nil {
			t.Fatal(err)
		}
		next := 0
		for _, e := range es {
			if string(e.Data) == fmt.Sprint("mine", next) {
				next++
			}
		}
		if next != n {
			t.Fatalf("%v: found %d of the %d started batches in order", d, next, n)
		}
	}
}

// Close waits for batches that were started and not yet waited for: they
// are durable after Close, and Wait still reports them.
func TestCloseDrainsStartedAppends(t *testing.T) {
	mem := vfs.NewCrashableMem()
	s := mustOpen(t, "db", Options{FS: mem})
	d := ident.Device{User: "alice", ID: 1}
	var pending []mailbox.Pending
	for i := range 50 {
		p, err := s.StartAppend(ctx, mailbox.Batch{Items: []mailbox.Item{item(d, fmt.Sprint(i))}})
		if err != nil {
			t.Fatal(err)
		}
		pending = append(pending, p)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	for _, p := range pending {
		if _, err := p.Wait(ctx); err != nil {
			t.Fatalf("Wait after Close: %v", err)
		}
	}
	if _, err := s.StartAppend(ctx, mailbox.Batch{Items: []mailbox.Item{item(d, "late")}}); !errors.Is(err, mailbox.ErrClosed) {
		t.Fatalf("StartAppend after Close: %v", err)
	}
	s = mustOpen(t, "db", Options{FS: mem.CrashClone(vfs.CrashCloneCfg{})})
	defer s.Close()
	if got := readAll(t, s, d); len(got) != 50 {
		t.Fatalf("after a crash following Close: %d entries, want 50", len(got))
	}
}

// MinSyncInterval: after a sync that covered several writes, a synced write
// that comes within the interval of the last sync waits for the next one,
// and writes that come meanwhile share it; a lone writer is not held back.
// (The delay asserted is the configured one, which a slow machine can only
// lengthen; the lone writer's bound is many times what it needs.)
func TestMinSyncInterval(t *testing.T) {
	const interval = 2 * time.Second
	s := mustOpen(t, "db", Options{FS: vfs.NewMem(), MinSyncInterval: interval})
	defer s.Close()
	a := ident.Device{User: "alice", ID: 1}
	appendOne := func(data string) {
		t.Helper()
		if _, err := s.Append(ctx, mailbox.Batch{Items: []mailbox.Item{item(a, data)}}); err != nil {
			t.Fatal(err)
		}
	}

	// A lone writer: every sync covers one write, so none waits. Its
	// writes never count as concurrent, however late Pebble asks after
	// each sync (it asks once the sync's waiters are released, when the
	// next write may already be committed).
	start := time.Now()
	for i := range 3 {
		appendOne(fmt.Sprint("alone", i))
		if s.concurrentSyncs.Load() {
			t.Fatalf("append %d of a lone writer counted as concurrent", i)
		}
	}
	if took := time.Since(start); took >= interval {
		t.Errorf("3 appends by a lone writer took %v; the interval (%v) applied", took, interval)
	}

	// Concurrent writers: hold the committer so that two appends (to
	// devices of their own: an append holds its devices' locks until it is
	// published) queue behind it and are committed as one group.
	started, release := make(chan struct{}), make(chan struct{})
	held := make(chan error, 1)
	go func() { held <- s.runCommit(func() error { close(started); <-release; return nil }) }()
	<-started
	appended := make(chan error, 2)
	for i := range 2 {
		go func() {
			_, err := s.Append(ctx, mailbox.Batch{Items: []mailbox.Item{item(ident.Device{User: "bob", ID: uint32(i + 1)}, "together")}})
			appended <- err
		}()
	}
	for queued := 0; queued < 2; time.Sleep(time.Millisecond) {
		s.queue.mu.Lock()
		queued = len(s.queue.reqs)
		s.queue.mu.Unlock()
	}
	close(release)
	for _, ch := range []chan error{held, appended, appended} {
		if err := <-ch; err != nil {
			t.Fatal(err)
		}
	}
	// Within the interval of that group's sync: the next sync waits.
	start = time.Now()
	var pending []mailbox.Pending
	for i := range 3 {
		p, err := s.StartAppend(ctx, mailbox.Batch{Items: []mailbox.Item{item(ident.Device{User: "carol", ID: uint32(i + 1)}, "next")}})
		if err != nil {
			t.Fatal(err)
		}
		pending = append(pending, p)
	}
	for _, p := range pending {
		if _, err := p.Wait(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if waited := time.Since(start); waited < interval/2 {
		t.Errorf("appends right after a group's sync were durable after %v; the interval is %v", waited, interval)
	}
	got, err := s.Read(ctx, a, 0, 10)
	if err != nil || len(got) != 3 {
		t.Fatalf("read %d entries, %v", len(got), err)
	}
}

// StartAppend and StartDeleteAppend return once their batch is queued,
// without waiting for the committer to publish it; Wait then waits for it.
// A delete's device lock stays held until its batch is published, so a
// second delete of the same entry, started meanwhile, waits, and then
// finds nothing to remove (the entry's receipt is appended once); the
// depth counts the entry out once.
func TestStartReturnsBeforePublication(t *testing.T) {
	s := mustOpen(t, "db", Options{FS: vfs.NewMem()})
	defer s.Close()
	// The receipt goes to carol: an append to bob holds bob's lock until
	// it is published.
	a, b, c := ident.Device{User: "alice", ID: 1}, ident.Device{User: "bob", ID: 1}, ident.Device{User: "carol", ID: 1}
	res, err := s.Append(ctx, mailbox.Batch{Items: []mailbox.Item{item(a, "m")}})
	if err != nil {
		t.Fatal(err)
	}
	seq := res.Seqs[0]

	// Hold the committer.
	started, release := make(chan struct{}), make(chan struct{})
	held := make(chan error, 1)
	go func() { held <- s.runCommit(func() error { close(started); <-release; return nil }) }()
	<-started

	p, err := s.StartAppend(ctx, mailbox.Batch{Items: []mailbox.Item{item(b, "queued")}})
	if err != nil {
		t.Fatalf("StartAppend behind a held committer: %v", err)
	}
	receipt := func([]mailbox.Entry) ([]mailbox.Item, error) {
		return []mailbox.Item{item(c, "receipt")}, nil
	}
	removed, pd, err := s.StartDeleteAppend(ctx, mailbox.DeleteAppend{Device: a, Seqs: []uint64{seq}, Then: receipt})
	if err != nil || len(removed) != 1 {
		t.Fatalf("StartDeleteAppend behind a held committer: %v, %v", removed, err)
	}
	type second struct {
		removed []mailbox.Entry
		p       mailbox.Pending
		err     error
	}
	again := make(chan second, 1)
	go func() {
		removed, p, err := s.StartDeleteAppend(ctx, mailbox.DeleteAppend{Device: a, Seqs: []uint64{seq}, Then: receipt})
		again <- second{removed, p, err}
	}()
	select {
	case r := <-again:
		t.Fatalf("a second delete of the entry returned %v, %v before the first was published", r.removed, r.err)
	case <-time.After(50 * time.Millisecond):
	}
	waited := make(chan error, 1)
	go func() {
		_, err := p.Wait(ctx)
		waited <- err
	}()
	select {
	case err := <-waited:
		t.Fatalf("Wait returned (%v) before the batch was committed", err)
	case <-time.After(20 * time.Millisecond):
	}

	close(release)
	if err := <-held; err != nil {
		t.Fatal(err)
	}
	if err := <-waited; err != nil {
		t.Fatal(err)
	}
	if _, err := pd.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	r := <-again
	if r.err != nil || len(r.removed) != 0 {
		t.Fatalf("second delete of the entry: removed %v, %v; want nothing", r.removed, r.err)
	}
	if _, err := r.p.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if got, err := s.Read(ctx, b, 0, 10); err != nil || len(got) != 1 || string(got[0].Data) != "queued" {
		t.Fatalf("bob's mailbox: %v, %v; want the queued entry", got, err)
	}
	if got, err := s.Read(ctx, c, 0, 10); err != nil || len(got) != 1 || string(got[0].Data) != "receipt" {
		t.Fatalf("carol's mailbox: %v, %v; want one receipt", got, err)
	}
	if left, err := s.Read(ctx, a, 0, 10); err != nil || len(left) != 0 {
		t.Fatalf("alice's mailbox: %v, %v; want it empty", left, err)
	}
	if d := s.Depth(); d != 2 {
		t.Fatalf("depth %d, want 2", d)
	}
}
