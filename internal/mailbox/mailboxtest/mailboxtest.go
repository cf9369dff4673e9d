// Package mailboxtest is the conformance suite for mailbox.Store backends.
// A backend's tests call Run with a function that sets up a fresh,
// independent instance of the backend for each subtest.
package mailboxtest

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox"
)

// Backend is one instance of the backend under test: one place where a
// store lives, which the suite can open, close and reopen.
type Backend struct {
	// Open returns the instance's store: empty on the first call, and on
	// later calls (after the previous store was closed) the same store
	// reopened with everything it held. It fails the test on error. The
	// suite closes what it opens.
	Open func(t *testing.T) mailbox.Store

	// Crash simulates a crash of the machine: it abandons the store most
	// recently returned by Open or Crash without closing it, throws away
	// whatever that store had not made durable (where the backend can tell),
	// and returns the store reopened from what survived. It may release the
	// abandoned store's resources once the crash image is taken. Nil if the
	// backend cannot simulate a crash; the subtests that need one are then
	// skipped.
	Crash func(t *testing.T) mailbox.Store
}

// Run runs the conformance suite. newBackend is called once per subtest,
// from that subtest, and must return an independent instance; subtests run
// in parallel.
func Run(t *testing.T, newBackend func(t *testing.T) Backend) {
	tests := []struct {
		name  string
		crash bool
		fn    func(t *testing.T, b Backend)
	}{
		{"Order", false, testOrder},
		{"SeqsNeverReused", false, testSeqsNeverReused},
		{"ReadAfterAndLimit", false, testReadAfterAndLimit},
		{"EntryTime", false, testEntryTime},
		{"MultiDeviceBatch", false, testMultiDeviceBatch},
		{"EmptyBatch", false, testEmptyBatch},
		{"Delete", false, testDelete},
		{"DeleteConcurrent", false, testDeleteConcurrent},
		{"IdempotencyKey", false, testIdempotencyKey},
		{"IdempotencyKeyConcurrent", false, testIdempotencyKeyConcurrent},
		{"Expire", false, testExpire},
		{"ConcurrentWriters", false, testConcurrentWriters},
		{"ContextCancelled", false, testContextCancelled},
		{"Depth", false, testDepth},
		{"Closed", false, testClosed},
		{"DeleteAppend", false, testDeleteAppend},
		{"DeleteAppendErrors", false, testDeleteAppendErrors},
		{"DeleteAppendConcurrent", false, testDeleteAppendConcurrent},
		{"DeleteAppendSeqsOnly", false, testDeleteAppendSeqsOnly},
		{"DeleteAppendMany", false, testDeleteAppendMany},
		{"DeleteAppendManyConcurrent", false, testDeleteAppendManyConcurrent},
		{"CrashKeepsAppends", true, testCrashKeepsAppends},
		{"CrashKeepsHighWater", true, testCrashKeepsHighWater},
		{"CrashDeleteAppendAtomic", true, testCrashDeleteAppendAtomic},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			b := newBackend(t)
			if tc.crash && b.Crash == nil {
				t.Skip("backend cannot simulate a crash")
			}
			tc.fn(t, b)
		})
	}
}

var ctx = context.Background()

// open opens b's store and closes it when the test ends (unless the test
// closed it already).
func open(t *testing.T, b Backend) mailbox.Store {
	t.Helper()
	st := b.Open(t)
	t.Cleanup(func() { closeStore(t, st) })
	return st
}

func crash(t *testing.T, b Backend) mailbox.Store {
	t.Helper()
	st := b.Crash(t)
	t.Cleanup(func() { closeStore(t, st) })
	return st
}

func closeStore(t *testing.T, st mailbox.Store) {
	t.Helper()
	if err := st.Close(); err != nil && !errors.Is(err, mailbox.ErrClosed) {
		t.Errorf("Close: %v", err)
	}
}

// reopen closes st cleanly and opens it again.
func reopen(t *testing.T, b Backend, st mailbox.Store) mailbox.Store {
	t.Helper()
	if err := st.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	return open(t, b)
}

func dev(user string, id uint32) ident.Device { return ident.Device{User: user, ID: id} }

func mustAppend(t *testing.T, st mailbox.Store, b mailbox.Batch) mailbox.Result {
	t.Helper()
	res, err := st.Append(ctx, b)
	if err != nil {
		t.Fatalf("Append: %v", err)
	}
	if !res.Duplicate && len(res.Seqs) != len(b.Items) {
		t.Fatalf("Append returned %d seqs for %d items", len(res.Seqs), len(b.Items))
	}
	return res
}

func appendOne(t *testing.T, st mailbox.Store, d ident.Device, data string) uint64 {
	t.Helper()
	res := mustAppend(t, st, mailbox.Batch{Items: []mailbox.Item{{Device: d, Data: []byte(data)}}})
	return res.Seqs[0]
}

