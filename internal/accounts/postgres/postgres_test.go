package postgres

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/accounts/accountstest"
	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/testenv"
)

// Every store under test lives in its own freshly named schema, dropped when
// the test ends, so that tests may run in parallel, repeatedly, and from
// several processes against one database.

// freshSchema returns an unused schema name and drops that schema (if it was
// created) when t ends, after the cleanups registered later, which close
// the stores using it.
func freshSchema(t testing.TB, pgURL string) string {
	t.Helper()
	var b [8]byte
	rand.Read(b[:])
	name := "courier_test_" + hex.EncodeToString(b[:])
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		conn, err := connect(ctx, pgURL)
		if err != nil {
			t.Errorf("drop schema %s: %v", name, err)
			return
		}
		defer conn.Close(ctx)
		if _, err := conn.Exec(ctx, `DROP SCHEMA IF EXISTS `+pgx.Identifier{name}.Sanitize()+` CASCADE`); err != nil {
			t.Errorf("drop schema %s: %v", name, err)
		}
	})
	return name
}

// connect opens a single connection (no pool) for the tests' own use; it
// takes the URL a store is opened with, pool settings and all.
func connect(ctx context.Context, pgURL string) (*pgx.Conn, error) {
	cfg, err := pgxpool.ParseConfig(pgURL)
	if err != nil {
		return nil, err
	}
	return pgx.ConnectConfig(ctx, cfg.ConnConfig)
}

// openStore opens a store in schema, closed when t ends.
func openStore(t testing.TB, pgURL, schema string) *Store {
	t.Helper()
	s, err := Open(context.Background(), pgURL, Options{Schema: schema})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// serverURL returns the test server's URL with a small connection pool, so
// that many stores open at once (and test processes running side by side)
// stay well below the server's max_connections.
func serverURL(t testing.TB) string {
	t.Helper()
	u := testenv.PostgresURL(t)
	if strings.Contains(u, "pool_max_conns") {
		return u
	}
	if strings.Contains(u, "://") {
		if strings.Contains(u, "?") {
			return u + "&pool_max_conns=4"
		}
		return u + "?pool_max_conns=4"
	}
	return u + " pool_max_conns=4"
}

// newStore opens a store in a fresh schema.
func newStore(t testing.TB) (s *Store, pgURL, schema string) {
	t.Helper()
	pgURL = serverURL(t)
	schema = freshSchema(t, pgURL)
	return openStore(t, pgURL, schema), pgURL, schema
}

// maxOpenSuiteStores bounds the conformance suite's stores open at once (its
// subtests run in parallel, up to -parallel, GOMAXPROCS by default): with
// pools of 4 that is at most 32 connections per test process.
const maxOpenSuiteStores = 8

func TestConformance(t *testing.T) {
	pgURL := serverURL(t)
	slots := make(chan struct{}, maxOpenSuiteStores)
	accountstest.Run(t, func(t *testing.T) accounts.Store {
		slots <- struct{}{}
		// Registered before the suite's Close, so run after it.
		t.Cleanup(func() { <-slots })
		schema := freshSchema(t, pgURL)
		s, err := Open(t.Context(), pgURL, Options{Schema: schema})
		if err != nil {
			t.Fatalf("Open: %v", err)
		}
		return s // the suite closes it, before freshSchema's cleanup drops the schema
	})
}

func TestGroupConformance(t *testing.T) {
	pgURL := serverURL(t)
	slots := make(chan struct{}, maxOpenSuiteStores)
	accountstest.RunGroups(t, func(t *testing.T, maxMembers int) accounts.Store {
		slots <- struct{}{}
		t.Cleanup(func() { <-slots })
		schema := freshSchema(t, pgURL)
		s, err := Open(t.Context(), pgURL, Options{Schema: schema, MaxGroupMembers: maxMembers})
		if err != nil {
			t.Fatalf("Open: %v", err)
		}
		return s
	})
}

// countingHandler counts log records by message.
type countingHandler struct {
	mu     sync.Mutex
	counts map[string]int
}

func (h *countingHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *countingHandler) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h *countingHandler) WithGroup(string) slog.Handler            { return h }
func (h *countingHandler) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	h.counts[r.Message]++
	h.mu.Unlock()
	return nil
}

