package postgres

import (
	"context"
	"embed"
	"fmt"
	"hash/fnv"
	"io/fs"
	"log/slog"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
)

// Schema migrations live in migrations/NNNN_description.sql. Migration N
// takes the schema from version N-1 to N. Applied migrations must never be
// edited: add a new file instead.
//
// The versions applied are recorded in the table schema_migrations, one row
// per (component, version). The component column lets other courier stores
// that keep their tables in the same PostgreSQL schema (prekeys, groups, ...)
// share the table with their own version sequences; this store's rows have
// component "accounts". Such a store must serialise its migrations on the
// same advisory lock (migrationLockKey), because it too may have to create
// the schema or the schema_migrations table.
//
//go:embed migrations/*.sql
var migrationFiles embed.FS

// component is this store's key in schema_migrations.
const component = "accounts"

type migration struct {
	version int
	name    string
	sql     string
}

// migrations returns the embedded migrations in version order, checking that
// the versions are exactly 1, 2, 3, ...
func migrations() ([]migration, error) {
	entries, err := fs.ReadDir(migrationFiles, "migrations") // sorted by name
	if err != nil {
		return nil, err
	}
	var ms []migration
	for _, e := range entries {
		name := e.Name()
		num, _, ok := strings.Cut(name, "_")
		v, err := strconv.Atoi(num)
		if !ok || err != nil || v != len(ms)+1 {
			return nil, fmt.Errorf("migration %s: want a name starting with %04d_", name, len(ms)+1)
		}
		b, err := migrationFiles.ReadFile("migrations/" + name)
		if err != nil {
			return nil, err
		}
		ms = append(ms, migration{version: v, name: name, sql: string(b)})
	}
	return ms, nil
}

// createMigrationsTable is not itself a versioned migration: it holds the
// versions.
const createMigrationsTable = `
CREATE TABLE schema_migrations (
	component  text COLLATE "C" NOT NULL,
	version    integer NOT NULL CHECK (version > 0),
	name       text NOT NULL,
	applied_at timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (component, version)
)`

// migrationLockKey is the pg_advisory_xact_lock key that serialises schema
// migrations in one PostgreSQL schema: a 64-bit FNV-1a hash of a fixed
// prefix and the schema name, so that stores in different schemas of one
// database (the tests' isolation) do not wait for each other.
func migrationLockKey(schema string) int64 {
	h := fnv.New64a()
	h.Write([]byte("courier schema_migrations\x00"))
	h.Write([]byte(schema))
	return int64(h.Sum64())
}

// migrate brings the schema up to date in one transaction on conn and
// returns the schema it used and the resulting version. schema is the
// PostgreSQL schema to use, created if absent; empty means the connection's
// current schema (the first existing one on its search_path).
//
// Several nodes may run migrate at once against one database: the
// transaction first takes a transaction-scoped advisory lock, so the others
// wait for it to commit or roll back. Under READ COMMITTED every later
// statement takes a new snapshot, so a node that waited sees what the one
// before it committed and applies nothing twice. Because PostgreSQL's DDL is
// transactional, a failed migration leaves nothing behind. A schema whose
// version is newer than this build knows is refused rather than misread.
func migrate(ctx context.Context, conn *pgx.Conn, schema string, log *slog.Logger) (_ string, version int, err error) {
	ms, err := migrations()
	if err != nil {
		return "", 0, err
	}
	tx, err := conn.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.ReadCommitted})
	if err != nil {
		return "", 0, fmt.Errorf("begin: %w", err)
	}
	defer func() {
		if err != nil {
			// The connection is released (or destroyed, if rollback
			// fails) by the caller; the error that matters is err.
			_ = tx.Rollback(context.WithoutCancel(ctx))
		}
	}()

	if schema == "" {
		var cur *string
		if err := tx.QueryRow(ctx, `SELECT current_schema()`).Scan(&cur); err != nil {
			return "", 0, fmt.Errorf("read current schema: %w", err)
		}
		if cur == nil {
			var path string
			if err := tx.QueryRow(ctx, `SHOW search_path`).Scan(&path); err != nil {
				return "", 0, fmt.Errorf("read search_path: %w", err)
			}
			return "", 0, fmt.Errorf("no schema on the search_path (%s) exists: create one or set Options.Schema", path)
		}
		schema = *cur
	}
	quoted := pgx.Identifier{schema}.Sanitize()

	if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, migrationLockKey(schema)); err != nil {
		return "", 0, fmt.Errorf("take migration lock: %w", err)
	}
	// Look before creating: IF NOT EXISTS would still demand the CREATE
	// privilege on the database, which a role given a ready-made schema
	// need not have.
	var exists bool
	if err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)`, schema).Scan(&exists); err != nil {
		return "", 0, fmt.Errorf("look up schema %s: %w", quoted, err)
	}
	if !exists {
		if _, err := tx.Exec(ctx, `CREATE SCHEMA `+quoted); err != nil {
			return "", 0, fmt.Errorf("create schema %s: %w", quoted, err)
		}
		log.Info("created schema", "schema", schema)
	}
	// Unqualified names in the migrations mean this schema and no other,
	// whatever the connection's search_path holds; SET LOCAL ends with the
	// transaction.
	if _, err := tx.Exec(ctx, `SET LOCAL search_path TO `+quoted); err != nil {
		return "", 0, fmt.Errorf("set search_path: %w", err)
	}
	var haveTable bool
	if err := tx.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL`, quoted+".schema_migrations").Scan(&haveTable); err != nil {
		return "", 0, fmt.Errorf("look up schema_migrations: %w", err)
	}
	if !haveTable {
		if _, err := tx.Exec(ctx, createMigrationsTable); err != nil {
			return "", 0, fmt.Errorf("create schema_migrations: %w", err)
		}
	}

	var have int
	err = tx.QueryRow(ctx, `SELECT coalesce(max(version), 0) FROM schema_migrations WHERE component = $1`, component).Scan(&have)
	if err != nil {
		return "", 0, fmt.Errorf("read schema version: %w", err)
	}
	want := len(ms)
	if have > want {
		return "", 0, fmt.Errorf("schema %s is at %s version %d, newer than this build supports (%d)", quoted, component, have, want)
	}
	for _, m := range ms[have:] {
		// Without arguments pgx sends the simple query protocol, which
		// runs a file of several statements in one round trip.
		if _, err := tx.Exec(ctx, m.sql); err != nil {
			return "", 0, fmt.Errorf("%s: %w", m.name, err)
		}
		if _, err := tx.Exec(ctx, `INSERT INTO schema_migrations (component, version, name) VALUES ($1, $2, $3)`,
			component, m.version, m.name); err != nil {
			return "", 0, fmt.Errorf("%s: record version: %w", m.name, err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return "", 0, fmt.Errorf("commit: %w", err)
	}
	for _, m := range ms[have:] {
		log.Info("applied schema migration", "schema", schema, "migration", m.name, "version", m.version)
	}
	return schema, want, nil
}