// readAll reads all of d's mailbox, a few entries at a time so that paging
// is exercised, and checks that seqs strictly increase.
func readAll(t *testing.T, st mailbox.Store, d ident.Device) []mailbox.Entry {
	t.Helper()
	var all []mailbox.Entry
	var after uint64
	for {
		page, err := st.Read(ctx, d, after, 7)
		if err != nil {
			t.Fatalf("Read(%v, %d): %v", d, after, err)
		}
		if len(page) > 7 {
			t.Fatalf("Read(%v, %d, 7) returned %d entries", d, after, len(page))
		}
		for _, e := range page {
			if e.Seq <= after {
				t.Fatalf("Read(%v, %d): seq %d not after %d", d, after, e.Seq, after)
			}
			after = e.Seq
		}
		all = append(all, page...)
		if len(page) == 0 {
			return all
		}
	}
}

func seqsOf(es []mailbox.Entry) []uint64 {
	out := make([]uint64, len(es))
	for i, e := range es {
		out[i] = e.Seq
	}
	return out
}

func datas(es []mailbox.Entry) []string {
	out := make([]string, len(es))
	for i, e := range es {
		out[i] = string(e.Data)
	}
	return out
}

// sameTime reports whether a backend's stored time matches the time given:
// the suite asks for millisecond precision.
func sameTime(got, want time.Time) bool {
	d := got.Sub(want)
	return d > -time.Millisecond && d < time.Millisecond
}

func testOrder(t *testing.T, b Backend) {
	st := open(t, b)
	a, c := dev("alice", 1), dev("carol", 7)
	var wantA, wantC []string
	var lastA uint64
	for i := range 300 {
		data := fmt.Sprintf("a-%d", i)
		seq := appendOne(t, st, a, data)
		if seq <= lastA {
			t.Fatalf("append %d got seq %d after seq %d", i, seq, lastA)
		}
		if i == 0 && seq == 0 {
			t.Errorf("first seq = 0, want > 0")
		}
		lastA = seq
		wantA = append(wantA, data)
		if i%3 == 0 {
			// A multi-item batch for the other device.
			d1, d2 := fmt.Sprintf("c-%d-0", i), fmt.Sprintf("c-%d-1", i)
			res := mustAppend(t, st, mailbox.Batch{Items: []mailbox.Item{
				{Device: c, Data: []byte(d1)}, {Device: c, Data: []byte(d2)},
			}})
			if res.Seqs[1] <= res.Seqs[0] {
				t.Fatalf("seqs within a batch not increasing: %v", res.Seqs)
			}
			wantC = append(wantC, d1, d2)
		}
	}
	gotA := readAll(t, st, a)
	if !slices.Equal(datas(gotA), wantA) {
		t.Errorf("alice.1 holds %d entries out of order or wrong; want %d in append order", len(gotA), len(wantA))
	}
	if gotA[len(gotA)-1].Seq != lastA {
		t.Errorf("last seq read = %d, last appended = %d", gotA[len(gotA)-1].Seq, lastA)
	}
	if got := datas(readAll(t, st, c)); !slices.Equal(got, wantC) {
		t.Errorf("carol.7 holds %v, want %v", got, wantC)
	}
	// The order survives a reopen.
	st = reopen(t, b, st)
	if got := datas(readAll(t, st, a)); !slices.Equal(got, wantA) {
		t.Errorf("after reopen alice.1 holds %d entries, not the %d appended in order", len(got), len(wantA))
	}
}

func testSeqsNeverReused(t *testing.T, b Backend) {
	st := open(t, b)
	d := dev("bob", 2)
	var seqs []uint64
	for i := range 5 {
		seqs = append(seqs, appendOne(t, st, d, fmt.Sprint(i)))
	}
	high := seqs[len(seqs)-1]

	// Delete everything: the next seq still goes up.
	if _, err := st.Delete(ctx, d, seqs); err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, st, d); len(got) != 0 {
		t.Fatalf("after deleting all, read %v", seqsOf(got))
	}
	next := appendOne(t, st, d, "after delete")
	if next <= high {
		t.Fatalf("seq %d reused after deleting all (high was %d)", next, high)
	}
	high = next

	// Delete everything again and reopen: still up.
	if _, err := st.Delete(ctx, d, []uint64{next}); err != nil {
		t.Fatal(err)
	}
	st = reopen(t, b, st)
	next = appendOne(t, st, d, "after reopen")
	if next <= high {
		t.Fatalf("seq %d reused after delete-all and reopen (high was %d)", next, high)
	}
	// Another device's seqs are valid too.
	if s := appendOne(t, st, dev("bob", 3), "x"); s == 0 {
		t.Errorf("fresh device's first seq = 0, want > 0")
	}
}

