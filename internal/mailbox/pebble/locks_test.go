package pebble

import (
	"encoding/binary"
	"fmt"
	"testing"

	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox"
)

// TestKeptHighs checks that a device's high-water mark is read from Pebble
// once, not on every append after its lock entry was dropped, and that
// seqs stay unique and increasing, gapless while a mark is kept, when kept
// marks are forgotten because more devices were written than the table
// keeps.
func TestKeptHighs(t *testing.T) {
	s := mustOpen(t, t.TempDir(), Options{MinFreeBytes: -1})
	defer s.Close()
	one := func(d ident.Device) uint64 {
		t.Helper()
		r, err := s.Append(ctx, mailbox.Batch{Items: []mailbox.Item{{Device: d, Data: []byte("x")}}})
		if err != nil {
			t.Fatal(err)
		}
		return r.Seqs[0]
	}
	d := ident.Device{User: "kim", ID: 1}
	for want := uint64(1); want <= 5; want++ {
		if got := one(d); got != want {
			t.Fatalf("append %d got seq %d", want, got)
		}
	}
	if n := s.highReads.Load(); n != 1 {
		t.Errorf("high-water marks read %d times for 5 appends to one device, want 1", n)
	}

	// More devices than all shards keep: some marks are forgotten and
	// read again, and every device's seqs still go on: from where they
	// were if its mark was kept, else from its stored mark, which is at
	// most seqReserve ahead.
	devs := 64*maxKeptHighs + 500
	last := make([]uint64, devs)
	for round := uint64(1); round <= 2; round++ {
		for lo := 0; lo < devs; lo += 1024 {
			var items []mailbox.Item
			for i := lo; i < min(lo+1024, devs); i++ {
				items = append(items, mailbox.Item{Device: ident.Device{User: fmt.Sprintf("u%d", i), ID: 2}, Data: []byte("x")})
			}
			r, err := s.Append(ctx, mailbox.Batch{Items: items})
			if err != nil {
				t.Fatal(err)
			}
			for i, seq := range r.Seqs {
				if prev := last[lo+i]; seq <= prev || seq > prev+1+seqReserve || round == 1 && seq != 1 {
					t.Fatalf("device %v round %d got seq %d after %d", items[i].Device, round, seq, prev)
				}
				last[lo+i] = seq
			}
		}
	}
	if got := one(d); got != 6 && got != 2+seqReserve {
		t.Fatalf("first device after the others: seq %d, want 6 (mark kept) or %d (read back)", got, 2+seqReserve)
	}
	if n := s.highReads.Load(); n < int64(devs)+2 || n > 2*int64(devs)+2 {
		t.Errorf("high-water marks read %d times, want between %d and %d", n, devs+2, 2*devs+2)
	}
}

// TestHighWaterMarkAhead checks that a device's high-water mark is written
// seqReserve past the seqs taken, once per seqReserve+1 of them, and that
// after a crash seqs go on past the stored mark, never reusing one taken
// before.
func TestHighWaterMarkAhead(t *testing.T) {
	mem := vfs.NewCrashableMem()
	s := mustOpen(t, "db", Options{FS: mem, MinFreeBytes: -1})
	d := ident.Device{User: "kim", ID: 1}
	devID, _ := deviceID(d)
	stored := func(s *Store) uint64 {
		t.Helper()
		v, closer, err := s.db.Get(highKey(devID))
		if err != nil {
			t.Fatal(err)
		}
		defer closer.Close()
		return binary.BigEndian.Uint64(v)
	}
	const n = 2*(seqReserve+1) + 10
	for want := uint64(1); want <= n; want++ {
		r, err := s.Append(ctx, mailbox.Batch{Items: []mailbox.Item{{Device: d, Data: []byte("x")}}})
		if err != nil || r.Seqs[0] != want {
			t.Fatalf("append %d: %+v, %v", want, r, err)
		}
		// Written with seqs 1, 2+seqReserve, 3+2*seqReserve, ...
		if got, mark := stored(s), ((want-1)/(seqReserve+1)+1)*(seqReserve+1); got != mark {
			t.Fatalf("after seq %d the stored mark is %d, want %d", want, got, mark)
		}
	}
	// A crash: the store reopens from what was synced.
	mark := stored(s)
	crashed := mem.CrashClone(vfs.CrashCloneCfg{})
	s.Close()
	s = mustOpen(t, "db", Options{FS: crashed, MinFreeBytes: -1})
	defer s.Close()
	r, err := s.Append(ctx, mailbox.Batch{Items: []mailbox.Item{{Device: d, Data: []byte("y")}}})
	if err != nil || r.Seqs[0] != mark+1 {
		t.Fatalf("first append after the crash: %+v, %v; want seq %d", r, err, mark+1)
	}
	if got := stored(s); got != mark+1+seqReserve {
		t.Errorf("stored mark after it: %d, want %d", got, mark+1+seqReserve)
	}
}
