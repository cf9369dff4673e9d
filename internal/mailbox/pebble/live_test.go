package pebble

import (
	"fmt"
	"runtime"
	"testing"

	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox"
)

// TestLiveSkipsReads: an ack that needs only the seqs does not read the
// entries this store appended, as far as LiveEntries lets it remember
// them; entries it does not know (too many, written before it opened, or
// the set off) are read as before.
func TestLiveSkipsReads(t *testing.T) {
	rcpt := ident.Device{User: "lena", ID: 1}
	appendN := func(t *testing.T, s *Store, n int) []uint64 {
		items := make([]mailbox.Item, n)
		for i := range items {
			items[i] = mailbox.Item{Device: rcpt, Data: fmt.Append(nil, i)}
		}
		res, err := s.Append(ctx, mailbox.Batch{Items: items})
		if err != nil {
			t.Fatal(err)
		}
		return res.Seqs
	}
	ack := func(t *testing.T, s *Store, seqs []uint64) int {
		removed, p, err := s.StartDeleteAppend(ctx, mailbox.DeleteAppend{Device: rcpt, Seqs: seqs, SeqsOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := p.Wait(ctx); err != nil {
			t.Fatal(err)
		}
		return len(removed)
	}
	for _, tc := range []struct {
		name      string
		live      int
		wantReads int64
	}{
		{"default", 0, 0},
		{"bounded", 3, 5},
		{"off", -1, 8},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := mustOpen(t, "db", Options{FS: vfs.NewMem(), LiveEntries: tc.live})
			defer s.Close()
			seqs := appendN(t, s, 8)
			if got := ack(t, s, seqs); got != 8 {
				t.Fatalf("removed %d of 8", got)
			}
			if got := s.entryReads.Load(); got != tc.wantReads {
				t.Fatalf("%d entries read, want %d", got, tc.wantReads)
			}
			if n := s.live.len(); n != 0 {
				t.Fatalf("%d entries left in the set, want none", n)
			}
			// Acked again: not in the set, so read, and found gone.
			if got := ack(t, s, seqs); got != 0 {
				t.Fatalf("second ack removed %d", got)
			}
		})
	}

	t.Run("reopened", func(t *testing.T) {
		fs := vfs.NewMem()
		s := mustOpen(t, "db", Options{FS: fs})
		seqs := appendN(t, s, 4)
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		s = mustOpen(t, "db", Options{FS: fs})
		defer s.Close()
		if got := ack(t, s, seqs); got != 4 {
			t.Fatalf("removed %d of 4", got)
		}
		if got := s.entryReads.Load(); got != 4 {
			t.Fatalf("%d entries read, want the 4 appended before the store opened", got)
		}
	})

	t.Run("entries needed", func(t *testing.T) {
		s := mustOpen(t, "db", Options{FS: vfs.NewMem()})
		defer s.Close()
		seqs := appendN(t, s, 2)
		got, err := s.Delete(ctx, rcpt, seqs)
		if err != nil || len(got) != 2 || string(got[1].Data) != "1" {
			t.Fatalf("Delete = %v, %v; want both entries with their data", got, err)
		}
		if n := s.live.len(); n != 0 {
			t.Fatalf("%d entries left in the set after Delete, want none", n)
		}
	})
}

// BenchmarkAckSeqsOnly measures acks of single entries appended before
// (not timed), with the entries known present or read.
func BenchmarkAckSeqsOnly(b *testing.B) {
	for _, live := range []int{1 << 30, -1} {
		b.Run(map[int]string{1 << 30: "live", -1: "read"}[live], func(b *testing.B) {
			s := mustOpen(b, b.TempDir(), Options{LiveEntries: live, MinFreeBytes: -1})
			defer s.Close()
			rcpt := ident.Device{User: "lena", ID: 1}
			data := make([]byte, 120)
			items := make([]mailbox.Item, 1000)
			for i := range items {
				items[i] = mailbox.Item{Device: rcpt, Data: data}
			}
			var seqs []uint64
			for len(seqs) < b.N {
				res, err := s.Append(ctx, mailbox.Batch{Items: items[:min(len(items), b.N-len(seqs))]})
				if err != nil {
					b.Fatal(err)
				}
				seqs = append(seqs, res.Seqs...)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for i := range b.N {
				removed, p, err := s.StartDeleteAppend(ctx, mailbox.DeleteAppend{Device: rcpt, Seqs: seqs[i : i+1], SeqsOnly: true})
				if err != nil || len(removed) != 1 {
					b.Fatal(removed, err)
				}
				if _, err := p.Wait(ctx); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkLiveSetMemory reports the heap a full live set of
// DefaultLiveEntries holds (the figure behind the default).
func BenchmarkLiveSetMemory(b *testing.B) {
	dev := string([]byte{5, 'a', 'l', 'i', 'c', 'e', 0, 0, 0, 1})
	var held uint64
	for b.Loop() {
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		l := newLiveSet(DefaultLiveEntries)
		l.add(dev, 1, DefaultLiveEntries)
		runtime.GC()
		runtime.ReadMemStats(&after)
		if l.len() != DefaultLiveEntries {
			b.Fatalf("%d entries, want %d", l.len(), DefaultLiveEntries)
		}
		held = after.HeapAlloc - before.HeapAlloc
		runtime.KeepAlive(l)
	}
	b.ReportMetric(float64(held)/(1<<20), "MiB")
	b.ReportMetric(float64(held)/DefaultLiveEntries, "B/entry")
}
