// Package postgres is the clustered account store: users, devices and
// credential hashes in PostgreSQL, shared by every node of a cluster,
// accessed through a pgx connection pool (github.com/jackc/pgx/v5/pgxpool).
//
// Every method of accounts.Store is one statement, so one round trip and its
// own transaction:
// CreateUser inserts the user and its primary device in one statement
// (INSERT ... ON CONFLICT DO NOTHING in a data-modifying CTE, so a taken name
// is "no row" rather than an error, also when several nodes race for it), and
// AddDevice takes the next id by updating the user's counter row and inserts
// the device in the same statement, so the row lock serialises concurrent
// AddDevice calls for that user, on any node, and ids are never handed out
// twice or reused. The methods of accounts.KeyStore that write are short
// transactions that lock the device's key row first (see keys.go). Nothing
// is cached in the process.
//
// Timestamps are timestamptz truncated to the millisecond and returned in
// UTC. The times the store assigns itself (creation, removal) come from the
// database server's clock, the one clock every node shares.
//
// The schema is brought up to date by Open with embedded, versioned
// migrations (see migrate.go); several nodes may Open at once.
package postgres

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/ident"
)

var _ accounts.Store = (*Store)(nil)

// Options configures Open. The zero value is ready to use. Pool settings
// (pool_max_conns, pool_max_conn_lifetime, ...) and timeouts
// (connect_timeout, or options=-c statement_timeout=...) go in the URL, as
// pgxpool.ParseConfig documents.
type Options struct {
	// Logger receives lifecycle and schema migration messages. Nil discards
	// them.
	Logger *slog.Logger
	// Schema is the PostgreSQL schema holding the store's tables. It is
	// created if absent and becomes the whole search_path of every pooled
	// connection. Empty means the URL's or the role's search_path decides
	// (normally "public"). Tests use a fresh schema each for isolation.
	Schema string
	// MaxGroupMembers caps a group's members (accounts.GroupStore). Zero
	// means accounts.DefaultMaxGroupMembers.
	MaxGroupMembers int
}

// Store is an accounts.Store kept in PostgreSQL. It is safe for concurrent
// use.
type Store struct {
	pool *pgxpool.Pool
	log  *slog.Logger

	maxGroupMembers int

	closeOnce sync.Once
}

// maxIdentLen is PostgreSQL's longest identifier (NAMEDATALEN-1); longer
// ones are silently truncated by the server, which would make the schema we
// look for differ from the one we create.
const maxIdentLen = 63

// Open connects to the database at url (a postgres:// URL or a key=value
// connection string), creates the schema if asked to, applies any pending
// migrations and returns the store. ctx bounds the connection attempt and
// the migrations, including the wait for another node's migrations; it is
// not retained.
func Open(ctx context.Context, url string, opts Options) (*Store, error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if s := opts.Schema; s != "" {
		if len(s) > maxIdentLen || !validText(s) {
			return nil, fmt.Errorf("accounts/postgres: open: schema name %q: want at most %d bytes of UTF-8 without NUL", s, maxIdentLen)
		}
	}
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		// pgconn redacts the password in its parse errors.
		return nil, fmt.Errorf("accounts/postgres: open: %w", err)
	}
	where := net.JoinHostPort(cfg.ConnConfig.Host, strconv.Itoa(int(cfg.ConnConfig.Port))) + "/" + cfg.ConnConfig.Database
	if opts.Schema != "" {
		// A startup parameter, so that every connection the pool opens,
		// now or after a reconnect, has it without an extra round trip.
		cfg.ConnConfig.RuntimeParams["search_path"] = pgx.Identifier{opts.Schema}.Sanitize()
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("accounts/postgres: open %s: %w", where, err)
	}
	schema, version, err := migrateOn(ctx, pool, opts.Schema, log)
	if err != nil {
		pool.Close()
		return nil, fmt.Errorf("accounts/postgres: open %s: %w", where, err)
	}
	log.Info("account store open", "server", where, "schema", schema, "schema_version", version)
	maxMembers := opts.MaxGroupMembers
	if maxMembers <= 0 {
		maxMembers = accounts.DefaultMaxGroupMembers
	}
	return &Store{pool: pool, log: log, maxGroupMembers: maxMembers}, nil
}

// migrateOn runs migrate on a connection of pool, telling a failure to
// connect from a failure to migrate.
func migrateOn(ctx context.Context, pool *pgxpool.Pool, schema string, log *slog.Logger) (string, int, error) {
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return "", 0, fmt.Errorf("connect: %w", err)
	}
	defer conn.Release()
	schema, version, err := migrate(ctx, conn.Conn(), schema, log)
	if err != nil {
		return "", 0, fmt.Errorf("migrate: %w", err)
	}
	return schema, version, nil
}

