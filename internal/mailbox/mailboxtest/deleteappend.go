package mailboxtest

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox"
)

// The tests of the optional mailbox.DeleteAppender capability, skipped for
// a backend without it. They model an acknowledgement: the acked entries
// are deleted and one receipt per removed entry is appended to each of the
// sender's devices.

// deleteAppender returns st as a DeleteAppender, or skips the test.
func deleteAppender(t *testing.T, st mailbox.Store) mailbox.DeleteAppender {
	t.Helper()
	da, ok := st.(mailbox.DeleteAppender)
	if !ok {
		t.Skip("backend does not implement mailbox.DeleteAppender")
	}
	return da
}

// receiptsFor returns a Then that appends, for each removed entry, an item
// "r<data>" to each of devs.
func receiptsFor(devs ...ident.Device) func([]mailbox.Entry) ([]mailbox.Item, error) {
	return func(removed []mailbox.Entry) ([]mailbox.Item, error) {
		var items []mailbox.Item
		for _, e := range removed {
			for _, d := range devs {
				items = append(items, mailbox.Item{Device: d, Data: []byte("r" + string(e.Data))})
			}
		}
		return items, nil
	}
}

func mustDeleteAppend(t *testing.T, da mailbox.DeleteAppender, d mailbox.DeleteAppend) ([]mailbox.Entry, mailbox.Result) {
	t.Helper()
	removed, p, err := da.StartDeleteAppend(ctx, d)
	if err != nil {
		t.Fatalf("StartDeleteAppend: %v", err)
	}
	res, err := p.Wait(ctx)
	if err != nil {
		t.Fatalf("Wait: %v", err)
	}
	return removed, res
}

func testDeleteAppend(t *testing.T, b Backend) {
	st := open(t, b)
	da := deleteAppender(t, st)
	rcpt, s1, s2 := dev("ruth", 1), dev("sam", 1), dev("sam", 2)
	when := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	seqs := mustAppend(t, st, mailbox.Batch{Items: []mailbox.Item{
		{Device: rcpt, Data: []byte("0")}, {Device: rcpt, Data: []byte("1")}, {Device: rcpt, Data: []byte("2")},
	}}).Seqs
	before := appendOne(t, st, s1, "before")

	var calls [][]mailbox.Entry
	then := func(removed []mailbox.Entry) ([]mailbox.Item, error) {
		calls = append(calls, slices.Clone(removed))
		return receiptsFor(s1, s2)(removed)
	}
	removed, res := mustDeleteAppend(t, da, mailbox.DeleteAppend{
		Device: rcpt, Seqs: []uint64{seqs[2], seqs[0], seqs[2] + 100, seqs[0]}, Then: then, Time: when})
	if !slices.Equal(seqsOf(removed), []uint64{seqs[0], seqs[2]}) || !slices.Equal(datas(removed), []string{"0", "2"}) {
		t.Fatalf("removed %v %q, want seqs %v [0 2] (present ones, once, in seq order)", seqsOf(removed), datas(removed), []uint64{seqs[0], seqs[2]})
	}
	if len(calls) != 1 || !slices.Equal(datas(calls[0]), []string{"0", "2"}) {
		t.Fatalf("Then called with %v, want once with [0 2]", calls)
	}
	if len(res.Seqs) != 4 {
		t.Fatalf("Result.Seqs = %v, want 4 (one per item)", res.Seqs)
	}
	if got := datas(readAll(t, st, rcpt)); !slices.Equal(got, []string{"1"}) {
		t.Errorf("recipient holds %v, want [1]", got)
	}
	got1 := readAll(t, st, s1)
	if !slices.Equal(datas(got1), []string{"before", "r0", "r2"}) {
		t.Fatalf("sender device 1 holds %v, want [before r0 r2]", datas(got1))
	}
	if got1[1].Seq <= before || !slices.Equal(seqsOf(got1[1:]), []uint64{res.Seqs[0], res.Seqs[2]}) {
		t.Errorf("sender device 1 seqs %v, want after %d and as reported (%v)", seqsOf(got1), before, res.Seqs)
	}
	if !sameTime(got1[1].Time, when) {
		t.Errorf("appended item time %v, want %v", got1[1].Time, when)
	}
	if got := datas(readAll(t, st, s2)); !slices.Equal(got, []string{"r0", "r2"}) {
		t.Errorf("sender device 2 holds %v, want [r0 r2]", got)
	}

	// Idempotent: acking again, or acking seqs never appended, removes and
	// appends nothing and does not call Then.
	for _, again := range [][]uint64{{seqs[0], seqs[2]}, {seqs[2] + 1000}, nil} {
		removed, res := mustDeleteAppend(t, da, mailbox.DeleteAppend{Device: rcpt, Seqs: again, Then: then})
		if len(removed) != 0 || len(res.Seqs) != 0 {
			t.Errorf("StartDeleteAppend(%v) again = %v, %v; want nothing", again, seqsOf(removed), res.Seqs)
		}
	}
	if len(calls) != 1 {
		t.Errorf("Then called %d times, want only for the first", len(calls))
	}
	if got := datas(readAll(t, st, s1)); len(got) != 3 {
		t.Errorf("sender device 1 holds %v after repeated acks, want 3 entries", got)
	}

	// Then appending nothing: a plain delete.
	removed, none := mustDeleteAppend(t, da, mailbox.DeleteAppend{Device: rcpt, Seqs: []uint64{seqs[1]},
		Then: func([]mailbox.Entry) ([]mailbox.Item, error) { return nil, nil }})
	if !slices.Equal(datas(removed), []string{"1"}) || len(none.Seqs) != 0 {
		t.Errorf("delete-only = %q, %v; want [1] and no seqs", datas(removed), none.Seqs)
	}
	if got := readAll(t, st, rcpt); len(got) != 0 {
		t.Errorf("recipient holds %v, want nothing", datas(got))
	}
	if dp, ok := st.(mailbox.Depther); ok && dp.Depth() != 5 {
		t.Errorf("Depth = %d, want 5 (the sender's entries)", dp.Depth())
	}
	// Seqs are not reused after the appends made here.
	if s := appendOne(t, st, s2, "after"); s <= res.Seqs[3] {
		t.Errorf("append after StartDeleteAppend got seq %d, want > %d", s, res.Seqs[3])
	}
}

