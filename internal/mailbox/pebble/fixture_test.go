package pebble

import (
	"flag"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox"
)

var updateFixture = flag.Bool("update-fixture", false, "rewrite testdata/format-v1 with the current code")

const fixtureDir = "testdata/format-v1"

// The fixture's contents. Some of it is in a flushed sstable, the rest only
// in the WAL, so reading it back exercises both.
var (
	fixAlice = ident.Device{User: "alice", ID: 1}
	fixBob   = ident.Device{User: "bob", ID: 7}
	fixCarol = ident.Device{User: "carol", ID: 2}
	fixT1    = time.Date(2025, 3, 1, 12, 0, 0, 123456789, time.UTC)
	fixT2    = fixT1.Add(time.Minute)
	fixT3    = fixT1.Add(time.Hour)
)

// writeFixture builds the fixture store. Run it with
//
//	go test ./internal/mailbox/pebble -run TestFormatV1Fixture -update-fixture
//
// only when the format deliberately changes (with a new format version and
// a migration): the point of the fixture is that old stores keep opening.
func writeFixture(t *testing.T) {
	if err := os.RemoveAll(fixtureDir); err != nil {
		t.Fatal(err)
	}
	s := mustOpen(t, fixtureDir, Options{MinFreeBytes: -1})
	steps := []mailbox.Batch{
		{Key: "msg-1", Receipt: []byte("rcpt-1"), Time: fixT1, Items: []mailbox.Item{
			{Device: fixAlice, Data: []byte("hello")},
			{Device: fixBob, Data: []byte{0x00, 0xff, 0x10}},
		}},
		{Time: fixT2, Items: []mailbox.Item{
			{Device: fixAlice, Data: []byte("world")},
			{Device: fixAlice, Data: []byte("acked")},
		}},
	}
	for _, b := range steps {
		if _, err := s.Append(ctx, b); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.db.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Delete(ctx, fixAlice, []uint64{3}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Append(ctx, mailbox.Batch{Key: "msg-2", Receipt: []byte("rcpt-2"), Time: fixT3,
		Items: []mailbox.Item{{Device: fixCarol, Data: []byte("in the wal")}}}); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// Pebble's lock file is empty and recreated on open.
	os.Remove(filepath.Join(fixtureDir, "LOCK"))
}

// TestFormatV1Fixture opens a copy of a store written by an earlier version
// of this package and reads everything back.
func TestFormatV1Fixture(t *testing.T) {
	if *updateFixture {
		writeFixture(t)
	}
	dir := t.TempDir()
	if err := os.CopyFS(dir, os.DirFS(fixtureDir)); err != nil {
		t.Fatalf("copying the fixture: %v", err)
	}
	s := mustOpen(t, dir, Options{MinFreeBytes: -1})
	defer s.Close()

	check := func(d ident.Device, want []mailbox.Entry) {
		t.Helper()
		got, err := s.Read(ctx, d, 0, 100)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.EqualFunc(got, want, func(a, b mailbox.Entry) bool {
			return a.Seq == b.Seq && a.Time.Equal(b.Time) && string(a.Data) == string(b.Data)
		}) {
			t.Errorf("%v holds %+v, want %+v", d, got, want)
		}
	}
	check(fixAlice, []mailbox.Entry{{Seq: 1, Time: fixT1, Data: []byte("hello")}, {Seq: 2, Time: fixT2, Data: []byte("world")}})
	check(fixBob, []mailbox.Entry{{Seq: 1, Time: fixT1, Data: []byte{0x00, 0xff, 0x10}}})
	check(fixCarol, []mailbox.Entry{{Seq: 1, Time: fixT3, Data: []byte("in the wal")}})
	if s.Depth() != 4 {
		t.Errorf("Depth = %d, want 4", s.Depth())
	}
	for key, receipt := range map[string]string{"msg-1": "rcpt-1", "msg-2": "rcpt-2"} {
		res, err := s.Append(ctx, mailbox.Batch{Key: key})
		if err != nil || !res.Duplicate || string(res.Receipt) != receipt {
			t.Errorf("key %s: %+v, %v; want duplicate with %s", key, res, err, receipt)
		}
	}
	// The high-water mark: alice.1's deleted seq 3 is not reused.
	res, err := s.Append(ctx, mailbox.Batch{Items: []mailbox.Item{{Device: fixAlice, Data: []byte("new")}}})
	if err != nil || res.Seqs[0] != 4 {
		t.Errorf("next alice.1 append = %+v, %v; want seq 4", res, err)
	}
}
