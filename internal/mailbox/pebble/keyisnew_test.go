package pebble

import (
	"slices"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox"
)

// A batch with KeyIsNew is not checked against its key: vouching for a key
// that an earlier batch used appends the batch again (the contract that
// makes a false claim costly only to the one who makes it). Its key is
// still written, so a later append of the key without KeyIsNew is a
// duplicate, also after a reopen.
func TestKeyIsNew(t *testing.T) {
	fs := vfs.NewMem()
	s := mustOpen(t, "db", Options{FS: fs})
	d := ident.Device{User: "alice", ID: 1}

	first, err := s.Append(ctx, mailbox.Batch{Key: "k", Receipt: []byte("r1"), Items: []mailbox.Item{item(d, "one")}})
	if err != nil {
		t.Fatal(err)
	}
	again, err := s.Append(ctx, mailbox.Batch{Key: "k", KeyIsNew: true, Receipt: []byte("r2"), Items: []mailbox.Item{item(d, "two")}})
	if err != nil {
		t.Fatal(err)
	}
	if again.Duplicate || len(again.Seqs) != 1 || again.Seqs[0] <= first.Seqs[0] || string(again.Receipt) != "r2" {
		t.Fatalf("KeyIsNew append of a used key = %+v; want it stored after seq %d with receipt r2", again, first.Seqs[0])
	}
	if got := readAll(t, s, d); len(got) != 2 {
		t.Fatalf("mailbox = %q; want both appends", got)
	}

	// The key now holds the latest receipt written under it.
	retry := func(s *Store) {
		t.Helper()
		before := readAll(t, s, d)
		res, err := s.Append(ctx, mailbox.Batch{Key: "k", Receipt: []byte("r3"), Items: []mailbox.Item{item(d, "three")}})
		if err != nil {
			t.Fatal(err)
		}
		if !res.Duplicate || string(res.Receipt) != "r2" || res.Seqs != nil {
			t.Fatalf("retry without KeyIsNew = %+v; want a duplicate with receipt r2", res)
		}
		if got := readAll(t, s, d); !slices.Equal(got, before) {
			t.Fatalf("mailbox after the retry = %q; want it unchanged, %q", got, before)
		}
	}
	retry(s)

	// A key first written by a KeyIsNew batch is found too, after a reopen
	// as well: KeyIsNew skips only the lookup, never the write.
	res, err := s.Append(ctx, mailbox.Batch{Key: "fresh", KeyIsNew: true, Receipt: []byte("rf"), Items: []mailbox.Item{item(d, "fresh")}})
	if err != nil || res.Duplicate {
		t.Fatalf("KeyIsNew append of a fresh key = %+v, %v", res, err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = mustOpen(t, "db", Options{FS: fs})
	defer s.Close()
	retry(s)
	res, err = s.Append(ctx, mailbox.Batch{Key: "fresh", Items: []mailbox.Item{item(d, "fresh again")}})
	if err != nil || !res.Duplicate || string(res.Receipt) != "rf" {
		t.Fatalf("retry of a key written with KeyIsNew = %+v, %v; want a duplicate with receipt rf", res, err)
	}
	if got := readAll(t, s, d); len(got) != 3 {
		t.Fatalf("mailbox = %q; want three entries", got)
	}
}

// A retry (no KeyIsNew) sent while the first attempt (KeyIsNew) is still
// on its way into the store waits for it on the key's lock and reports it,
// rather than missing its key in a lookup made before it was written and
// storing the message a second time. The first attempt is held up on its
// device's append lock, which the test takes.
func TestKeyIsNewRetryWaitsForFirstAttempt(t *testing.T) {
	s := mustOpen(t, "db", Options{FS: vfs.NewMem()})
	defer s.Close()
	d := ident.Device{User: "alice", ID: 1}
	devLock, err := appendLockName(d)
	if err != nil {
		t.Fatal(err)
	}
	held, err := s.locks.acquire(ctx, devLock, nil)
	if err != nil {
		t.Fatal(err)
	}
	released := false
	defer func() {
		if !released {
			s.locks.release(held)
		}
	}()

	type outcome struct {
		res mailbox.Result
		err error
	}
	firstc, retryc := make(chan outcome, 1), make(chan outcome, 1)
	go func() {
		res, err := s.Append(ctx, mailbox.Batch{Key: "k", KeyIsNew: true, Receipt: []byte("first"), Items: []mailbox.Item{item(d, "first")}})
		firstc <- outcome{res, err}
	}()
	waitLockRefs(t, s, devLock, 2) // the first attempt waits for the device
	go func() {
		res, err := s.Append(ctx, mailbox.Batch{Key: "k", Receipt: []byte("retry"), Items: []mailbox.Item{item(d, "retry")}})
		retryc <- outcome{res, err}
	}()
	waitLockRefs(t, s, lockKeyPrefix+"k", 2) // the retry waits for the key
	s.locks.release(held)
	released = true

	first, retry := <-firstc, <-retryc
	if first.err != nil || first.res.Duplicate {
		t.Fatalf("first attempt = %+v, %v; want it stored", first.res, first.err)
	}
	if retry.err != nil || !retry.res.Duplicate || string(retry.res.Receipt) != "first" {
		t.Fatalf("retry = %+v, %v; want a duplicate with the first attempt's receipt", retry.res, retry.err)
	}
	if got, want := readAll(t, s, d), []string{"1:first"}; !slices.Equal(got, want) {
		t.Fatalf("mailbox = %q; want %q", got, want)
	}
}

// waitLockRefs waits until n goroutines hold or wait for the lock called
// name.
func waitLockRefs(t *testing.T, s *Store, name string, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		sh := s.locks.shard(name)
		sh.mu.Lock()
		refs := 0
		if l := sh.m[name]; l != nil {
			refs = l.refs
		}
		sh.mu.Unlock()
		if refs == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("lock %q has %d holders and waiters; want %d", name, refs, n)
		}
		time.Sleep(time.Millisecond)
	}
}