func testReadAfterAndLimit(t *testing.T, b Backend) {
	st := open(t, b)
	d := dev("dave", 1)
	for i := range 10 {
		appendOne(t, st, d, fmt.Sprint(i))
	}
	all := readAll(t, st, d)
	if len(all) != 10 {
		t.Fatalf("read %d entries, want 10", len(all))
	}
	got, err := st.Read(ctx, d, all[2].Seq, 4)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(seqsOf(got), seqsOf(all[3:7])) {
		t.Errorf("Read(after=%d, limit=4) = %v, want %v", all[2].Seq, seqsOf(got), seqsOf(all[3:7]))
	}
	if got, _ := st.Read(ctx, d, all[8].Seq, 100); !slices.Equal(seqsOf(got), seqsOf(all[9:])) {
		t.Errorf("Read past the end-1 with a large limit = %v, want %v", seqsOf(got), seqsOf(all[9:]))
	}
	// after need not be a seq that exists.
	if got, _ := st.Read(ctx, d, all[4].Seq-1, 1); len(got) != 1 || got[0].Seq != all[4].Seq {
		t.Errorf("Read(after=%d, 1) = %v, want [%d]", all[4].Seq-1, seqsOf(got), all[4].Seq)
	}
	if got, err := st.Read(ctx, d, all[9].Seq, 10); err != nil || len(got) != 0 {
		t.Errorf("Read after the last seq = %v, %v; want nothing", seqsOf(got), err)
	}
	if got, err := st.Read(ctx, dev("nobody", 1), 0, 10); err != nil || len(got) != 0 {
		t.Errorf("Read of an unknown device = %v, %v; want nothing", seqsOf(got), err)
	}
	// Devices whose names are prefixes of each other stay apart.
	appendOne(t, st, dev("dav", 1), "dav")
	appendOne(t, st, dev("davey", 1), "davey")
	if got := readAll(t, st, d); len(got) != 10 {
		t.Errorf("dave.1 holds %d entries after appends to dav.1 and davey.1, want 10", len(got))
	}
}

func testEntryTime(t *testing.T, b Backend) {
	st := open(t, b)
	d := dev("erin", 1)
	when := time.Date(2031, 5, 6, 7, 8, 9, 123456789, time.UTC)
	mustAppend(t, st, mailbox.Batch{Time: when, Items: []mailbox.Item{{Device: d, Data: []byte("timed")}}})
	before := time.Now()
	appendOne(t, st, d, "now")
	after := time.Now()
	got := readAll(t, st, d)
	if len(got) != 2 {
		t.Fatalf("read %d entries, want 2", len(got))
	}
	if !sameTime(got[0].Time, when) {
		t.Errorf("entry time = %v, want Batch.Time %v", got[0].Time, when)
	}
	if got[1].Time.Before(before.Add(-time.Millisecond)) || got[1].Time.After(after.Add(time.Millisecond)) {
		t.Errorf("entry time = %v, want the append time (between %v and %v)", got[1].Time, before, after)
	}
	if string(got[0].Data) != "timed" || string(got[1].Data) != "now" {
		t.Errorf("data = %q, %q", got[0].Data, got[1].Data)
	}
}

func testMultiDeviceBatch(t *testing.T, b Backend) {
	st := open(t, b)
	a, c, e := dev("frank", 1), dev("frank", 2), dev("grace", 1)
	earlier := appendOne(t, st, a, "earlier")
	res := mustAppend(t, st, mailbox.Batch{Items: []mailbox.Item{
		{Device: a, Data: []byte("a1")},
		{Device: c, Data: []byte("c1")},
		{Device: a, Data: []byte("a2")},
		{Device: e, Data: []byte("e1")},
		{Device: c, Data: []byte("c2")},
	}})
	// Seqs increase within each device (frank.1 already had one entry).
	if res.Seqs[0] <= earlier || res.Seqs[2] <= res.Seqs[0] {
		t.Errorf("frank.1 seqs %d, %d: want increasing and after %d", res.Seqs[0], res.Seqs[2], earlier)
	}
	if res.Seqs[1] == 0 || res.Seqs[4] <= res.Seqs[1] || res.Seqs[3] == 0 {
		t.Errorf("seqs %v: want each device's seqs > 0 and increasing", res.Seqs)
	}
	want := map[ident.Device][]string{a: {"earlier", "a1", "a2"}, c: {"c1", "c2"}, e: {"e1"}}
	for d, w := range want {
		if got := datas(readAll(t, st, d)); !slices.Equal(got, w) {
			t.Errorf("%v holds %v, want %v", d, got, w)
		}
	}
	// Result.Seqs name the entries.
	got := readAll(t, st, c)
	if got[0].Seq != res.Seqs[1] || got[1].Seq != res.Seqs[4] {
		t.Errorf("grace entries at %v, Append said %d and %d", seqsOf(got), res.Seqs[1], res.Seqs[4])
	}
}