// Close closes the connection pool, waiting for calls in progress to
// release their connections. Calls after the first do nothing.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		s.pool.Close()
		s.log.Info("account store closed")
	})
	return nil
}

var (
	errEmptyHash     = errors.New("empty credential hash")
	errBadDeviceName = errors.New("device name must be valid UTF-8 without NUL bytes")
	errIDsExhausted  = errors.New("the user has used up all device ids")
)

// validText reports whether PostgreSQL can store s as text: in a UTF-8
// database that is valid UTF-8 without NUL.
func validText(s string) bool {
	return utf8.ValidString(s) && !strings.ContainsRune(s, 0)
}

// ms truncates a time to the millisecond, the precision the store keeps.
func ms(t time.Time) time.Time { return t.Truncate(time.Millisecond) }

// The store's own timestamps: the database server's clock, to the
// millisecond. now() is the transaction's start, so the rows one statement
// writes share it.
const nowMs = `date_trunc('milliseconds', now())`

// createUser inserts the user and, only if that inserted a row, its primary
// device. A concurrent insert of the same name waits for the first to
// commit and then does nothing, so exactly one creator gets a row back.
// The device row's foreign key is checked at the end of the statement, when
// the user row exists.
const createUser = `
WITH u AS (
	INSERT INTO users (name, created) VALUES ($1, ` + nowMs + `)
	ON CONFLICT (name) DO NOTHING
	RETURNING name, created
)
INSERT INTO devices (user_name, id, name, cred_hash, created)
SELECT name, 1, $2::text, $3::bytea, created FROM u
RETURNING created`

// CreateUser implements accounts.Store.
func (s *Store) CreateUser(ctx context.Context, name, deviceName string, credHash []byte) (accounts.User, accounts.Device, error) {
	fail := func(err error) (accounts.User, accounts.Device, error) {
		return accounts.User{}, accounts.Device{}, fmt.Errorf("accounts/postgres: create user %q: %w", name, err)
	}
	switch {
	case !ident.ValidUser(name):
		return fail(ident.ErrBadUser)
	case len(credHash) == 0:
		return fail(errEmptyHash)
	case !validText(deviceName):
		return fail(errBadDeviceName)
	}
	var created time.Time
	err := s.pool.QueryRow(ctx, createUser, name, deviceName, credHash).Scan(&created)
	if errors.Is(err, pgx.ErrNoRows) {
		err = accounts.ErrExists
	}
	if err != nil {
		return fail(err)
	}
	created = created.UTC()
	return accounts.User{Name: name, Created: created},
		accounts.Device{ID: 1, Name: deviceName, Created: created},
		nil
}

// addDevice takes the user's next id and inserts the device under it. The
// UPDATE locks the user's row until the statement's transaction ends; a
// concurrent AddDevice for the same user waits, then re-reads the updated
// row (READ COMMITTED) and takes the following id. RETURNING gives the new
// counter, so the id taken is one less. No row: no such user.
const addDevice = `
WITH u AS (
	UPDATE users SET next_device_id = next_device_id + 1
	WHERE name = $1
	RETURNING name, next_device_id - 1 AS id
)
INSERT INTO devices (user_name, id, name, cred_hash, created)
SELECT name, id, $2::text, $3::bytea, ` + nowMs + ` FROM u
RETURNING id, created`

// AddDevice implements accounts.Store.
func (s *Store) AddDevice(ctx context.Context, user, deviceName string, credHash []byte) (accounts.Device, error) {
	fail := func(err error) (accounts.Device, error) {
		return accounts.Device{}, fmt.Errorf("accounts/postgres: add device for %q: %w", user, err)
	}
	switch {
	case !ident.ValidUser(user):
		return fail(accounts.ErrNotFound) // CreateUser admits no such name
	case len(credHash) == 0:
		return fail(errEmptyHash)
	case !validText(deviceName):
		return fail(errBadDeviceName)
	}
	var (
		id      int64
		created time.Time
	)
	err := s.pool.QueryRow(ctx, addDevice, user, deviceName, credHash).Scan(&id, &created)
	var pgErr *pgconn.PgError
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return fail(accounts.ErrNotFound)
	case errors.As(err, &pgErr) && pgErr.Code == "23514" && pgErr.ConstraintName == "users_next_device_id_check":
		return fail(errIDsExhausted)
	case err != nil:
		return fail(err)
	case id < 1 || id > math.MaxUint32:
		return fail(fmt.Errorf("device id %d out of range", id))
	}
	return accounts.Device{ID: uint32(id), Name: deviceName, Created: created.UTC()}, nil
}

