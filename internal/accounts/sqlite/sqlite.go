// Package sqlite is the single-node account store: one SQLite database file,
// accessed through the pure-Go modernc.org/sqlite driver.
//
// The file runs in WAL mode so that readers never block the writer or each
// other. A Store keeps two connection pools on the file: one connection for
// all writes, which serialises writers inside the process without ever
// seeing SQLITE_BUSY, and several query-only connections for the read path
// (CredentialHash, Devices and User are called for every connection a client
// makes). Write transactions start with BEGIN IMMEDIATE and every connection
// has a busy timeout, so another process on the same file is waited for
// rather than failing the call.
//
// Nothing is cached in memory: every call reads the file, so several
// processes may share it.
package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net/url"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	_ "modernc.org/sqlite" // registers the "sqlite" database/sql driver

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/ident"
)

var _ accounts.Store = (*Store)(nil)

// Options configures Open. The zero value is ready to use.
type Options struct {
	// Logger receives lifecycle and schema migration messages. Nil discards
	// them.
	Logger *slog.Logger
	// BusyTimeout is how long a statement waits for a lock held by another
	// connection to the file (in practice another process) before failing.
	// Zero means 5 seconds.
	BusyTimeout time.Duration
	// MaxReaders caps the read-only connections. Zero means the larger of 4
	// and GOMAXPROCS.
	MaxReaders int
	// MaxGroupMembers caps a group's members (accounts.GroupStore). Zero
	// means accounts.DefaultMaxGroupMembers.
	MaxGroupMembers int
}

const defaultBusyTimeout = 5 * time.Second

// Store is an accounts.Store kept in a SQLite file. It is safe for
// concurrent use.
type Store struct {
	log *slog.Logger
	w   *sql.DB // exactly one connection; every write goes through it
	r   *sql.DB // query_only connections for the read path

	maxGroupMembers int

	// Read statements, prepared on r.
	getUser     *sql.Stmt
	listDevices *sql.Stmt
	getCredHash *sql.Stmt

	// Write statements, prepared on w.
	insUser     *sql.Stmt
	takeID      *sql.Stmt
	insDevice   *sql.Stmt
	rmDevice    *sql.Stmt
	setLastSeen *sql.Stmt

	closeOnce sync.Once
	closeErr  error
}