func testEmptyBatch(t *testing.T, b Backend) {
	st := open(t, b)
	res, err := st.Append(ctx, mailbox.Batch{})
	if err != nil || res.Duplicate || len(res.Seqs) != 0 {
		t.Errorf("Append(empty) = %+v, %v", res, err)
	}
	// A key with no items is remembered like any other.
	mustAppend(t, st, mailbox.Batch{Key: "empty", Receipt: []byte("r")})
	res = mustAppend(t, st, mailbox.Batch{Key: "empty", Receipt: []byte("other")})
	if !res.Duplicate || string(res.Receipt) != "r" {
		t.Errorf("second keyed empty batch = %+v, want duplicate with receipt r", res)
	}
}

func testDelete(t *testing.T, b Backend) {
	st := open(t, b)
	d, other := dev("heidi", 1), dev("heidi", 2)
	when := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	res := mustAppend(t, st, mailbox.Batch{Time: when, Items: []mailbox.Item{
		{Device: d, Data: []byte("0")}, {Device: d, Data: []byte("1")}, {Device: d, Data: []byte("2")},
		{Device: d, Data: []byte("3")}, {Device: d, Data: []byte("4")},
	}})
	s := res.Seqs
	appendOne(t, st, other, "other")

	got, err := st.Delete(ctx, d, []uint64{s[3], s[1], s[4] + 100, s[1]})
	if err != nil {
		t.Fatal(err)
	}
	slices.SortFunc(got, func(x, y mailbox.Entry) int { return cmp.Compare(x.Seq, y.Seq) })
	if !slices.Equal(seqsOf(got), []uint64{s[1], s[3]}) {
		t.Fatalf("Delete returned %v, want %v (present ones only, once)", seqsOf(got), []uint64{s[1], s[3]})
	}
	if string(got[0].Data) != "1" || string(got[1].Data) != "3" || !sameTime(got[0].Time, when) {
		t.Errorf("Delete returned %+v, want the entries' data and time", got)
	}
	// Idempotent.
	if got, err := st.Delete(ctx, d, []uint64{s[1], s[3]}); err != nil || len(got) != 0 {
		t.Errorf("second Delete = %v, %v; want nothing", seqsOf(got), err)
	}
	// Seqs are per device: other holds only its first seq, below s[2].
	if got, err := st.Delete(ctx, other, []uint64{s[2], s[4]}); err != nil || len(got) != 0 {
		t.Errorf("Delete of heidi.1's seqs on heidi.2 = %v, %v; want nothing", seqsOf(got), err)
	}
	if got := datas(readAll(t, st, d)); !slices.Equal(got, []string{"0", "2", "4"}) {
		t.Errorf("after deletes holds %v, want [0 2 4]", got)
	}
	if got, err := st.Delete(ctx, d, nil); err != nil || len(got) != 0 {
		t.Errorf("Delete(nil) = %v, %v", got, err)
	}
	if got, err := st.Delete(ctx, dev("nobody", 1), []uint64{1}); err != nil || len(got) != 0 {
		t.Errorf("Delete on an unknown device = %v, %v", got, err)
	}
}

func testIdempotencyKey(t *testing.T, b Backend) {
	st := open(t, b)
	d := dev("ivan", 1)
	first := mustAppend(t, st, mailbox.Batch{Key: "m-1", Receipt: []byte("receipt-1"),
		Items: []mailbox.Item{{Device: d, Data: []byte("one")}}})
	if first.Duplicate {
		t.Fatal("first append reported as duplicate")
	}
	dup := mustAppend(t, st, mailbox.Batch{Key: "m-1", Receipt: []byte("receipt-2"),
		Items: []mailbox.Item{{Device: d, Data: []byte("one again")}, {Device: dev("ivan", 2), Data: []byte("x")}}})
	if !dup.Duplicate || string(dup.Receipt) != "receipt-1" || dup.Seqs != nil {
		t.Errorf("duplicate append = %+v, want Duplicate, receipt-1 and no seqs", dup)
	}
	if got := datas(readAll(t, st, d)); !slices.Equal(got, []string{"one"}) {
		t.Errorf("after duplicate holds %v, want [one]", got)
	}
	if got := readAll(t, st, dev("ivan", 2)); len(got) != 0 {
		t.Errorf("duplicate appended to ivan.2: %v", datas(got))
	}
	// Another key appends.
	if res := mustAppend(t, st, mailbox.Batch{Key: "m-2", Items: []mailbox.Item{{Device: d, Data: []byte("two")}}}); res.Duplicate {
		t.Error("different key reported as duplicate")
	}
	// Deleting the entries does not forget the key, nor does reopening.
	if _, err := st.Delete(ctx, d, first.Seqs); err != nil {
		t.Fatal(err)
	}
	st = reopen(t, b, st)
	dup = mustAppend(t, st, mailbox.Batch{Key: "m-1", Items: []mailbox.Item{{Device: d, Data: []byte("three")}}})
	if !dup.Duplicate || string(dup.Receipt) != "receipt-1" {
		t.Errorf("after delete and reopen, append = %+v, want duplicate with receipt-1", dup)
	}
	if got := datas(readAll(t, st, d)); !slices.Equal(got, []string{"two"}) {
		t.Errorf("holds %v, want [two]", got)
	}
}

