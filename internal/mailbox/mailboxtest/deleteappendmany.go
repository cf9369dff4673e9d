package mailboxtest

import (
	"fmt"
	"slices"
	"sync"
	"testing"

	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox"
)

// The tests of the optional mailbox.ManyDeleteAppender capability, skipped
// for a backend without it. They model the acks of several group members
// that arrive together: each member's entries are deleted and one
// combined receipt is appended to the sender.

func manyDeleteAppender(t *testing.T, st mailbox.Store) mailbox.ManyDeleteAppender {
	t.Helper()
	m, ok := st.(mailbox.ManyDeleteAppender)
	if !ok {
		t.Skip("backend does not implement mailbox.ManyDeleteAppender")
	}
	return m
}

// combinedReceipt returns a Then that appends to each of devs one item
// listing every removed entry's data, per deletion, as "i:data,…;".
func combinedReceipt(devs ...ident.Device) func([][]mailbox.Entry) ([]mailbox.Item, error) {
	return func(removed [][]mailbox.Entry) ([]mailbox.Item, error) {
		var b []byte
		for i, es := range removed {
			for _, e := range es {
				b = fmt.Appendf(b, "%d:%s,", i, e.Data)
			}
		}
		items := make([]mailbox.Item, len(devs))
		for i, d := range devs {
			items[i] = mailbox.Item{Device: d, Data: b}
		}
		return items, nil
	}
}

func testDeleteAppendMany(t *testing.T, b Backend) {
	st := open(t, b)
	m := manyDeleteAppender(t, st)
	a, bb, c, snd := dev("amy", 1), dev("ben", 2), dev("cal", 1), dev("sid", 1)
	sa := mustAppend(t, st, mailbox.Batch{Items: []mailbox.Item{{Device: a, Data: []byte("a1")}, {Device: a, Data: []byte("a2")}}}).Seqs
	sb := mustAppend(t, st, mailbox.Batch{Items: []mailbox.Item{{Device: bb, Data: []byte("b1")}}}).Seqs
	mustAppend(t, st, mailbox.Batch{Items: []mailbox.Item{{Device: c, Data: []byte("c1")}}})

	var seen [][]mailbox.Entry
	then := combinedReceipt(snd)
	removed, p, err := m.StartDeleteAppendMany(ctx, mailbox.DeleteAppendMany{
		Deletes: []mailbox.DeleteAppend{
			{Device: a, Seqs: []uint64{sa[1], sa[0], sa[1]}},
			{Device: bb, Seqs: []uint64{sb[0] + 100}}, // absent: ignored
			{Device: c}, // nothing asked
		},
		Then: func(r [][]mailbox.Entry) ([]mailbox.Item, error) {
			seen = r
			return then(r)
		},
	})
	if err != nil {
		t.Fatalf("StartDeleteAppendMany: %v", err)
	}
	res, err := p.Wait(ctx)
	if err != nil {
		t.Fatalf("Wait: %v", err)
	}
	if len(removed) != 3 || !slices.Equal(datas(removed[0]), []string{"a1", "a2"}) || len(removed[1]) != 0 || len(removed[2]) != 0 {
		t.Fatalf("removed = %v, want [[a1 a2] [] []]", removed)
	}
	if len(seen) != 3 || len(seen[0]) != 2 {
		t.Fatalf("Then saw %v", seen)
	}
	if len(res.Seqs) != 1 {
		t.Fatalf("appended seqs %v, want one", res.Seqs)
	}
	if got := datas(readAll(t, st, snd)); !slices.Equal(got, []string{"0:a1,0:a2,"}) {
		t.Errorf("sender holds %v", got)
	}
	if got := readAll(t, st, a); len(got) != 0 {
		t.Errorf("a still holds %v", datas(got))
	}
	if got := datas(readAll(t, st, bb)); !slices.Equal(got, []string{"b1"}) {
		t.Errorf("b holds %v, want [b1]", got)
	}

	// Nothing removed: Then is not called, nothing is appended.
	removed, p, err = m.StartDeleteAppendMany(ctx, mailbox.DeleteAppendMany{
		Deletes: []mailbox.DeleteAppend{{Device: a, Seqs: sa}, {Device: bb, Seqs: []uint64{sb[0] + 1}}},
		Then: func([][]mailbox.Entry) ([]mailbox.Item, error) {
			t.Error("Then called with nothing removed")
			return nil, nil
		},
	})
	if err != nil {
		t.Fatalf("StartDeleteAppendMany of absent entries: %v", err)
	}
	if res, err := p.Wait(ctx); err != nil || len(res.Seqs) != 0 {
		t.Fatalf("Wait = %v, %v; want no seqs", res, err)
	}
	if len(removed) != 2 || len(removed[0])+len(removed[1]) != 0 {
		t.Errorf("removed %v, want nothing", removed)
	}

	// One device twice is refused, and nothing is removed.
	if _, _, err := m.StartDeleteAppendMany(ctx, mailbox.DeleteAppendMany{
		Deletes: []mailbox.DeleteAppend{{Device: bb, Seqs: sb}, {Device: bb, Seqs: sb}},
		Then:    combinedReceipt(snd),
	}); err == nil {
		t.Error("a device named twice was accepted")
	}
	if got := datas(readAll(t, st, bb)); !slices.Equal(got, []string{"b1"}) {
		t.Errorf("after the refusal b holds %v, want [b1]", got)
	}
	if dp, ok := st.(mailbox.Depther); ok && dp.Depth() != 3 {
		t.Errorf("Depth = %d, want 3 (b1, c1, the receipt)", dp.Depth())
	}
}