func (h *countingHandler) count(msg string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.counts[msg]
}

// TestConcurrentOpen opens one new schema from several stores at once, as
// several nodes starting together would: none may fail, and the schema and
// each migration must be created exactly once.
func TestConcurrentOpen(t *testing.T) {
	pgURL := serverURL(t)
	ms, err := migrations()
	if err != nil {
		t.Fatal(err)
	}
	for round := range 5 {
		schema := freshSchema(t, pgURL)
		h := &countingHandler{counts: map[string]int{}}
		log := slog.New(h)
		const n = 4
		var (
			wg     sync.WaitGroup
			start  = make(chan struct{})
			stores [n]*Store
			errs   [n]error
		)
		for i := range n {
			wg.Go(func() {
				<-start
				stores[i], errs[i] = Open(t.Context(), pgURL, Options{Schema: schema, Logger: log})
			})
		}
		close(start)
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Errorf("round %d: Open %d: %v", round, i, err)
			} else {
				t.Cleanup(func() { stores[i].Close() })
			}
		}
		if t.Failed() {
			t.FailNow()
		}
		if got := h.count("created schema"); got != 1 {
			t.Errorf("round %d: schema created %d times, want 1", round, got)
		}
		if got := h.count("applied schema migration"); got != len(ms) {
			t.Errorf("round %d: %d migrations applied in all, want %d (each once)", round, got, len(ms))
		}
		var rows, maxVersion int
		err := stores[0].pool.QueryRow(t.Context(),
			`SELECT count(*), max(version) FROM schema_migrations WHERE component = $1`, component).Scan(&rows, &maxVersion)
		if err != nil || rows != len(ms) || maxVersion != len(ms) {
			t.Errorf("round %d: schema_migrations has %d rows up to version %d (err %v), want %d", round, rows, maxVersion, err, len(ms))
		}
		// All the stores work on the one schema.
		_, hash := accounts.NewCredential()
		if _, _, err := stores[1].CreateUser(t.Context(), "alice", "phone", hash); err != nil {
			t.Fatal(err)
		}
		for i, s := range stores {
			if _, err := s.User(t.Context(), "alice"); err != nil {
				t.Errorf("round %d: store %d: User: %v", round, i, err)
			}
			s.Close()
		}
	}
}