// Open opens the account database at path, creating the file if needed and
// bringing its schema up to date. path is a file name; in-memory databases
// are not supported because the reader and writer pools must share a file.
func Open(path string, opts Options) (*Store, error) {
	if path == "" || path == ":memory:" {
		return nil, fmt.Errorf("accounts/sqlite: open %q: need a file path", path)
	}
	// The driver takes everything after the first '?' as its parameters.
	if strings.ContainsRune(path, '?') {
		return nil, fmt.Errorf("accounts/sqlite: open %q: path must not contain '?'", path)
	}
	// With the driver's SQLITE_OPEN_URI flag a name starting with "file:" is
	// parsed as a URI; keep it an ordinary relative path.
	if strings.HasPrefix(path, "file:") {
		path = "./" + path
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	busy := opts.BusyTimeout
	if busy <= 0 {
		busy = defaultBusyTimeout
	}
	readers := opts.MaxReaders
	if readers <= 0 {
		readers = max(4, runtime.GOMAXPROCS(0))
	}

	s := &Store{log: log, maxGroupMembers: opts.MaxGroupMembers}
	if s.maxGroupMembers <= 0 {
		s.maxGroupMembers = accounts.DefaultMaxGroupMembers
	}
	ok := false
	defer func() {
		if !ok {
			s.Close()
		}
	}()

	// Per-connection settings go in the DSN so that a connection the pool
	// replaces gets them too. synchronous=FULL makes every commit durable
	// (an account that was created must survive a crash); _txlock makes
	// BeginTx issue BEGIN IMMEDIATE, so a write transaction takes the write
	// lock up front (waiting under the busy timeout) instead of failing
	// with SQLITE_BUSY when it upgrades from reading.
	common := url.Values{}
	common.Add("_pragma", "busy_timeout("+strconv.FormatInt(busy.Milliseconds(), 10)+")")
	common.Add("_pragma", "foreign_keys(1)")

	wq := cloneValues(common)
	wq.Add("_pragma", "synchronous(FULL)")
	wq.Set("_txlock", "immediate")
	w, err := sql.Open("sqlite", path+"?"+wq.Encode())
	if err != nil {
		return nil, fmt.Errorf("accounts/sqlite: open %s: %w", path, err)
	}
	s.w = w
	w.SetMaxOpenConns(1)
	w.SetMaxIdleConns(1)
	w.SetConnMaxLifetime(0)
	w.SetConnMaxIdleTime(0)

	ctx := context.Background()
	// WAL is a property of the file, so setting it once on the writer
	// covers the readers opened below.
	var mode string
	if err := w.QueryRowContext(ctx, "PRAGMA journal_mode = WAL").Scan(&mode); err != nil {
		return nil, fmt.Errorf("accounts/sqlite: open %s: %w", path, err)
	}
	if !strings.EqualFold(mode, "wal") {
		return nil, fmt.Errorf("accounts/sqlite: open %s: journal mode is %q, not wal", path, mode)
	}
	version, err := migrate(ctx, w, log)
	if err != nil {
		return nil, fmt.Errorf("accounts/sqlite: open %s: %w", path, err)
	}

	rq := cloneValues(common)
	rq.Set("_query_only", "1")
	// Readers answer point lookups (a device's credential at connect, its
	// user's devices on a send), mostly behind the server's device cache,
	// and the file's pages stay in the kernel's page cache anyway. SQLite's
	// default page cache, 2 MiB per connection, would be filled by the
	// first connections of a few thousand distinct devices and then kept:
	// with 4 readers, 8 MiB of the server's memory (440 B per connection
	// in a 19,000-connection run) holding copies of pages the kernel
	// holds too. 256 KiB keeps a table's inner B-tree pages.
	rq.Add("_pragma", "cache_size(-"+strconv.Itoa(readerCacheKiB)+")")
	r, err := sql.Open("sqlite", path+"?"+rq.Encode())
	if err != nil {
		return nil, fmt.Errorf("accounts/sqlite: open %s: %w", path, err)
	}
	s.r = r
	r.SetMaxOpenConns(readers)
	r.SetMaxIdleConns(readers)
	r.SetConnMaxLifetime(0)
	r.SetConnMaxIdleTime(0)

	if err := s.prepare(ctx); err != nil {
		return nil, fmt.Errorf("accounts/sqlite: open %s: %w", path, err)
	}
	log.Info("account store open", "path", path, "schema_version", version)
	ok = true
	return s, nil
}

// readerCacheKiB is the page cache of each reader connection.
const readerCacheKiB = 256

func cloneValues(v url.Values) url.Values {
	c := make(url.Values, len(v))
	for k, vs := range v {
		c[k] = append([]string(nil), vs...)
	}
	return c
}

func (s *Store) prepare(ctx context.Context) error {
	stmts := []struct {
		db    *sql.DB
		dst   **sql.Stmt
		query string
	}{
		{s.r, &s.getUser, `SELECT created, last_seen FROM users WHERE name = ?`},
		// One statement (one snapshot) tells "no such user" (no row) from
		// "user without devices" (a single row of NULLs).
		{s.r, &s.listDevices, `
			SELECT d.id, d.name, d.created
			FROM users u LEFT JOIN devices d ON d.user = u.name AND d.removed IS NULL
			WHERE u.name = ?
			ORDER BY d.id`},
		{s.r, &s.getCredHash, `SELECT cred_hash FROM devices WHERE user = ? AND id = ? AND removed IS NULL`},

		{s.w, &s.insUser, `INSERT INTO users (name, created, next_device_id) VALUES (?, ?, 2) ON CONFLICT (name) DO NOTHING`},
		// SQLite applies the whole update in the first step, so reading the
		// single RETURNING row is enough.
		{s.w, &s.takeID, `UPDATE users SET next_device_id = next_device_id + 1 WHERE name = ? RETURNING next_device_id - 1`},
		{s.w, &s.insDevice, `INSERT INTO devices (user, id, name, cred_hash, created) VALUES (?, ?, ?, ?, ?)`},
		{s.w, &s.rmDevice, `UPDATE devices SET removed = ? WHERE user = ? AND id = ? AND removed IS NULL`},
		{s.w, &s.setLastSeen, `UPDATE users SET last_seen = ? WHERE name = ?`},
	}
	for _, st := range stmts {
		p, err := st.db.PrepareContext(ctx, st.query)
		if err != nil {
			return fmt.Errorf("prepare %q: %w", strings.Join(strings.Fields(st.query), " "), err)
		}
		*st.dst = p
	}
	return nil
}

// Close closes the database. Calls after the first return the first result.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		var errs []error
		for _, st := range []*sql.Stmt{
			s.getUser, s.listDevices, s.getCredHash,
			s.insUser, s.takeID, s.insDevice, s.rmDevice, s.setLastSeen,
		} {
			if st != nil {
				errs = append(errs, st.Close())
			}
		}
		// The writer goes last: the last connection to close checkpoints
		// the WAL into the main file.
		for _, db := range []*sql.DB{s.r, s.w} {
			if db != nil {
				errs = append(errs, db.Close())
			}
		}
		if err := errors.Join(errs...); err != nil {
			s.closeErr = fmt.Errorf("accounts/sqlite: close: %w", err)
		}
	})
	return s.closeErr
}