// testDeleteAppendErrors checks that nothing is removed or appended when
// Then fails or an item is bad.
func testDeleteAppendErrors(t *testing.T, b Backend) {
	st := open(t, b)
	da := deleteAppender(t, st)
	rcpt, snd := dev("tess", 1), dev("uma", 1)
	seq := appendOne(t, st, rcpt, "m")
	boom := errors.New("boom")
	for name, then := range map[string]func([]mailbox.Entry) ([]mailbox.Item, error){
		"then fails": func([]mailbox.Entry) ([]mailbox.Item, error) { return nil, boom },
		"bad device": func([]mailbox.Entry) ([]mailbox.Item, error) {
			return []mailbox.Item{{Device: snd, Data: []byte("ok")}, {Device: ident.Device{User: "", ID: 1}, Data: []byte("x")}}, nil
		},
	} {
		removed, p, err := da.StartDeleteAppend(ctx, mailbox.DeleteAppend{Device: rcpt, Seqs: []uint64{seq}, Then: then})
		if err == nil {
			_, err = p.Wait(ctx)
		}
		if err == nil || len(removed) != 0 {
			t.Errorf("%s: StartDeleteAppend = %v, %v; want an error and nothing removed", name, seqsOf(removed), err)
		}
		if name == "then fails" && !errors.Is(err, boom) {
			t.Errorf("%s: error %v, want Then's", name, err)
		}
		if got := datas(readAll(t, st, rcpt)); !slices.Equal(got, []string{"m"}) {
			t.Errorf("%s: recipient holds %v, want [m]", name, got)
		}
		if got := readAll(t, st, snd); len(got) != 0 {
			t.Errorf("%s: sender holds %v, want nothing", name, datas(got))
		}
	}
	if _, _, err := da.StartDeleteAppend(ctx, mailbox.DeleteAppend{Device: ident.Device{User: strings.Repeat("x", 300), ID: 1}, Seqs: []uint64{1}}); err == nil {
		t.Error("StartDeleteAppend on a bad device: no error")
	}
	if dp, ok := st.(mailbox.Depther); ok && dp.Depth() != 1 {
		t.Errorf("Depth = %d, want 1", dp.Depth())
	}
}

