package sqlite

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/accounts/accountstest"
	"github.com/courier-im/courier/internal/ident"
)

func openTemp(t testing.TB) (*Store, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "accounts.db")
	s, err := Open(path, Options{})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return s, path
}

func TestConformance(t *testing.T) {
	accountstest.Run(t, func(t *testing.T) accounts.Store {
		s, _ := openTemp(t)
		return s
	})
}

func TestGroupConformance(t *testing.T) {
	accountstest.RunGroups(t, func(t *testing.T, maxMembers int) accounts.Store {
		s, err := Open(filepath.Join(t.TempDir(), "accounts.db"), Options{MaxGroupMembers: maxMembers})
		if err != nil {
			t.Fatalf("Open: %v", err)
		}
		return s
	})
}

func TestReopen(t *testing.T) {
	ctx := t.Context()
	s, path := openTemp(t)
	cred1, hash1 := accounts.NewCredential()
	u, _, err := s.CreateUser(ctx, "alice", "phone", hash1)
	if err != nil {
		t.Fatal(err)
	}
	cred2, hash2 := accounts.NewCredential()
	d2, err := s.AddDevice(ctx, "alice", "laptop", hash2)
	if err != nil {
		t.Fatal(err)
	}
	_, hash3 := accounts.NewCredential()
	d3, err := s.AddDevice(ctx, "alice", "tablet", hash3)
	if err != nil {
		t.Fatal(err)
	}
	// Remove the newest device: only the stored counter (or row) can tell
	// a reopened store that its id is taken.
	if err := s.RemoveDevice(ctx, ident.Device{User: "alice", ID: d3.ID}); err != nil {
		t.Fatal(err)
	}
	seen := time.UnixMilli(1_900_000_000_123).UTC()
	if err := s.SetLastSeen(ctx, "alice", seen); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}

	s, err = Open(path, Options{})
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	defer s.Close()
	got, err := s.User(ctx, "alice")
	if err != nil {
		t.Fatal(err)
	}
	if !got.Created.Equal(u.Created) || !got.LastSeen.Equal(seen) {
		t.Errorf("User after reopen = %+v, want Created %v LastSeen %v", got, u.Created, seen)
	}
	devs, err := s.Devices(ctx, "alice")
	if err != nil {
		t.Fatal(err)
	}
	if len(devs) != 2 || devs[0].ID != 1 || devs[1].ID != d2.ID || devs[1].Name != "laptop" {
		t.Errorf("Devices after reopen = %+v, want ids [1 %d]", devs, d2.ID)
	}
	for dev, cred := range map[ident.Device]string{{User: "alice", ID: 1}: cred1, {User: "alice", ID: d2.ID}: cred2} {
		h, err := s.CredentialHash(ctx, dev)
		if err != nil || !accounts.CheckCredential(cred, h) {
			t.Errorf("credential of %s does not check out after reopen (err %v)", dev, err)
		}
	}
	if _, err := s.CredentialHash(ctx, ident.Device{User: "alice", ID: d3.ID}); !errors.Is(err, accounts.ErrNotFound) {
		t.Errorf("CredentialHash of removed device after reopen: err %v, want ErrNotFound", err)
	}
	_, hash4 := accounts.NewCredential()
	d4, err := s.AddDevice(ctx, "alice", "watch", hash4)
	if err != nil {
		t.Fatal(err)
	}
	if d4.ID <= d3.ID {
		t.Errorf("AddDevice after reopen gave id %d, want > %d (ids are never reused)", d4.ID, d3.ID)
	}
	if _, _, err := s.CreateUser(ctx, "alice", "x", hash4); !errors.Is(err, accounts.ErrExists) {
		t.Errorf("CreateUser(alice) after reopen: err %v, want ErrExists", err)
	}
}

