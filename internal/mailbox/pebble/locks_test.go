package pebble

import (
	"fmt"
	"testing"

	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox"
)

// TestKeptHighs checks that a device's high-water mark is read from Pebble
// once, not on every append after its lock entry was dropped, and that
// seqs stay gapless and unique when kept marks are forgotten because more
// devices were written than the table keeps.
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
	// read again, and every device's seqs still continue where they were.
	devs := 64*maxKeptHighs + 500
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
				if seq != round {
					t.Fatalf("device %v round %d got seq %d", items[i].Device, round, seq)
				}
			}
		}
	}
	if got := one(d); got != 6 {
		t.Fatalf("first device after the others: seq %d, want 6", got)
	}
	if n := s.highReads.Load(); n < int64(devs)+2 || n > 2*int64(devs)+2 {
		t.Errorf("high-water marks read %d times, want between %d and %d", n, devs+2, 2*devs+2)
	}
}