// testDeleteAppendConcurrent acks the same entries from several goroutines
// at once: each entry is removed once, and its items appended once.
func testDeleteAppendConcurrent(t *testing.T, b Backend) {
	st := open(t, b)
	da := deleteAppender(t, st)
	const n, ackers = 60, 6
	rcpt, snd := dev("vera", 1), dev("walt", 1)
	items := make([]mailbox.Item, n)
	for i := range items {
		items[i] = mailbox.Item{Device: rcpt, Data: fmt.Append(nil, i)}
	}
	seqs := mustAppend(t, st, mailbox.Batch{Items: items}).Seqs
	errs := make([]error, ackers)
	removed := make([][]mailbox.Entry, ackers)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for g := range ackers {
		wg.Go(func() {
			<-start
			order := seqs
			for len(order) > 0 && errs[g] == nil {
				k := min(len(order), 1+g%3)
				var got []mailbox.Entry
				var p mailbox.Pending
				got, p, errs[g] = da.StartDeleteAppend(ctx, mailbox.DeleteAppend{Device: rcpt, Seqs: order[:k], Then: receiptsFor(snd)})
				if errs[g] == nil {
					_, errs[g] = p.Wait(ctx)
				}
				removed[g] = append(removed[g], got...)
				order = order[k:]
			}
		})
	}
	close(start)
	wg.Wait()
	count := map[uint64]int{}
	for g := range ackers {
		if errs[g] != nil {
			t.Fatalf("acker %d: %v", g, errs[g])
		}
		for _, e := range removed[g] {
			count[e.Seq]++
		}
	}
	for _, s := range seqs {
		if count[s] != 1 {
			t.Fatalf("seq %d removed %d times, want exactly 1", s, count[s])
		}
	}
	got := datas(readAll(t, st, snd))
	slices.Sort(got)
	want := make([]string, n)
	for i := range want {
		want[i] = fmt.Sprint("r", i)
	}
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("sender holds %d receipts %v, want one per entry", len(got), got)
	}
	if dp, ok := st.(mailbox.Depther); ok && dp.Depth() != n {
		t.Errorf("Depth = %d, want %d", dp.Depth(), n)
	}
}

// testCrashDeleteAppendAtomic crashes with acknowledgements durable and in
// flight: after the crash each one is either whole (entries gone, items
// present) or absent (entries present, no items), and every one whose Wait
// returned is whole.
func testCrashDeleteAppendAtomic(t *testing.T, b Backend) {
	st := open(t, b)
	da := deleteAppender(t, st)
	rcpts := []ident.Device{dev("xena", 1), dev("xena", 2), dev("yann", 1)}
	snd := []ident.Device{dev("zoe", 1), dev("zoe", 2)}
	rng := rand.New(rand.NewPCG(3, 4))
	type ack struct {
		dev     ident.Device
		entries []string // the data of the entries removed
		waited  bool
	}
	var acks []ack
	next := 0
	for round := range 40 {
		for _, d := range rcpts {
			items := make([]mailbox.Item, 1+rng.IntN(3))
			for j := range items {
				items[j] = mailbox.Item{Device: d, Data: fmt.Append(nil, next)}
				next++
			}
			mustAppend(t, st, mailbox.Batch{Items: items})
		}
		d := rcpts[rng.IntN(len(rcpts))]
		es, err := st.Read(ctx, d, 0, 1+rng.IntN(3))
		if err != nil {
			t.Fatal(err)
		}
		removed, p, err := da.StartDeleteAppend(ctx, mailbox.DeleteAppend{Device: d, Seqs: seqsOf(es), Then: receiptsFor(snd...)})
		if err != nil {
			t.Fatal(err)
		}
		a := ack{dev: d, entries: datas(removed)}
		// The last rounds are not waited for: the crash may or may not
		// keep them.
		if round < 30 {
			if _, err := p.Wait(ctx); err != nil {
				t.Fatal(err)
			}
			a.waited = true
		}
		acks = append(acks, a)
	}

	st = crash(t, b)

	held := map[string]bool{}
	for _, d := range rcpts {
		for _, e := range readAll(t, st, d) {
			held[string(e.Data)] = true
		}
	}
	receipts := make([]map[string]int, len(snd))
	for i, d := range snd {
		receipts[i] = map[string]int{}
		for _, e := range readAll(t, st, d) {
			receipts[i][string(e.Data)]++
		}
	}
	for i, a := range acks {
		for _, data := range a.entries {
			gone := !held[data]
			for j := range snd {
				n := receipts[j]["r"+data]
				switch {
				case n > 1:
					t.Errorf("ack %d: %d receipts for entry %s in %v", i, n, data, snd[j])
				case gone && n == 0:
					t.Errorf("ack %d (waited %v): entry %s gone but its receipt lost in %v", i, a.waited, data, snd[j])
				case !gone && n == 1:
					t.Errorf("ack %d (waited %v): entry %s kept but its receipt present in %v", i, a.waited, data, snd[j])
				case a.waited && !gone:
					t.Errorf("ack %d: waited for, but entry %s is back", i, data)
				}
			}
		}
	}
}

// seqReceiptsFor is receiptsFor for entries that may carry their Seq
// only (DeleteAppend.SeqsOnly): a receipt names the seq.
func seqReceiptsFor(d ident.Device) func([]mailbox.Entry) ([]mailbox.Item, error) {
	return func(removed []mailbox.Entry) ([]mailbox.Item, error) {
		items := make([]mailbox.Item, len(removed))
		for i, e := range removed {
			items[i] = mailbox.Item{Device: d, Data: fmt.Append(nil, "r", e.Seq)}
		}
		return items, nil
	}
}