// testDeleteAppendManyConcurrent races combined deletes over overlapping
// sets of devices (taken in different orders) with single ones: none
// deadlocks, and every entry is removed, and its receipt appended, once.
func testDeleteAppendManyConcurrent(t *testing.T, b Backend) {
	st := open(t, b)
	m := manyDeleteAppender(t, st)
	da := deleteAppender(t, st)
	const members, per = 8, 12
	snd := dev("sam", 1)
	devs := make([]ident.Device, members)
	seqs := make([][]uint64, members)
	for i := range devs {
		devs[i] = dev(fmt.Sprintf("m%d", i), 1)
		items := make([]mailbox.Item, per)
		for j := range items {
			items[j] = mailbox.Item{Device: devs[i], Data: fmt.Appendf(nil, "%d.%d", i, j)}
		}
		seqs[i] = mustAppend(t, st, mailbox.Batch{Items: items}).Seqs
	}
	// One receipt item per removed entry, so that counting is simple.
	then := func(removed [][]mailbox.Entry) ([]mailbox.Item, error) {
		var items []mailbox.Item
		for _, es := range removed {
			items = append(items, receiptsForData(es, snd)...)
		}
		return items, nil
	}
	const workers = 6
	var mu sync.Mutex
	count := map[string]int{}
	errs := make([]error, workers)
	// record waits for a delete's write and counts what it removed; false
	// (the worker stops) on an error.
	record := func(w int, got [][]mailbox.Entry, p mailbox.Pending, err error) bool {
		if err == nil {
			_, err = p.Wait(ctx)
		}
		if err != nil {
			errs[w] = err
			return false
		}
		mu.Lock()
		defer mu.Unlock()
		for _, es := range got {
			for _, e := range es {
				count[string(e.Data)]++
			}
		}
		return true
	}
	var wg sync.WaitGroup
	start := make(chan struct{})
	for w := range workers {
		wg.Go(func() {
			<-start
			for j := range per {
				if errs[w] != nil {
					return
				}
				if w == 0 {
					// Single deletes, member by member.
					for i := range devs {
						got, p, err := da.StartDeleteAppend(ctx, mailbox.DeleteAppend{Device: devs[i], Seqs: seqs[i][j : j+1], Then: receiptsFor(snd)})
						if !record(w, [][]mailbox.Entry{got}, p, err) {
							return
						}
					}
					continue
				}
				// Combined: a rotating subset of members, in a rotating order.
				var dels []mailbox.DeleteAppend
				for k := range members / 2 {
					i := (w*3 + k*(1+w%3) + j) % members
					if slices.ContainsFunc(dels, func(d mailbox.DeleteAppend) bool { return d.Device == devs[i] }) {
						continue
					}
					dels = append(dels, mailbox.DeleteAppend{Device: devs[i], Seqs: seqs[i][j : j+1]})
				}
				got, p, err := m.StartDeleteAppendMany(ctx, mailbox.DeleteAppendMany{Deletes: dels, Then: then})
				if !record(w, got, p, err) {
					return
				}
			}
		})
	}
	close(start)
	wg.Wait()
	for w, err := range errs {
		if err != nil {
			t.Fatalf("worker %d: %v", w, err)
		}
	}
	var want []string
	for i := range devs {
		for j := range per {
			k := fmt.Sprintf("%d.%d", i, j)
			want = append(want, "r"+k)
			if count[k] != 1 {
				t.Errorf("entry %s removed %d times, want 1", k, count[k])
			}
		}
		if got := readAll(t, st, devs[i]); len(got) != 0 {
			t.Errorf("member %d still holds %v", i, datas(got))
		}
	}
	got := datas(readAll(t, st, snd))
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("sender holds %d receipts, want %d, one per entry", len(got), len(want))
	}
}

// receiptsForData is receiptsFor over es.
func receiptsForData(es []mailbox.Entry, devs ...ident.Device) []mailbox.Item {
	items, _ := receiptsFor(devs...)(es)
	return items
}
