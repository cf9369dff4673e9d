package ident

import (
	"strings"
	"testing"
	"time"
)

func TestValidUser(t *testing.T) {
	for _, ok := range []string{"a", "bob", "alice_1", "x-y", "9lives", strings.Repeat("a", 32)} {
		if !ValidUser(ok) {
			t.Errorf("%q rejected", ok)
		}
	}
	for _, bad := range []string{"", "Bob", "_bob", "-x", "a.b", "a b", "ä", strings.Repeat("a", 33), "a/b"} {
		if ValidUser(bad) {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestParseDevice(t *testing.T) {
	d, err := ParseDevice("alice.12")
	if err != nil || d != (Device{User: "alice", ID: 12}) || d.String() != "alice.12" {
		t.Fatalf("got %v, %v", d, err)
	}
	for _, bad := range []string{"alice", "alice.", "alice.0", ".1", "Alice.1", "alice.-1", "alice.4294967296", "a.b.1", "alice.01", "0.0001"} {
		if _, err := ParseDevice(bad); err == nil {
			t.Errorf("%q parsed", bad)
		}
	}
}

func TestServerIDs(t *testing.T) {
	var g ServerIDs
	seen := map[string]bool{}
	t0 := time.UnixMilli(1_700_000_000_000)
	prev := ""
	for i := range 10000 {
		id := g.New(t0.Add(time.Duration(i) * time.Millisecond))
		if len(id) != 26 || strings.Trim(id, crockford) != "" {
			t.Fatalf("malformed id %q", id)
		}
		if seen[id] {
			t.Fatalf("duplicate id %q", id)
		}
		seen[id] = true
		if id[:10] < prev {
			t.Fatalf("ids do not sort by time: %q after %q", id, prev)
		}
		prev = id[:10]
	}
}