func TestConnectionSettings(t *testing.T) {
	s, _ := openTemp(t)
	defer s.Close()
	ctx := t.Context()
	check := func(what, query, want string, q func(ctx context.Context, query string) (string, error)) {
		t.Helper()
		got, err := q(ctx, query)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if got != want {
			t.Errorf("%s = %q, want %q", what, got, want)
		}
	}
	w := func(ctx context.Context, query string) (v string, err error) {
		err = s.w.QueryRowContext(ctx, query).Scan(&v)
		return v, err
	}
	r := func(ctx context.Context, query string) (v string, err error) {
		err = s.r.QueryRowContext(ctx, query).Scan(&v)
		return v, err
	}
	check("writer journal_mode", "PRAGMA journal_mode", "wal", w)
	check("writer synchronous", "PRAGMA synchronous", "2", w) // FULL
	check("writer foreign_keys", "PRAGMA foreign_keys", "1", w)
	check("writer busy_timeout", "PRAGMA busy_timeout", strconv.Itoa(int(defaultBusyTimeout.Milliseconds())), w)
	check("reader journal_mode", "PRAGMA journal_mode", "wal", r)
	check("reader query_only", "PRAGMA query_only", "1", r)
	check("reader busy_timeout", "PRAGMA busy_timeout", strconv.Itoa(int(defaultBusyTimeout.Milliseconds())), r)
	check("reader cache_size", "PRAGMA cache_size", strconv.Itoa(-readerCacheKiB), r)
	check("writer cache_size", "PRAGMA cache_size", "-2000", w) // SQLite's default
	if s.w.Stats().MaxOpenConnections != 1 {
		t.Errorf("writer pool allows %d connections, want 1", s.w.Stats().MaxOpenConnections)
	}
	// Foreign keys are enforced: a device cannot name a missing user.
	_, err := s.w.ExecContext(ctx, `INSERT INTO devices (user, id, name, cred_hash, created) VALUES ('ghost', 1, 'x', x'00', 0)`)
	if err == nil {
		t.Error("inserting a device of a missing user succeeded; foreign keys are off")
	}
}