// testDeleteAppendSeqsOnly: acks that need only the seqs (SeqsOnly), acks
// that need the entries, plain deletes and an expiry race for the same
// entries; each entry is removed once, and a SeqsOnly ack of an entry
// already removed, by any of them, removes nothing.
func testDeleteAppendSeqsOnly(t *testing.T, b Backend) {
	st := open(t, b)
	da := deleteAppender(t, st)
	const n, ackers = 90, 6
	rcpt, snd := dev("uma", 1), dev("ugo", 1)
	items := make([]mailbox.Item, n)
	for i := range items {
		items[i] = mailbox.Item{Device: rcpt, Data: fmt.Append(nil, i)}
	}
	seqs := mustAppend(t, st, mailbox.Batch{Items: items}).Seqs
	byData := map[string]uint64{}
	for i, s := range seqs {
		byData[string(items[i].Data)] = s
	}
	errs := make([]error, ackers)
	removed := make([][]uint64, ackers)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for g := range ackers {
		wg.Go(func() {
			<-start
			order := slices.Clone(seqs)
			if g%2 == 1 {
				slices.Reverse(order)
			}
			for len(order) > 0 && errs[g] == nil {
				k := min(len(order), 1+g%4)
				var got []mailbox.Entry
				switch g % 3 {
				case 0, 1: // an ack, with or without the entries
					var p mailbox.Pending
					got, p, errs[g] = da.StartDeleteAppend(ctx, mailbox.DeleteAppend{Device: rcpt, Seqs: order[:k],
						Then: seqReceiptsFor(snd), SeqsOnly: g%3 == 0})
					if errs[g] == nil {
						_, errs[g] = p.Wait(ctx)
					}
				case 2:
					got, errs[g] = st.Delete(ctx, rcpt, order[:k])
				}
				for _, e := range got {
					if g%3 != 0 && byData[string(e.Data)] != e.Seq {
						errs[g] = fmt.Errorf("entry %d returned with data %q", e.Seq, e.Data)
					}
					removed[g] = append(removed[g], e.Seq)
				}
				order = order[k:]
			}
		})
	}
	close(start)
	wg.Wait()
	count := map[uint64]int{}
	viaAck := 0
	for g := range ackers {
		if errs[g] != nil {
			t.Fatalf("acker %d: %v", g, errs[g])
		}
		for _, s := range removed[g] {
			count[s]++
		}
		if g%3 != 2 {
			viaAck += len(removed[g])
		}
	}
	for _, s := range seqs {
		if count[s] != 1 {
			t.Fatalf("seq %d removed %d times, want exactly 1", s, count[s])
		}
	}
	if got := len(readAll(t, st, snd)); got != viaAck {
		t.Errorf("sender holds %d receipts, want %d (one per entry an ack removed)", got, viaAck)
	}
	if dp, ok := st.(mailbox.Depther); ok && dp.Depth() != int64(viaAck) {
		t.Errorf("Depth = %d, want %d", dp.Depth(), viaAck)
	}
	// Removed already: nothing to remove, nothing appended.
	if got, res := mustDeleteAppend(t, da, mailbox.DeleteAppend{Device: rcpt, Seqs: seqs, Then: seqReceiptsFor(snd), SeqsOnly: true}); len(got) != 0 || len(res.Seqs) != 0 {
		t.Fatalf("SeqsOnly ack of removed entries removed %v and appended %v", seqsOf(got), res.Seqs)
	}

	// Entries that expired are gone for a SeqsOnly ack too.
	old := mustAppend(t, st, mailbox.Batch{Items: items[:5], Time: time.Now().Add(-time.Hour)}).Seqs
	if _, err := st.Expire(ctx, time.Now().Add(-time.Minute)); err != nil {
		t.Fatal(err)
	}
	if got, res := mustDeleteAppend(t, da, mailbox.DeleteAppend{Device: rcpt, Seqs: old, Then: seqReceiptsFor(snd), SeqsOnly: true}); len(got) != 0 || len(res.Seqs) != 0 {
		t.Fatalf("SeqsOnly ack of expired entries removed %v and appended %v", seqsOf(got), res.Seqs)
	}
	// And entries that are there are removed, with their seqs.
	fresh := mustAppend(t, st, mailbox.Batch{Items: items[:3]}).Seqs
	got, res := mustDeleteAppend(t, da, mailbox.DeleteAppend{Device: rcpt, Seqs: fresh, Then: seqReceiptsFor(snd), SeqsOnly: true})
	if !slices.Equal(seqsOf(got), fresh) || len(res.Seqs) != len(fresh) {
		t.Fatalf("SeqsOnly ack of %v removed %v and appended %v", fresh, seqsOf(got), res.Seqs)
	}
	if left := readAll(t, st, rcpt); len(left) != 0 {
		t.Fatalf("%d entries left, want none", len(left))
	}
}
