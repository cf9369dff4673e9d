package pebble

import (
	"bytes"
	"log/slog"
	"strings"
	"sync"
	"testing"

	pebbledb "github.com/cockroachdb/pebble/v2"

	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox"
)

// logBuffer is a slog destination a test can search.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestSingleDeleteAcrossFlushes checks that entries deleted with single
// deletes stay deleted whichever way an entry and its deletion are split
// between the memtable and sstables, through flushes, a full compaction and
// a reopen, and that Pebble reports no misuse of single deletes on the way.
func TestSingleDeleteAcrossFlushes(t *testing.T) {
	dir := t.TempDir()
	var logs logBuffer
	log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
	s := mustOpen(t, dir, Options{Logger: log, MinFreeBytes: -1})
	dev := ident.Device{User: "dora", ID: 3}
	appendN := func(n int) {
		t.Helper()
		items := make([]mailbox.Item, n)
		for i := range items {
			items[i] = mailbox.Item{Device: dev, Data: []byte("entry")}
		}
		if _, err := s.Append(ctx, mailbox.Batch{Items: items}); err != nil {
			t.Fatal(err)
		}
	}
	del := func(from, to uint64) {
		t.Helper()
		var seqs []uint64
		for q := from; q <= to; q++ {
			seqs = append(seqs, q)
		}
		got, err := s.Delete(ctx, dev, seqs)
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != len(seqs) {
			t.Fatalf("Delete(%d..%d) removed %d entries, want %d", from, to, len(got), len(seqs))
		}
	}
	flush := func() {
		t.Helper()
		if err := s.db.Flush(); err != nil {
			t.Fatal(err)
		}
	}

	appendN(200) // seqs 1..200, in an sstable after the flush
	flush()
	del(1, 100) // deletions in the memtable over entries in an sstable
	flush()
	appendN(50)   // 201..250 in the memtable
	del(101, 150) // over the sstable again
	del(201, 225) // an entry and its deletion in one memtable
	flush()
	// Deleting again what is gone finds nothing and writes nothing.
	if got, err := s.Delete(ctx, dev, []uint64{1, 150, 201}); err != nil || len(got) != 0 {
		t.Fatalf("second delete: %d entries, %v", len(got), err)
	}
	if err := s.db.Compact(ctx, []byte{0}, []byte{0xff}, false); err != nil {
		t.Fatal(err)
	}

	want := func(s *Store) {
		t.Helper()
		es, err := s.Read(ctx, dev, 0, 1000)
		if err != nil {
			t.Fatal(err)
		}
		var seqs []uint64
		for _, e := range es {
			seqs = append(seqs, e.Seq)
		}
		var exp []uint64
		for q := uint64(151); q <= 200; q++ {
			exp = append(exp, q)
		}
		for q := uint64(226); q <= 250; q++ {
			exp = append(exp, q)
		}
		if len(seqs) != len(exp) {
			t.Fatalf("read %d entries %v, want %d", len(seqs), seqs, len(exp))
		}
		for i := range exp {
			if seqs[i] != exp[i] {
				t.Fatalf("entry %d is seq %d, want %d", i, seqs[i], exp[i])
			}
		}
	}
	want(s)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = mustOpen(t, dir, Options{Logger: log, MinFreeBytes: -1})
	defer s.Close()
	want(s)
	if got := s.Depth(); got != 75 {
		t.Errorf("depth after reopen = %d, want 75", got)
	}
	if strings.Contains(logs.String(), "misuse") {
		t.Errorf("Pebble reported a misuse:\n%s", logs.String())
	}
}

// TestSingleDeleteMisuseLogged checks that the store's event listener does
// report a broken single-delete assumption (a key set twice, then single
// deleted, all three met by one flush), so that the check in
// TestSingleDeleteAcrossFlushes can fail.
func TestSingleDeleteMisuseLogged(t *testing.T) {
	var logs logBuffer
	log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
	s := mustOpen(t, t.TempDir(), Options{Logger: log, MinFreeBytes: -1})
	defer s.Close()
	k := []byte("x-twice")
	for _, v := range []string{"a", "b"} {
		if err := s.db.Set(k, []byte(v), pebbledb.NoSync); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.db.SingleDelete(k, pebbledb.NoSync); err != nil {
		t.Fatal(err)
	}
	if err := s.db.Flush(); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logs.String(), "misuse") {
		t.Fatalf("no misuse logged for a key set twice and single-deleted; log:\n%s", logs.String())
	}
}