func TestReopen(t *testing.T) {
	ctx := t.Context()
	s, pgURL, schema := newStore(t)
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
	// Remove the newest device: only the stored counter can tell a
	// reopened store that its id is taken.
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

	s = openStore(t, pgURL, schema)
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
	if len(devs) != 2 || devs[0].ID != 1 || devs[1].ID != d2.ID || devs[1].Name != "laptop" || !devs[1].Created.Equal(d2.Created) {
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

// TestUnreachable opens a store on a port nothing listens on: Open must fail
// promptly, saying where it tried to connect, without leaking the password.
func TestUnreachable(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()

	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	start := time.Now()
	s, err := Open(ctx, "postgres://courier:hunter2@"+addr+"/test?sslmode=disable", Options{Schema: "courier_test_unreachable"})
	if err == nil {
		s.Close()
		t.Fatal("Open of an unreachable server succeeded")
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("Open took %v to fail", d)
	}
	msg := err.Error()
	for _, want := range []string{"accounts/postgres: open " + addr + "/test", "connect", "refused"} {
		if !strings.Contains(msg, want) {
			t.Errorf("error %q does not contain %q", msg, want)
		}
	}
	if strings.Contains(msg, "hunter2") {
		t.Errorf("error %q shows the password", msg)
	}
	t.Logf("error: %v", err)
}

func TestOpenBadArguments(t *testing.T) {
	ctx := t.Context()
	for _, tc := range []struct {
		name, url, schema string
	}{
		{"BadURL", "postgres://u:hunter2@h:notaport/db", ""},
		{"BadKeyValue", "host=h password=hunter2 port=x", ""},
		{"SchemaTooLong", "postgres://127.0.0.1:1/db", strings.Repeat("s", maxIdentLen+1)},
		{"SchemaNUL", "postgres://127.0.0.1:1/db", "a\x00b"},
		{"SchemaNotUTF8", "postgres://127.0.0.1:1/db", "a\xffb"},
	} {
		if s, err := Open(ctx, tc.url, Options{Schema: tc.schema}); err == nil {
			s.Close()
			t.Errorf("%s: Open succeeded", tc.name)
		} else if !strings.HasPrefix(err.Error(), "accounts/postgres: open") {
			t.Errorf("%s: error %q lacks the package prefix", tc.name, err)
		} else if strings.Contains(err.Error(), "hunter2") {
			t.Errorf("%s: error %q shows the password", tc.name, err)
		}
	}
}

// TestSearchPath checks that every pooled connection, not only the first,
// sees the store's schema alone, and that the tables are there.
func TestSearchPath(t *testing.T) {
	s, _, schema := newStore(t)
	ctx := t.Context()
	// Hold every connection the pool allows at once, so that each is a
	// different one.
	n := int(s.pool.Config().MaxConns)
	conns := make([]interface{ Release() }, 0, n)
	release := func() {
		for _, c := range conns {
			c.Release()
		}
		conns = nil
	}
	defer release()
	for i := range n {
		c, err := s.pool.Acquire(ctx)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		var path, cur string
		if err := c.QueryRow(ctx, `SELECT current_setting('search_path'), current_schema()`).Scan(&path, &cur); err != nil {
			t.Fatal(err)
		}
		if want := (pgx.Identifier{schema}).Sanitize(); path != want && path != schema || cur != schema {
			t.Errorf("connection %d: search_path %q, current_schema %q; want %s", i, path, cur, schema)
		}
	}
	release()
	rows, _ := s.pool.Query(ctx, `SELECT table_name FROM information_schema.tables WHERE table_schema = $1 ORDER BY 1`, schema)
	tables, err := pgx.CollectRows(rows, pgx.RowTo[string]) // reports Query's error too
	if err != nil {
		t.Fatal(err)
	}
	if got, want := strings.Join(tables, ","), "device_keys,devices,group_members,groups,one_time_prekeys,schema_migrations,users"; got != want {
		t.Errorf("tables in %s = %s, want %s", schema, got, want)
	}
}

// TestSchemaFromSearchPath opens without Options.Schema: the tables go to
// the first existing schema on the URL's search_path, and a search_path
// naming no existing schema is a clear error.
func TestSchemaFromSearchPath(t *testing.T) {
	pgURL := serverURL(t)
	ctx := t.Context()
	schema := freshSchema(t, pgURL)
	withPath := func(path string) string {
		u, err := url.Parse(pgURL)
		if err != nil {
			t.Skipf("%s is not a URL: %v", testenv.PostgresEnv, err)
		}
		q := u.Query()
		q.Set("options", "-c search_path="+path)
		u.RawQuery = q.Encode()
		return u.String()
	}

	missing := schema + "_missing"
	if s, err := Open(ctx, withPath(missing), Options{}); err == nil {
		s.Close()
		t.Error("Open with no existing schema on the search_path succeeded")
	} else if !strings.Contains(err.Error(), "no schema on the search_path") {
		t.Errorf("Open with no existing schema on the search_path: %v", err)
	}

	conn, err := connect(ctx, pgURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, `CREATE SCHEMA `+schema); err != nil {
		t.Fatal(err)
	}
	s, err := Open(ctx, withPath(missing+","+schema), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	_, hash := accounts.NewCredential()
	if _, _, err := s.CreateUser(ctx, "alice", "phone", hash); err != nil {
		t.Fatal(err)
	}
	var n int
	if err := conn.QueryRow(ctx, `SELECT count(*) FROM `+schema+`.users`).Scan(&n); err != nil || n != 1 {
		t.Errorf("%s.users has %d rows (err %v), want 1", schema, n, err)
	}
}

func TestMigrations(t *testing.T) {
	ms, err := migrations()
	if err != nil {
		t.Fatalf("embedded migrations: %v", err)
	}
	s, pgURL, schema := newStore(t)
	ctx := t.Context()
	version := func() int {
		t.Helper()
		var v int
		if err := s.pool.QueryRow(ctx, `SELECT max(version) FROM schema_migrations WHERE component = $1`, component).Scan(&v); err != nil {
			t.Fatal(err)
		}
		return v
	}
	if v := version(); v != len(ms) {
		t.Errorf("version after first Open = %d, want %d", v, len(ms))
	}

	// Another component's versions in the shared table do not matter.
	if _, err := s.pool.Exec(ctx, `INSERT INTO schema_migrations (component, version, name)
		SELECT 'othercomponent', v, 'x' FROM generate_series(1, $1::int) v`, len(ms)+5); err != nil {
		t.Fatal(err)
	}
	s2 := openStore(t, pgURL, schema)
	s2.Close()
	if v := version(); v != len(ms) {
		t.Errorf("version after second Open = %d, want %d", v, len(ms))
	}

	// A schema from a newer build is refused, not misread.
	if _, err := s.pool.Exec(ctx, `INSERT INTO schema_migrations (component, version, name) VALUES ($1, $2, 'future')`,
		component, len(ms)+1); err != nil {
		t.Fatal(err)
	}
	if s3, err := Open(ctx, pgURL, Options{Schema: schema}); err == nil {
		s3.Close()
		t.Error("Open of a schema with a newer version succeeded")
	} else if !strings.Contains(err.Error(), "newer") {
		t.Errorf("Open of a schema with a newer version: %v, want a version error", err)
	}
}

// TestTwoStores has two Stores on one schema, standing in for two nodes:
// their writes are serialised by the database and each sees the other's.
func TestTwoStores(t *testing.T) {
	ctx := t.Context()
	a, pgURL, schema := newStore(t)
	b := openStore(t, pgURL, schema)

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
	s, _, _ := newStore(t)
	for _, name := range []string{"nobody", "Not A Name", "nul\x00"} {
		if err := s.SetLastSeen(t.Context(), name, time.Now()); !errors.Is(err, accounts.ErrNotFound) {
			t.Errorf("SetLastSeen(%q) error = %v, want ErrNotFound", name, err)
		}
	}
}

func TestSetLastSeenZeroClears(t *testing.T) {
	ctx := t.Context()
	s, _, _ := newStore(t)
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

// TestMillisecondPrecision checks that times are truncated, not rounded, to
// the millisecond on the way in (PostgreSQL would keep microseconds), and
// that the store's own timestamps are whole milliseconds too.
func TestMillisecondPrecision(t *testing.T) {
	ctx := t.Context()
	s, _, _ := newStore(t)
	_, hash := accounts.NewCredential()
	u, d, err := s.CreateUser(ctx, "alice", "phone", hash)
	if err != nil {
		t.Fatal(err)
	}
	d2, err := s.AddDevice(ctx, "alice", "laptop", hash)
	if err != nil {
		t.Fatal(err)
	}
	for what, ts := range map[string]time.Time{"User.Created": u.Created, "Device.Created": d.Created, "AddDevice Created": d2.Created} {
		if ts.Nanosecond()%int(time.Millisecond) != 0 {
			t.Errorf("%s = %v has sub-millisecond digits", what, ts)
		}
	}
	t1 := time.Date(2030, 1, 2, 3, 4, 5, 678_999_999, time.UTC)
	if err := s.SetLastSeen(ctx, "alice", t1); err != nil {
		t.Fatal(err)
	}
	got, err := s.User(ctx, "alice")
	if want := time.Date(2030, 1, 2, 3, 4, 5, 678_000_000, time.UTC); err != nil || got.LastSeen != want {
		t.Errorf("LastSeen = %v, %v; want exactly %v", got.LastSeen, err, want)
	}
}

func TestEmptyHashRejected(t *testing.T) {
	ctx := t.Context()
	s, _, _ := newStore(t)
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

// TestDeviceNames: any text PostgreSQL can store is kept as given; what it
// cannot (NUL, invalid UTF-8) is refused before reaching it.
func TestDeviceNames(t *testing.T) {
	ctx := t.Context()
	s, _, _ := newStore(t)
	_, hash := accounts.NewCredential()
	if _, _, err := s.CreateUser(ctx, "alice", "Ålice's phone 📱 'quoted' \"x\"", hash); err != nil {
		t.Fatal(err)
	}
	if devs, err := s.Devices(ctx, "alice"); err != nil || len(devs) != 1 || devs[0].Name != "Ålice's phone 📱 'quoted' \"x\"" {
		t.Errorf("Devices = %+v, %v", devs, err)
	}
	for _, name := range []string{"nul\x00", "bad\xff"} {
		if _, _, err := s.CreateUser(ctx, "bob", name, hash); !errors.Is(err, errBadDeviceName) {
			t.Errorf("CreateUser with device name %q: %v, want errBadDeviceName", name, err)
		}
		if _, err := s.AddDevice(ctx, "alice", name, hash); !errors.Is(err, errBadDeviceName) {
			t.Errorf("AddDevice with device name %q: %v, want errBadDeviceName", name, err)
		}
	}
	if _, err := s.User(ctx, "bob"); !errors.Is(err, accounts.ErrNotFound) {
		t.Errorf("a refused CreateUser created the user: %v", err)
	}
}

// TestUnstorableNamesNotFound: names no account can have are not found,
// rather than being sent to the server to fail there (NUL is not text).
func TestUnstorableNamesNotFound(t *testing.T) {
	ctx := t.Context()
	s, _, _ := newStore(t)
	_, hash := accounts.NewCredential()
	if _, _, err := s.CreateUser(ctx, "alice", "phone", hash); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"alice\x00", "\xff", "Alice", ""} {
		dev := ident.Device{User: name, ID: 1}
		checks := map[string]error{
			"User":           func() error { _, err := s.User(ctx, name); return err }(),
			"Devices":        func() error { _, err := s.Devices(ctx, name); return err }(),
			"AddDevice":      func() error { _, err := s.AddDevice(ctx, name, "x", hash); return err }(),
			"CredentialHash": func() error { _, err := s.CredentialHash(ctx, dev); return err }(),
			"RemoveDevice":   s.RemoveDevice(ctx, dev),
		}
		for what, err := range checks {
			if !errors.Is(err, accounts.ErrNotFound) {
				t.Errorf("%s(%q) error = %v, want ErrNotFound", what, name, err)
			}
		}
	}
}

// TestDeviceIDBounds: ids go up to the largest uint32, and then AddDevice
// fails cleanly instead of wrapping around.
func TestDeviceIDBounds(t *testing.T) {
	ctx := t.Context()
	s, _, _ := newStore(t)
	_, hash := accounts.NewCredential()
	if _, _, err := s.CreateUser(ctx, "alice", "phone", hash); err != nil {
		t.Fatal(err)
	}
	if _, err := s.pool.Exec(ctx, `UPDATE users SET next_device_id = $1 WHERE name = 'alice'`, int64(math.MaxUint32)); err != nil {
		t.Fatal(err)
	}
	d, err := s.AddDevice(ctx, "alice", "last", hash)
	if err != nil || d.ID != math.MaxUint32 {
		t.Fatalf("AddDevice = %+v, %v; want id %d", d, err, uint32(math.MaxUint32))
	}
	if d, err := s.AddDevice(ctx, "alice", "one too many", hash); !errors.Is(err, errIDsExhausted) {
		t.Errorf("AddDevice past the last id = %+v, %v; want errIDsExhausted", d, err)
	}
	devs, err := s.Devices(ctx, "alice")
	if err != nil || len(devs) != 2 || devs[1].ID != math.MaxUint32 {
		t.Errorf("Devices = %+v, %v", devs, err)
	}
}

func TestCloseTwice(t *testing.T) {
	s, _, _ := newStore(t)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := s.User(t.Context(), "alice"); err == nil {
		t.Error("User after Close succeeded")
	}
}

// TestMigrationLockKey: the key depends on the schema, and is stable (other
// components and older builds must compute the same one).
func TestMigrationLockKey(t *testing.T) {
	if migrationLockKey("a") == migrationLockKey("b") {
		t.Error("lock keys of schemas a and b are equal")
	}
	if got, want := migrationLockKey("public"), int64(0x4a751b33aca272); got != want {
		t.Errorf("migrationLockKey(public) = %#x, want %#x", got, want)
	}
}

// benchStore returns a store holding one user with a few devices, one of
// them removed, like a typical account.
func benchStore(b *testing.B) *Store {
	b.Helper()
	s, _, _ := newStore(b)
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
	s, _, _ := newStore(b)
	accountstest.BenchTakeBundles(b, s)
}
