package sqlite

import (
	"context"
	"database/sql"
	"embed"
	"fmt"
	"io/fs"
	"log/slog"
	"strconv"
	"strings"
)

// Schema migrations live in migrations/NNNN_description.sql. Migration N
// takes the schema from version N-1 to N; the version a file is at is kept
// in PRAGMA user_version (0 for a new file). Applied migrations must never be
// edited: add a new file instead.
//
//go:embed migrations/*.sql
var migrationFiles embed.FS

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

// migrate brings the schema up to date in one write transaction and returns
// the resulting version. Because the transaction is BEGIN IMMEDIATE and reads
// the version inside it, concurrent Opens of the same file (even by
// different processes) apply each migration once. A file whose schema is
// newer than this binary knows is refused rather than misread.
func migrate(ctx context.Context, db *sql.DB, log *slog.Logger) (version int, err error) {
	ms, err := migrations()
	if err != nil {
		return 0, err
	}
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return 0, fmt.Errorf("migrate: %w", err)
	}
	defer func() {
		if err != nil {
			tx.Rollback()
		}
	}()
	var have int
	if err := tx.QueryRowContext(ctx, "PRAGMA user_version").Scan(&have); err != nil {
		return 0, fmt.Errorf("migrate: read schema version: %w", err)
	}
	want := len(ms)
	if have > want {
		return 0, fmt.Errorf("migrate: schema version %d is newer than this build supports (%d)", have, want)
	}
	if have == want {
		return have, tx.Commit()
	}
	for _, m := range ms[have:] {
		if _, err := tx.ExecContext(ctx, m.sql); err != nil {
			return 0, fmt.Errorf("migrate: %s: %w", m.name, err)
		}
	}
	// PRAGMA arguments cannot be bound; want is an int we computed.
	if _, err := tx.ExecContext(ctx, "PRAGMA user_version = "+strconv.Itoa(want)); err != nil {
		return 0, fmt.Errorf("migrate: set schema version: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return 0, fmt.Errorf("migrate: commit: %w", err)
	}
	for _, m := range ms[have:] {
		log.Info("applied schema migration", "migration", m.name, "version", m.version)
	}
	return want, nil
}