// testIdempotencyKeyConcurrent sends the same keyed batch from many
// goroutines at once, each to its own device so that nothing but the key
// orders them: exactly one may be stored.
func testIdempotencyKeyConcurrent(t *testing.T, b Backend) {
	st := open(t, b)
	const rounds, n = 32, 16
	for r := range rounds {
		key := fmt.Sprint("same-", r)
		results := make([]mailbox.Result, n)
		errs := make([]error, n)
		start := make(chan struct{})
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() {
				<-start
				results[i], errs[i] = st.Append(ctx, mailbox.Batch{
					Key:     key,
					Receipt: []byte(fmt.Sprint("receipt-", i)),
					Items:   []mailbox.Item{{Device: dev(fmt.Sprint("judy", r), uint32(i+1)), Data: []byte(fmt.Sprint("data-", i))}},
				})
			})
		}
		close(start)
		wg.Wait()
		winner := -1
		for i := range n {
			if errs[i] != nil {
				t.Fatalf("Append %d: %v", i, errs[i])
			}
			if !results[i].Duplicate {
				if winner >= 0 {
					t.Fatalf("%s: appends %d and %d both not duplicates", key, winner, i)
				}
				winner = i
			}
		}
		if winner < 0 {
			t.Fatalf("%s: every append reported a duplicate", key)
		}
		for i := range n {
			if want := fmt.Sprint("receipt-", winner); string(results[i].Receipt) != want {
				t.Errorf("%s: append %d receipt %q, want the first one's %q", key, i, results[i].Receipt, want)
			}
		}
		var stored []string
		for i := range n {
			stored = append(stored, datas(readAll(t, st, dev(fmt.Sprint("judy", r), uint32(i+1))))...)
		}
		if want := []string{fmt.Sprint("data-", winner)}; !slices.Equal(stored, want) {
			t.Errorf("%s: stored %v, want exactly the winner's %v", key, stored, want)
		}
	}
}

// testDeleteConcurrent acks the same entries from several goroutines at
// once: each entry must be returned (and counted off Depth) exactly once.
func testDeleteConcurrent(t *testing.T, b Backend) {
	st := open(t, b)
	const rounds, n, deleters = 8, 100, 8
	for r := range rounds {
		d := dev("kim", uint32(r+1))
		items := make([]mailbox.Item, n)
		for i := range items {
			items[i] = mailbox.Item{Device: d, Data: fmt.Append(nil, i)}
		}
		seqs := mustAppend(t, st, mailbox.Batch{Items: items}).Seqs
		returned := make([][]mailbox.Entry, deleters)
		errs := make([]error, deleters)
		start := make(chan struct{})
		var wg sync.WaitGroup
		for g := range deleters {
			wg.Go(func() {
				// Everyone acks everything, oldest first, in chunks of
				// different sizes, so they race for the same entries.
				order := seqs
				<-start
				for len(order) > 0 && errs[g] == nil {
					k := min(len(order), 1+g%4)
					var got []mailbox.Entry
					got, errs[g] = st.Delete(ctx, d, order[:k])
					returned[g] = append(returned[g], got...)
					order = order[k:]
				}
			})
		}
		close(start)
		wg.Wait()
		count := map[uint64]int{}
		for g := range deleters {
			if errs[g] != nil {
				t.Fatalf("Delete: %v", errs[g])
			}
			for _, e := range returned[g] {
				count[e.Seq]++
			}
		}
		for _, s := range seqs {
			if count[s] != 1 {
				t.Fatalf("%v: seq %d returned by %d deletes, want exactly 1", d, s, count[s])
			}
		}
		if got := readAll(t, st, d); len(got) != 0 {
			t.Errorf("%v: %d entries left", d, len(got))
		}
	}
	if dp, ok := st.(mailbox.Depther); ok && dp.Depth() != 0 {
		t.Errorf("Depth = %d after deleting everything, want 0", dp.Depth())
	}
}