// CreateUser implements accounts.Store.
func (s *Store) CreateUser(ctx context.Context, name, deviceName string, credHash []byte) (accounts.User, accounts.Device, error) {
	fail := func(err error) (accounts.User, accounts.Device, error) {
		return accounts.User{}, accounts.Device{}, fmt.Errorf("accounts/sqlite: create user %q: %w", name, err)
	}
	if !ident.ValidUser(name) {
		return fail(ident.ErrBadUser)
	}
	if len(credHash) == 0 {
		return fail(errEmptyHash)
	}
	ms := time.Now().UnixMilli()
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		// ON CONFLICT DO NOTHING turns a taken name into "no row inserted"
		// rather than a driver-specific constraint error. Writers are
		// serialised, so of several concurrent creators exactly one inserts.
		res, err := tx.StmtContext(ctx, s.insUser).ExecContext(ctx, name, ms)
		if err != nil {
			return err
		}
		if n, err := res.RowsAffected(); err != nil {
			return err
		} else if n == 0 {
			return accounts.ErrExists
		}
		_, err = tx.StmtContext(ctx, s.insDevice).ExecContext(ctx, name, 1, deviceName, credHash, ms)
		return err
	})
	if err != nil {
		return fail(err)
	}
	created := fromMillis(ms)
	return accounts.User{Name: name, Created: created},
		accounts.Device{ID: 1, Name: deviceName, Created: created},
		nil
}

var errEmptyHash = errors.New("empty credential hash")

// AddDevice implements accounts.Store.
func (s *Store) AddDevice(ctx context.Context, user, deviceName string, credHash []byte) (accounts.Device, error) {
	fail := func(err error) (accounts.Device, error) {
		return accounts.Device{}, fmt.Errorf("accounts/sqlite: add device for %q: %w", user, err)
	}
	if len(credHash) == 0 {
		return fail(errEmptyHash)
	}
	ms := time.Now().UnixMilli()
	var id int64
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		err := tx.StmtContext(ctx, s.takeID).QueryRowContext(ctx, user).Scan(&id)
		if errors.Is(err, sql.ErrNoRows) {
			return accounts.ErrNotFound
		}
		if err != nil {
			return err
		}
		if id < 1 || id > math.MaxUint32 {
			return fmt.Errorf("device id %d out of range", id)
		}
		_, err = tx.StmtContext(ctx, s.insDevice).ExecContext(ctx, user, id, deviceName, credHash, ms)
		return err
	})
	if err != nil {
		return fail(err)
	}
	return accounts.Device{ID: uint32(id), Name: deviceName, Created: fromMillis(ms)}, nil
}

// RemoveDevice implements accounts.Store. The row is kept, marked removed,
// so its id stays taken; the device's keys are dropped in the same
// transaction.
func (s *Store) RemoveDevice(ctx context.Context, dev ident.Device) error {
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		res, err := tx.StmtContext(ctx, s.rmDevice).ExecContext(ctx, time.Now().UnixMilli(), dev.User, int64(dev.ID))
		if err != nil {
			return err
		}
		if n, err := res.RowsAffected(); err != nil {
			return err
		} else if n == 0 {
			return accounts.ErrNotFound
		}
		if _, err := tx.ExecContext(ctx, `DELETE FROM one_time_prekeys WHERE user = ? AND device = ?`, dev.User, int64(dev.ID)); err != nil {
			return err
		}
		_, err = tx.ExecContext(ctx, `DELETE FROM device_keys WHERE user = ? AND device = ?`, dev.User, int64(dev.ID))
		return err
	})
	if err != nil {
		return fmt.Errorf("accounts/sqlite: remove device %s: %w", dev, err)
	}
	return nil
}

