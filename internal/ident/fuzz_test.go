package ident

import (
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// userPattern is the naming rule of docs/protocol.md, written independently
// of ValidUser so that each checks the other.
var userPattern = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,31}$`)

// The seeds of the fuzz tests (also committed in testdata/fuzz).
var (
	validUserSeeds = []string{"alice", "bob", "a", "9lives", "x-y_z", strings.Repeat("z", MaxUserLen),
		"", "Bob", "_bob", "-x", "a.b", "a b", "ä", strings.Repeat("a", MaxUserLen+1), "a/b", "a\x00"}
	parseDeviceSeeds = []string{"alice.1", "bob.2", "alice.12", "a.4294967295", "9lives.7",
		"alice", "alice.", "alice.0", ".1", "Alice.1", "alice.-1", "alice.4294967296", "a.b.1", "alice.01", "alice.+1"}
)

// FuzzValidUser checks ValidUser against the documented rule.
func FuzzValidUser(f *testing.F) {
	for _, s := range validUserSeeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if got, want := ValidUser(s), userPattern.MatchString(s); got != want {
			t.Fatalf("ValidUser(%q) = %v, the documented rule says %v", s, got, want)
		}
	})
}

// FuzzParseDevice checks that ParseDevice accepts exactly the canonical
// "user.id" form that Device.String writes: one spelling per device, so
// that nothing keyed by the text (rate limits, logs) can be dodged by
// writing the same device another way.
func FuzzParseDevice(f *testing.F) {
	for _, s := range parseDeviceSeeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		d, err := ParseDevice(s)
		if err != nil {
			if d != (Device{}) {
				t.Fatalf("ParseDevice(%q) failed (%v) but returned %v", s, err, d)
			}
			return
		}
		if !ValidUser(d.User) || d.ID == 0 {
			t.Fatalf("ParseDevice(%q) = %#v: not a valid device", s, d)
		}
		if d.String() != s {
			t.Fatalf("ParseDevice(%q) = %v, whose canonical form %q differs", s, d, d.String())
		}
		// The round trip the other way.
		if again, err := ParseDevice(d.String()); err != nil || again != d {
			t.Fatalf("ParseDevice(%q) = %v, %v; want %v", d.String(), again, err, d)
		}
		if want := s[:strings.LastIndexByte(s, '.')] + "." + strconv.FormatUint(uint64(d.ID), 10); want != s {
			t.Fatalf("ParseDevice(%q) accepted a non-canonical id", s)
		}
	})
}