func testExpire(t *testing.T, b Backend) {
	st := open(t, b)
	a, c := dev("ken", 1), dev("ken", 2)
	old := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	cutoff := old.Add(30 * 24 * time.Hour)
	resOld := mustAppend(t, st, mailbox.Batch{Key: "old", Receipt: []byte("r-old"), Time: old, Items: []mailbox.Item{
		{Device: a, Data: []byte("o1")}, {Device: a, Data: []byte("o2")}, {Device: c, Data: []byte("o3")},
	}})
	mustAppend(t, st, mailbox.Batch{Key: "edge", Time: cutoff, Items: []mailbox.Item{{Device: a, Data: []byte("edge")}}})
	mustAppend(t, st, mailbox.Batch{Key: "new", Receipt: []byte("r-new"), Time: cutoff.Add(time.Hour),
		Items: []mailbox.Item{{Device: c, Data: []byte("n1")}}})

	n, err := st.Expire(ctx, cutoff)
	if err != nil {
		t.Fatal(err)
	}
	if n != 3 {
		t.Errorf("Expire removed %d entries, want 3", n)
	}
	if got := datas(readAll(t, st, a)); !slices.Equal(got, []string{"edge"}) {
		t.Errorf("ken.1 holds %v, want [edge] (an entry at the cutoff stays)", got)
	}
	if got := datas(readAll(t, st, c)); !slices.Equal(got, []string{"n1"}) {
		t.Errorf("ken.2 holds %v, want [n1]", got)
	}
	if n, err := st.Expire(ctx, cutoff); err != nil || n != 0 {
		t.Errorf("second Expire = %d, %v; want 0", n, err)
	}
	// The old key expired with its entries; the others did not.
	res := mustAppend(t, st, mailbox.Batch{Key: "old", Time: cutoff.Add(2 * time.Hour), Items: []mailbox.Item{{Device: a, Data: []byte("again")}}})
	if res.Duplicate {
		t.Error("expired key still reported a duplicate")
	}
	if res.Seqs[0] <= resOld.Seqs[1] {
		t.Errorf("seq %d reused after expiry (had %d)", res.Seqs[0], resOld.Seqs[1])
	}
	if res := mustAppend(t, st, mailbox.Batch{Key: "new", Items: []mailbox.Item{{Device: a, Data: []byte("x")}}}); !res.Duplicate || string(res.Receipt) != "r-new" {
		t.Errorf("unexpired key: %+v, want duplicate with r-new", res)
	}
	if res := mustAppend(t, st, mailbox.Batch{Key: "edge"}); !res.Duplicate {
		t.Error("key appended exactly at the cutoff was expired")
	}
}