// User implements accounts.Store.
func (s *Store) User(ctx context.Context, name string) (accounts.User, error) {
	var created int64
	var lastSeen sql.NullInt64
	err := s.getUser.QueryRowContext(ctx, name).Scan(&created, &lastSeen)
	if errors.Is(err, sql.ErrNoRows) {
		err = accounts.ErrNotFound
	}
	if err != nil {
		return accounts.User{}, fmt.Errorf("accounts/sqlite: user %q: %w", name, err)
	}
	u := accounts.User{Name: name, Created: fromMillis(created)}
	if lastSeen.Valid {
		u.LastSeen = fromMillis(lastSeen.Int64)
	}
	return u, nil
}

// Devices implements accounts.Store. Removed devices are not listed.
func (s *Store) Devices(ctx context.Context, user string) ([]accounts.Device, error) {
	devs, err := s.devices(ctx, user)
	if err != nil {
		return nil, fmt.Errorf("accounts/sqlite: devices of %q: %w", user, err)
	}
	return devs, nil
}

func (s *Store) devices(ctx context.Context, user string) ([]accounts.Device, error) {
	rows, err := s.listDevices.QueryContext(ctx, user)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	userFound := false
	devs := []accounts.Device{}
	for rows.Next() {
		userFound = true
		var (
			id      sql.NullInt64
			name    sql.NullString
			created sql.NullInt64
		)
		if err := rows.Scan(&id, &name, &created); err != nil {
			return nil, err
		}
		if !id.Valid { // the LEFT JOIN row of a user without devices
			continue
		}
		devs = append(devs, accounts.Device{ID: uint32(id.Int64), Name: name.String, Created: fromMillis(created.Int64)})
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	if !userFound {
		return nil, accounts.ErrNotFound
	}
	return devs, nil
}

// CredentialHash implements accounts.Store. A removed device has none.
func (s *Store) CredentialHash(ctx context.Context, dev ident.Device) ([]byte, error) {
	var h []byte // Scan copies, so the caller owns the result
	err := s.getCredHash.QueryRowContext(ctx, dev.User, int64(dev.ID)).Scan(&h)
	if errors.Is(err, sql.ErrNoRows) {
		err = accounts.ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("accounts/sqlite: credential of %s: %w", dev, err)
	}
	return h, nil
}

// SetLastSeen implements accounts.Store. It stores t to the millisecond; a
// zero t clears the record. ErrNotFound if the user does not exist.
func (s *Store) SetLastSeen(ctx context.Context, user string, t time.Time) error {
	var v sql.NullInt64
	if !t.IsZero() {
		v = sql.NullInt64{Int64: t.UnixMilli(), Valid: true}
	}
	res, err := s.setLastSeen.ExecContext(ctx, v, user)
	if err == nil {
		var n int64
		if n, err = res.RowsAffected(); err == nil && n == 0 {
			err = accounts.ErrNotFound
		}
	}
	if err != nil {
		return fmt.Errorf("accounts/sqlite: set last seen of %q: %w", user, err)
	}
	return nil
}

// SetLastSeenBatch implements accounts.LastSeenBatcher: every user's
// last-seen time in one transaction (one fsync'd commit instead of one
// each). Users that do not exist are skipped.
func (s *Store) SetLastSeenBatch(ctx context.Context, seen map[string]time.Time) error {
	if len(seen) == 0 {
		return nil
	}
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		st := tx.StmtContext(ctx, s.setLastSeen)
		defer st.Close()
		for user, t := range seen {
			var v sql.NullInt64
			if !t.IsZero() {
				v = sql.NullInt64{Int64: t.UnixMilli(), Valid: true}
			}
			if _, err := st.ExecContext(ctx, v, user); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("accounts/sqlite: set last seen of %d users: %w", len(seen), err)
	}
	return nil
}

// inTx runs fn in a write transaction (BEGIN IMMEDIATE, see Open) and
// commits it if fn succeeds.
func (s *Store) inTx(ctx context.Context, fn func(*sql.Tx) error) error {
	tx, err := s.w.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	if err := fn(tx); err != nil {
		tx.Rollback()
		return err
	}
	return tx.Commit()
}

func fromMillis(ms int64) time.Time { return time.UnixMilli(ms).UTC() }