func TestMigrations(t *testing.T) {
	ms, err := migrations()
	if err != nil {
		t.Fatalf("embedded migrations: %v", err)
	}
	s, path := openTemp(t)
	version := func(s *Store) int {
		t.Helper()
		var v int
		if err := s.w.QueryRowContext(t.Context(), "PRAGMA user_version").Scan(&v); err != nil {
			t.Fatal(err)
		}
		return v
	}
	if v := version(s); v != len(ms) {
		t.Errorf("user_version after first Open = %d, want %d", v, len(ms))
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	// Opening again applies nothing and changes nothing.
	s, err = Open(path, Options{})
	if err != nil {
		t.Fatalf("second Open: %v", err)
	}
	if v := version(s); v != len(ms) {
		t.Errorf("user_version after second Open = %d, want %d", v, len(ms))
	}

	// A file from a newer build is refused, not misread.
	if _, err := s.w.ExecContext(t.Context(), fmt.Sprintf("PRAGMA user_version = %d", len(ms)+1)); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if s, err := Open(path, Options{}); err == nil {
		s.Close()
		t.Error("Open of a database with a newer schema version succeeded")
	} else if !strings.Contains(err.Error(), "newer") {
		t.Errorf("Open of a database with a newer schema version: %v, want a version error", err)
	}
}

// TestConcurrentOpens opens the same new file from several Stores at once,
// as several processes might: each migration must be applied exactly once.
func TestConcurrentOpens(t *testing.T) {
	path := filepath.Join(t.TempDir(), "accounts.db")
	const n = 8
	var (
		wg     sync.WaitGroup
		stores [n]*Store
		errs   [n]error
	)
	for i := range n {
		wg.Go(func() { stores[i], errs[i] = Open(path, Options{}) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("Open %d: %v", i, err)
		} else {
			defer stores[i].Close()
		}
	}
}

// TestTwoHandles has two Stores on one file, standing in for two processes:
// writes from both are serialised by SQLite's locks (BEGIN IMMEDIATE and the
// busy timeout) rather than failing with SQLITE_BUSY, and each sees the
// other's writes because nothing is cached.
func TestTwoHandles(t *testing.T) {
	ctx := t.Context()
	a, path := openTemp(t)
	defer a.Close()
	b, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()

	const n = 16
	var (
		wg   sync.WaitGroup
		errs [n]error
	)
	for i := range n {
		s := a
		if i%2 == 1 {
			s = b
		}
		_, hash := accounts.NewCredential()
		wg.Go(func() { _, _, errs[i] = s.CreateUser(ctx, "dave", "dev", hash) })
	}
	wg.Wait()
	wins := 0
	for i, err := range errs {
		switch {
		case err == nil:
			wins++
		case !errors.Is(err, accounts.ErrExists):
			t.Errorf("creator %d: %v", i, err)
		}
	}
	if wins != 1 {
		t.Errorf("%d creators succeeded, want 1", wins)
	}

	ids := make(chan uint32, n)
	for i := range n {
		s := a
		if i%2 == 1 {
			s = b
		}
		_, hash := accounts.NewCredential()
		wg.Go(func() {
			d, err := s.AddDevice(ctx, "dave", "dev", hash)
			if err != nil {
				t.Errorf("AddDevice: %v", err)
				return
			}
			ids <- d.ID
		})
	}
	wg.Wait()
	close(ids)
	seen := map[uint32]bool{}
	for id := range ids {
		if seen[id] {
			t.Errorf("id %d handed out twice", id)
		}
		seen[id] = true
	}
	for _, s := range []*Store{a, b} {
		devs, err := s.Devices(ctx, "dave")
		if err != nil || len(devs) != n+1 {
			t.Errorf("Devices = %d devices, %v; want %d", len(devs), err, n+1)
		}
	}
}

func TestSetLastSeenUnknownUser(t *testing.T) {
	s, _ := openTemp(t)
	defer s.Close()
	if err := s.SetLastSeen(t.Context(), "nobody", time.Now()); !errors.Is(err, accounts.ErrNotFound) {
		t.Errorf("SetLastSeen(unknown) error = %v, want ErrNotFound", err)
	}
}

func TestSetLastSeenZeroClears(t *testing.T) {
	ctx := t.Context()
	s, _ := openTemp(t)
	defer s.Close()
	_, hash := accounts.NewCredential()
	if _, _, err := s.CreateUser(ctx, "alice", "phone", hash); err != nil {
		t.Fatal(err)
	}
	if err := s.SetLastSeen(ctx, "alice", time.Now()); err != nil {
		t.Fatal(err)
	}
	if err := s.SetLastSeen(ctx, "alice", time.Time{}); err != nil {
		t.Fatal(err)
	}
	u, err := s.User(ctx, "alice")
	if err != nil || !u.LastSeen.IsZero() {
		t.Errorf("LastSeen after SetLastSeen(zero) = %v, %v; want zero", u.LastSeen, err)
	}
}

func TestEmptyHashRejected(t *testing.T) {
	ctx := t.Context()
	s, _ := openTemp(t)
	defer s.Close()
	if _, _, err := s.CreateUser(ctx, "alice", "phone", nil); err == nil {
		t.Error("CreateUser with an empty hash succeeded")
	}
	_, hash := accounts.NewCredential()
	if _, _, err := s.CreateUser(ctx, "alice", "phone", hash); err != nil {
		t.Fatal(err)
	}
	if _, err := s.AddDevice(ctx, "alice", "x", []byte{}); err == nil {
		t.Error("AddDevice with an empty hash succeeded")
	}
}

func TestOpenBadPath(t *testing.T) {
	for _, p := range []string{"", ":memory:", filepath.Join(t.TempDir(), "a?b.db"), filepath.Join(t.TempDir(), "missing", "dir", "a.db")} {
		if s, err := Open(p, Options{}); err == nil {
			s.Close()
			t.Errorf("Open(%q) succeeded", p)
		}
	}
}

func TestCloseTwice(t *testing.T) {
	s, _ := openTemp(t)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

// benchStore returns a store holding one user with a few devices, one of
// them removed, like a typical account.
func benchStore(b *testing.B) *Store {
	b.Helper()
	s, _ := openTemp(b)
	b.Cleanup(func() { s.Close() })
	ctx := b.Context()
	_, hash := accounts.NewCredential()
	if _, _, err := s.CreateUser(ctx, "alice", "phone", hash); err != nil {
		b.Fatal(err)
	}
	for i := range 3 {
		if _, err := s.AddDevice(ctx, "alice", fmt.Sprintf("dev%d", i), hash); err != nil {
			b.Fatal(err)
		}
	}
	if err := s.RemoveDevice(ctx, ident.Device{User: "alice", ID: 3}); err != nil {
		b.Fatal(err)
	}
	return s
}

func BenchmarkCredentialHash(b *testing.B) {
	s := benchStore(b)
	ctx := b.Context()
	dev := ident.Device{User: "alice", ID: 2}
	want, err := s.CredentialHash(ctx, dev)
	if err != nil {
		b.Fatal(err)
	}
	b.Run("serial", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			h, err := s.CredentialHash(ctx, dev)
			if err != nil || !bytes.Equal(h, want) {
				b.Fatal(h, err)
			}
		}
	})
	b.Run("parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, err := s.CredentialHash(ctx, dev); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
}

func BenchmarkDevices(b *testing.B) {
	s := benchStore(b)
	ctx := b.Context()
	b.Run("serial", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			devs, err := s.Devices(ctx, "alice")
			if err != nil || len(devs) != 3 {
				b.Fatal(devs, err)
			}
		}
	})
	b.Run("parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, err := s.Devices(ctx, "alice"); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
}

// BenchmarkTakeBundles: see accountstest.BenchTakeBundles.
func BenchmarkTakeBundles(b *testing.B) {
	s, _ := openTemp(b)
	b.Cleanup(func() { s.Close() })
	accountstest.BenchTakeBundles(b, s)
}