// testConcurrentWriters appends from many goroutines to overlapping devices
// while readers watch: every entry must land exactly once, each device's
// seqs must increase, and a reader must never see a seq before a smaller
// one becomes visible (that would make it skip the smaller one for good).
func testConcurrentWriters(t *testing.T, b Backend) {
	st := open(t, b)
	const writers, perWriter, ndev = 32, 50, 6
	devs := make([]ident.Device, ndev)
	for i := range devs {
		devs[i] = dev("group", uint32(i+1))
	}
	type placed struct {
		dev ident.Device
		seq uint64
	}
	var (
		mu       sync.Mutex
		placedAt = map[string]placed{}
	)
	done := make(chan struct{})
	var readers sync.WaitGroup
	readerErrs := make(chan error, ndev)
	for _, d := range devs {
		readers.Go(func() {
			var prev []uint64
			for stop := false; !stop; {
				select {
				case <-done:
					stop = true // one last read after the writers finished
				default:
				}
				es, err := st.Read(ctx, d, 0, 1<<30)
				if err != nil {
					readerErrs <- err
					return
				}
				cur := seqsOf(es)
				if err := checkGrows(prev, cur); err != nil {
					readerErrs <- fmt.Errorf("%v: %w", d, err)
					return
				}
				prev = cur
			}
		})
	}

	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := range writers {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 7))
			for i := range perWriter {
				items := make([]mailbox.Item, 1+rng.IntN(3))
				for j := range items {
					items[j] = mailbox.Item{
						Device: devs[rng.IntN(ndev)],
						Data:   fmt.Appendf(nil, "w%d-i%d-j%d", w, i, j),
					}
				}
				res, err := st.Append(ctx, mailbox.Batch{Items: items})
				if err != nil {
					errs <- err
					return
				}
				if len(res.Seqs) != len(items) {
					errs <- fmt.Errorf("%d seqs for %d items", len(res.Seqs), len(items))
					return
				}
				mu.Lock()
				for j, it := range items {
					placedAt[string(it.Data)] = placed{it.Device, res.Seqs[j]}
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	close(done)
	readers.Wait()
	close(errs)
	close(readerErrs)
	for err := range errs {
		t.Fatalf("Append: %v", err)
	}
	for err := range readerErrs {
		t.Errorf("reader: %v", err)
	}

	seen := map[string]bool{}
	total := 0
	for _, d := range devs {
		for _, e := range readAll(t, st, d) {
			total++
			key := string(e.Data)
			if seen[key] {
				t.Errorf("%s stored twice", key)
			}
			seen[key] = true
			p, ok := placedAt[key]
			if !ok {
				t.Errorf("%v holds %s, which was never appended", d, key)
			} else if p.dev != d || p.seq != e.Seq {
				t.Errorf("%s at %v seq %d, Append said %v seq %d", key, d, e.Seq, p.dev, p.seq)
			}
		}
	}
	if total != len(placedAt) {
		t.Errorf("store holds %d entries, %d were appended", total, len(placedAt))
	}
}

// checkGrows checks that a later read cur of a device's mailbox (with no
// deletes going on) extends the earlier read prev: it keeps every seq prev
// had, and any new seq comes after all of them.
func checkGrows(prev, cur []uint64) error {
	if len(cur) < len(prev) || !slices.Equal(cur[:len(prev)], prev) {
		return fmt.Errorf("read %v after reading %v: earlier entries changed", cur, prev)
	}
	if !slices.IsSorted(cur) || len(slices.Compact(slices.Clone(cur))) != len(cur) {
		return fmt.Errorf("read seqs %v not strictly increasing", cur)
	}
	return nil
}

func testContextCancelled(t *testing.T, b Backend) {
	st := open(t, b)
	d := dev("leo", 1)
	appendOne(t, st, d, "kept")
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := st.Append(cctx, mailbox.Batch{Items: []mailbox.Item{{Device: d, Data: []byte("x")}}}); !errors.Is(err, context.Canceled) {
		t.Errorf("Append with a cancelled context: %v, want context.Canceled", err)
	}
	if _, err := st.Append(cctx, mailbox.Batch{Key: "k", Items: []mailbox.Item{{Device: d, Data: []byte("x")}}}); !errors.Is(err, context.Canceled) {
		t.Errorf("keyed Append with a cancelled context: %v, want context.Canceled", err)
	}
	if _, err := st.Read(cctx, d, 0, 10); !errors.Is(err, context.Canceled) {
		t.Errorf("Read with a cancelled context: %v, want context.Canceled", err)
	}
	if _, err := st.Delete(cctx, d, []uint64{1}); !errors.Is(err, context.Canceled) {
		t.Errorf("Delete with a cancelled context: %v, want context.Canceled", err)
	}
	if _, err := st.Expire(cctx, time.Now().Add(time.Hour)); !errors.Is(err, context.Canceled) {
		t.Errorf("Expire with a cancelled context: %v, want context.Canceled", err)
	}
	// Nothing happened.
	if got := datas(readAll(t, st, d)); !slices.Equal(got, []string{"kept"}) {
		t.Errorf("holds %v, want [kept]", got)
	}
	if res := mustAppend(t, st, mailbox.Batch{Key: "k"}); res.Duplicate {
		t.Error("key of a cancelled append was stored")
	}
}

func testDepth(t *testing.T, b Backend) {
	st := open(t, b)
	if _, ok := st.(mailbox.Depther); !ok {
		t.Skip("store does not implement mailbox.Depther")
	}
	depth := func() int64 { return st.(mailbox.Depther).Depth() }
	if got := depth(); got != 0 {
		t.Fatalf("empty store Depth = %d", got)
	}
	// Before every other entry, which are appended "now".
	old := time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC)
	a, c := dev("mia", 1), dev("mia", 2)
	mustAppend(t, st, mailbox.Batch{Time: old, Items: []mailbox.Item{{Device: a, Data: []byte("o")}, {Device: c, Data: []byte("o")}}})
	var seqs []uint64
	for i := range 8 {
		seqs = append(seqs, appendOne(t, st, a, fmt.Sprint(i)))
	}
	mustAppend(t, st, mailbox.Batch{Key: "k", Items: []mailbox.Item{{Device: c, Data: []byte("k")}}})
	mustAppend(t, st, mailbox.Batch{Key: "k", Items: []mailbox.Item{{Device: c, Data: []byte("k")}}}) // duplicate
	if got := depth(); got != 11 {
		t.Fatalf("Depth = %d after 11 entries", got)
	}
	if _, err := st.Delete(ctx, a, []uint64{seqs[0], seqs[1], seqs[2], 9999}); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Delete(ctx, a, []uint64{seqs[0], seqs[1]}); err != nil {
		t.Fatal(err)
	}
	if got := depth(); got != 8 {
		t.Fatalf("Depth = %d after deleting 3, want 8", got)
	}
	if _, err := st.Expire(ctx, old.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if got := depth(); got != 6 {
		t.Fatalf("Depth = %d after expiring 2, want 6", got)
	}
	st = reopen(t, b, st)
	if got := st.(mailbox.Depther).Depth(); got != 6 {
		t.Fatalf("Depth = %d after reopen, want 6", got)
	}
}

func testClosed(t *testing.T, b Backend) {
	st := open(t, b)
	d := dev("nina", 1)
	appendOne(t, st, d, "x")
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Append(ctx, mailbox.Batch{Items: []mailbox.Item{{Device: d, Data: []byte("y")}}}); !errors.Is(err, mailbox.ErrClosed) {
		t.Errorf("Append after Close: %v, want ErrClosed", err)
	}
	if _, err := st.Read(ctx, d, 0, 1); !errors.Is(err, mailbox.ErrClosed) {
		t.Errorf("Read after Close: %v, want ErrClosed", err)
	}
	if _, err := st.Delete(ctx, d, []uint64{1}); !errors.Is(err, mailbox.ErrClosed) {
		t.Errorf("Delete after Close: %v, want ErrClosed", err)
	}
	if _, err := st.Expire(ctx, time.Now()); !errors.Is(err, mailbox.ErrClosed) {
		t.Errorf("Expire after Close: %v, want ErrClosed", err)
	}
	st = open(t, b)
	if got := datas(readAll(t, st, d)); !slices.Equal(got, []string{"x"}) {
		t.Errorf("reopened store holds %v, want [x]", got)
	}
}

func testCrashKeepsAppends(t *testing.T, b Backend) {
	st := open(t, b)
	devs := []ident.Device{dev("olga", 1), dev("olga", 2), dev("pat", 1)}
	type rec struct {
		data    string
		deleted bool
	}
	appended := map[ident.Device]map[uint64]*rec{}
	for _, d := range devs {
		appended[d] = map[uint64]*rec{}
	}
	receipts := map[string]string{}
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 120 {
		items := make([]mailbox.Item, 1+rng.IntN(4))
		for j := range items {
			items[j] = mailbox.Item{Device: devs[rng.IntN(len(devs))], Data: fmt.Appendf(nil, "%d-%d", i, j)}
		}
		key := fmt.Sprint("key-", i)
		receipts[key] = fmt.Sprint("receipt-", i)
		res := mustAppend(t, st, mailbox.Batch{Key: key, Receipt: []byte(receipts[key]), Items: items})
		for j, it := range items {
			appended[it.Device][res.Seqs[j]] = &rec{data: string(it.Data)}
		}
		if i%10 == 9 {
			// Ack a few entries. Deletes need not survive a crash.
			d := devs[rng.IntN(len(devs))]
			es, err := st.Read(ctx, d, 0, 3)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := st.Delete(ctx, d, seqsOf(es)); err != nil {
				t.Fatal(err)
			}
			for _, e := range es {
				appended[d][e.Seq].deleted = true
			}
		}
	}

	st = crash(t, b)

	total := 0
	for _, d := range devs {
		got := map[uint64]bool{}
		for _, e := range readAll(t, st, d) {
			total++
			got[e.Seq] = true
			r, ok := appended[d][e.Seq]
			if !ok {
				t.Errorf("after crash %v holds seq %d, never appended", d, e.Seq)
			} else if string(e.Data) != r.data {
				t.Errorf("after crash %v seq %d holds %q, want %q", d, e.Seq, e.Data, r.data)
			}
		}
		var high uint64
		for seq, r := range appended[d] {
			high = max(high, seq)
			if !r.deleted && !got[seq] {
				t.Errorf("after crash %v lost seq %d (%s)", d, seq, r.data)
			}
		}
		if s := appendOne(t, st, d, "after crash"); s <= high {
			t.Errorf("after crash %v reused seq %d (high was %d)", d, s, high)
		}
		total++
	}
	for key, receipt := range receipts {
		res := mustAppend(t, st, mailbox.Batch{Key: key, Items: []mailbox.Item{{Device: devs[0], Data: []byte("dup")}}})
		if !res.Duplicate || string(res.Receipt) != receipt {
			t.Fatalf("after crash %s: %+v, want duplicate with %s", key, res, receipt)
		}
	}
	if dp, ok := st.(mailbox.Depther); ok && dp.Depth() != int64(total) {
		t.Errorf("after crash Depth = %d, store holds %d", dp.Depth(), total)
	}
}

func testCrashKeepsHighWater(t *testing.T, b Backend) {
	st := open(t, b)
	d := dev("quinn", 1)
	var seqs []uint64
	for i := range 10 {
		seqs = append(seqs, appendOne(t, st, d, fmt.Sprint(i)))
	}
	got, err := st.Delete(ctx, d, seqs)
	if err != nil || len(got) != len(seqs) {
		t.Fatalf("Delete = %d entries, %v", len(got), err)
	}
	// The deletes may or may not survive; the high-water mark must.
	st = crash(t, b)
	for _, e := range readAll(t, st, d) {
		if !slices.Contains(seqs, e.Seq) || !bytes.Equal(e.Data, fmt.Append(nil, slices.Index(seqs, e.Seq))) {
			t.Errorf("after crash holds seq %d %q, not one appended", e.Seq, e.Data)
		}
	}
	next := appendOne(t, st, d, "next")
	if next <= seqs[len(seqs)-1] {
		t.Errorf("after delete-all and crash got seq %d, high was %d", next, seqs[len(seqs)-1])
	}
	// Once more: the high-water mark written after the first crash is
	// durable too.
	st = crash(t, b)
	if s := appendOne(t, st, d, "next2"); s <= next {
		t.Errorf("after second crash got seq %d, want > %d", s, next)
	}
}
