package jetstream

import (
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox"
)

// holdGroups queues the appends made by fn without sending them, until all
// n are queued, then lets one sender take them: so they are committed as
// groups whatever the scheduling.
func holdGroups(t *testing.T, st *Store, n int, fn func(i int)) {
	t.Helper()
	c := st.groups
	deadline := time.Now().Add(20 * time.Second)
	for {
		// Senders of earlier appends exit once they find the queue empty.
		c.mu.Lock()
		if c.inflight == 0 {
			c.inflight = maxGroupInflight // submit starts no sender
			c.mu.Unlock()
			break
		}
		c.mu.Unlock()
		if time.Now().After(deadline) {
			t.Fatal("a sender is still running")
		}
		time.Sleep(time.Millisecond)
	}
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { fn(i) })
	}
	for {
		c.mu.Lock()
		queued := len(c.queue)
		c.mu.Unlock()
		if queued == n {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d appends queued", queued, n)
		}
		time.Sleep(time.Millisecond)
	}
	c.mu.Lock()
	c.inflight = 1
	st.ops.Add(1)
	c.mu.Unlock()
	go c.run()
	wg.Wait()
}

// TestGroupCommit checks the group commit: appends queued together are
// committed in one atomic batch with the right seqs each; a group holding
// a key that exists is refused by the server and its members retried
// alone (the duplicate reports the stored receipt, the others are
// appended once); two appends with one key are never in one group.
func TestGroupCommit(t *testing.T) {
	srv := startServer(t, serverConfig{name: "group", dir: t.TempDir(), port: -1, syncAlwy: true})
	t.Cleanup(srv.Shutdown)
	nc := connect(t, srv.ClientURL())
	t.Cleanup(nc.Close)
	stream, prefix := uniqueNames()
	st := mustOpen(t, nc, Options{Stream: stream, SubjectPrefix: prefix})
	t.Cleanup(func() { st.Close() })
	ctx := withTestTimeout(t)
	a, b := ident.Device{User: "ann", ID: 1}, ident.Device{User: "ben", ID: 2}

	// Fresh keys and unkeyed multi-item batches: one group.
	const n = 40
	results := make([]mailbox.Result, n)
	holdGroups(t, st, n, func(i int) {
		bt := mailbox.Batch{Items: []mailbox.Item{{Device: a, Data: fmt.Appendf(nil, "a%d", i)}}}
		if i%2 == 0 {
			bt.Key, bt.Receipt = fmt.Sprint("fresh-", i), fmt.Appendf(nil, "r%d", i)
		} else {
			bt.Items = append(bt.Items, mailbox.Item{Device: b, Data: fmt.Appendf(nil, "b%d", i)})
		}
		var err error
		if results[i], err = st.Append(ctx, bt); err != nil {
			t.Errorf("append %d: %v", i, err)
		}
	})
	if t.Failed() {
		t.FailNow()
	}
	if st.groups.sent.Load() == 0 {
		t.Fatal("no group was sent")
	}
	bySeq := map[uint64]string{}
	for i, r := range results {
		if r.Duplicate {
			t.Fatalf("append %d: duplicate", i)
		}
		want := 1 + i%2
		if len(r.Seqs) != want {
			t.Fatalf("append %d: %d seqs, want %d", i, len(r.Seqs), want)
		}
		bySeq[r.Seqs[0]] = fmt.Sprintf("a%d", i)
		if want == 2 {
			bySeq[r.Seqs[1]] = fmt.Sprintf("b%d", i)
		}
	}
	for _, d := range []ident.Device{a, b} {
		es, err := st.Read(ctx, d, 0, 1000)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range es {
			if bySeq[e.Seq] != string(e.Data) {
				t.Fatalf("%v seq %d holds %q, its append was told %q", d, e.Seq, e.Data, bySeq[e.Seq])
			}
			delete(bySeq, e.Seq)
		}
	}
	if len(bySeq) != 0 {
		t.Fatalf("%d appended entries not read back", len(bySeq))
	}

	// A key that exists among fresh keys and unkeyed appends, and a new
	// key twice: the group is refused and everyone retries alone.
	if _, err := st.Append(ctx, mailbox.Batch{Key: "old", Receipt: []byte("r-old"), Items: []mailbox.Item{{Device: b, Data: []byte("old")}}}); err != nil {
		t.Fatal(err)
	}
	before, err := st.Read(ctx, b, 0, 1000)
	if err != nil {
		t.Fatal(err)
	}
	const m = 30
	results = make([]mailbox.Result, m)
	keys := make([]string, m)
	holdGroups(t, st, m, func(i int) {
		switch i % 3 {
		case 0:
			keys[i] = "old"
		case 1:
			keys[i] = "twice"
		default:
			if i%2 == 0 {
				keys[i] = fmt.Sprint("new-", i)
			} // else unkeyed: retried alone too
		}
		bt := mailbox.Batch{Key: keys[i], Receipt: fmt.Appendf(nil, "r%d", i), Items: []mailbox.Item{{Device: b, Data: fmt.Appendf(nil, "n%d", i)}}}
		if keys[i] == "" {
			// Two items, so that it is a batch, which is grouped.
			bt.Receipt = nil
			bt.Items = append(bt.Items, mailbox.Item{Device: a, Data: fmt.Appendf(nil, "n%d", i)})
		}
		var err error
		if results[i], err = st.Append(ctx, bt); err != nil {
			t.Errorf("append %d: %v", i, err)
		}
	})
	if t.Failed() {
		t.FailNow()
	}
	if st.groups.refused.Load() == 0 {
		t.Fatal("no group was refused")
	}
	var stored []string
	twice := ""
	for i, r := range results {
		switch {
		case keys[i] == "old":
			if !r.Duplicate || string(r.Receipt) != "r-old" {
				t.Fatalf("append %d with key old: %+v, want the stored receipt", i, r)
			}
		case keys[i] == "twice" && r.Duplicate:
			continue
		case r.Duplicate || len(r.Seqs) != 1 && keys[i] != "" || len(r.Seqs) != 2 && keys[i] == "":
			t.Fatalf("append %d (key %s): %+v, want appended", i, keys[i], r)
		default:
			if keys[i] == "twice" {
				if twice != "" {
					t.Fatalf("key twice appended twice")
				}
				twice = fmt.Sprintf("r%d", i)
			}
			stored = append(stored, fmt.Sprintf("n%d", i))
		}
	}
	if twice == "" {
		t.Fatal("key twice never appended")
	}
	for i, r := range results {
		if keys[i] == "twice" && r.Duplicate && string(r.Receipt) != twice {
			t.Fatalf("append %d with key twice: receipt %q, want %q", i, r.Receipt, twice)
		}
	}
	after, err := st.Read(ctx, b, 0, 1000)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range after[len(before):] {
		got = append(got, string(e.Data))
	}
	slices.Sort(got)
	slices.Sort(stored)
	if !slices.Equal(got, stored) {
		t.Fatalf("mailbox gained %v, want %v", got, stored)
	}
}