// removeDevice marks the device removed and, in the same statement, drops
// its keys (the one-time prekeys go by ON DELETE CASCADE). The UPDATE locks
// the device row first, as PutKeys does (FOR SHARE), so the two serialise.
// It returns the number of devices marked removed.
const removeDevice = `
WITH r AS (
	UPDATE devices SET removed = ` + nowMs + `
	WHERE user_name = $1 AND id = $2 AND removed IS NULL
	RETURNING user_name, id
), gone AS (
	DELETE FROM device_keys k USING r WHERE k.user_name = r.user_name AND k.device = r.id
)
SELECT count(*) FROM r`

// RemoveDevice implements accounts.Store. The row is kept, marked removed,
// so its id stays taken; the device's keys are dropped.
func (s *Store) RemoveDevice(ctx context.Context, dev ident.Device) error {
	err := accounts.ErrNotFound
	if ident.ValidUser(dev.User) {
		var n int64
		err = s.pool.QueryRow(ctx, removeDevice, dev.User, int64(dev.ID)).Scan(&n)
		if err == nil && n == 0 {
			err = accounts.ErrNotFound
		}
	}
	if err != nil {
		return fmt.Errorf("accounts/postgres: remove device %s: %w", dev, err)
	}
	return nil
}

// User implements accounts.Store.
func (s *Store) User(ctx context.Context, name string) (accounts.User, error) {
	var (
		created  time.Time
		lastSeen *time.Time
	)
	err := accounts.ErrNotFound
	if ident.ValidUser(name) {
		err = s.pool.QueryRow(ctx, `SELECT created, last_seen FROM users WHERE name = $1`, name).Scan(&created, &lastSeen)
		if errors.Is(err, pgx.ErrNoRows) {
			err = accounts.ErrNotFound
		}
	}
	if err != nil {
		return accounts.User{}, fmt.Errorf("accounts/postgres: user %q: %w", name, err)
	}
	u := accounts.User{Name: name, Created: created.UTC()}
	if lastSeen != nil {
		u.LastSeen = lastSeen.UTC()
	}
	return u, nil
}

// listDevices tells "no such user" (no row) from "user without devices" (a
// single row of NULLs) in one statement, so one snapshot.
const listDevices = `
SELECT d.id, d.name, d.created
FROM users u LEFT JOIN devices d ON d.user_name = u.name AND d.removed IS NULL
WHERE u.name = $1
ORDER BY d.id`

// Devices implements accounts.Store. Removed devices are not listed.
func (s *Store) Devices(ctx context.Context, user string) ([]accounts.Device, error) {
	devs, err := s.devices(ctx, user)
	if err != nil {
		return nil, fmt.Errorf("accounts/postgres: devices of %q: %w", user, err)
	}
	return devs, nil
}

func (s *Store) devices(ctx context.Context, user string) ([]accounts.Device, error) {
	if !ident.ValidUser(user) {
		return nil, accounts.ErrNotFound
	}
	rows, err := s.pool.Query(ctx, listDevices, user)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	userFound := false
	devs := []accounts.Device{}
	for rows.Next() {
		userFound = true
		var (
			id      *int64
			name    *string
			created *time.Time
		)
		if err := rows.Scan(&id, &name, &created); err != nil {
			return nil, err
		}
		if id == nil { // the LEFT JOIN row of a user without devices
			continue
		}
		devs = append(devs, accounts.Device{ID: uint32(*id), Name: *name, Created: created.UTC()})
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
	var h []byte // pgx copies into a new slice, so the caller owns the result
	err := accounts.ErrNotFound
	if ident.ValidUser(dev.User) {
		err = s.pool.QueryRow(ctx, `SELECT cred_hash FROM devices WHERE user_name = $1 AND id = $2 AND removed IS NULL`,
			dev.User, int64(dev.ID)).Scan(&h)
		if errors.Is(err, pgx.ErrNoRows) {
			err = accounts.ErrNotFound
		}
	}
	if err != nil {
		return nil, fmt.Errorf("accounts/postgres: credential of %s: %w", dev, err)
	}
	return h, nil
}

// SetLastSeen implements accounts.Store. It stores t to the millisecond; a
// zero t clears the record. ErrNotFound if the user does not exist.
func (s *Store) SetLastSeen(ctx context.Context, user string, t time.Time) error {
	var v *time.Time
	if !t.IsZero() {
		mt := ms(t)
		v = &mt
	}
	err := accounts.ErrNotFound
	if ident.ValidUser(user) {
		var tag pgconn.CommandTag
		tag, err = s.pool.Exec(ctx, `UPDATE users SET last_seen = $2 WHERE name = $1`, user, v)
		if err == nil && tag.RowsAffected() == 0 {
			err = accounts.ErrNotFound
		}
	}
	if err != nil {
		return fmt.Errorf("accounts/postgres: set last seen of %q: %w", user, err)
	}
	return nil
}
