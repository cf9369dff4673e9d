package postgres

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/ident"
)

var _ accounts.GroupStore = (*Store)(nil)

// Every change of a group is a transaction (READ COMMITTED) whose first
// statement locks the group's row (SELECT ... FOR UPDATE). A concurrent
// change of the same group, on any node, waits for the lock and then reads
// the members in a new snapshot, so it sees what the change before it
// committed: changes are serialised per group, and each that changes
// something sets the version to one more. Reads are single statements, so
// one snapshot each.

// groupRow is a group as loaded, members in join order.
type groupRow struct {
	version int64
	created time.Time
	nextOrd int64
	members []accounts.GroupMember
}

func (g groupRow) group(id string) accounts.Group {
	return accounts.Group{ID: id, Version: uint64(g.version), Members: g.members, Created: g.created.UTC()}
}

// lockGroup locks a group's row and reads the group. ErrNotFound if there
// is no such group.
func lockGroup(ctx context.Context, tx pgx.Tx, id string) (groupRow, error) {
	var g groupRow
	if !accounts.ValidGroupID(id) {
		return g, accounts.ErrNotFound
	}
	err := tx.QueryRow(ctx, `SELECT version, created, next_ord FROM groups WHERE id = $1 FOR UPDATE`, id).
		Scan(&g.version, &g.created, &g.nextOrd)
	if errors.Is(err, pgx.ErrNoRows) {
		return g, accounts.ErrNotFound
	}
	if err != nil {
		return g, err
	}
	rows, err := tx.Query(ctx, `SELECT user_name, admin FROM group_members WHERE group_id = $1 ORDER BY ord`, id)
	if err != nil {
		return g, err
	}
	defer rows.Close()
	for rows.Next() {
		var m accounts.GroupMember
		if err := rows.Scan(&m.User, &m.Admin); err != nil {
			return g, err
		}
		g.members = append(g.members, m)
	}
	return g, rows.Err()
}

// checkUsers fails with an *accounts.UnknownUserError for the first of
// users that does not exist.
func checkUsers(ctx context.Context, tx pgx.Tx, users []string) error {
	for _, u := range users {
		if !ident.ValidUser(u) {
			return &accounts.UnknownUserError{User: u}
		}
	}
	rows, err := tx.Query(ctx, `SELECT name FROM users WHERE name = ANY($1::text[])`, users)
	if err != nil {
		return err
	}
	found, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return err
	}
	have := make(map[string]bool, len(found))
	for _, u := range found {
		have[u] = true
	}
	for _, u := range users {
		if !have[u] {
			return &accounts.UnknownUserError{User: u}
		}
	}
	return nil
}

// insertMembers adds users to group id with join orders from, from+1, ...;
// the first is an admin if firstAdmin.
func insertMembers(ctx context.Context, tx pgx.Tx, id string, users []string, from int64, firstAdmin bool) error {
	admins := make([]bool, len(users))
	ords := make([]int64, len(users))
	for i := range users {
		admins[i] = firstAdmin && i == 0
		ords[i] = from + int64(i)
	}
	_, err := tx.Exec(ctx, `
		INSERT INTO group_members (group_id, user_name, admin, ord)
		SELECT $1, t.u, t.a, t.o FROM unnest($2::text[], $3::boolean[], $4::bigint[]) AS t(u, a, o)`,
		id, users, admins, ords)
	return err
}

func (s *Store) inTx(ctx context.Context, fn func(pgx.Tx) error) error {
	return pgx.BeginTxFunc(ctx, s.pool, pgx.TxOptions{IsoLevel: pgx.ReadCommitted}, fn)
}

// CreateGroup implements accounts.GroupStore.
func (s *Store) CreateGroup(ctx context.Context, creator string, members []string) (accounts.GroupChange, error) {
	users := accounts.CollapseMembers(creator, members)
	if len(users) > s.maxGroupMembers {
		return accounts.GroupChange{}, fmt.Errorf("accounts/postgres: create group: %w", accounts.TooManyMembers(len(users), s.maxGroupMembers))
	}
	id := accounts.NewGroupID()
	var created time.Time
	err := s.inTx(ctx, func(tx pgx.Tx) error {
		if err := checkUsers(ctx, tx, users); err != nil {
			return err
		}
		if err := tx.QueryRow(ctx, `INSERT INTO groups (id, version, created, next_ord) VALUES ($1, 1, `+nowMs+`, $2) RETURNING created`,
			id, len(users)).Scan(&created); err != nil {
			return err
		}
		return insertMembers(ctx, tx, id, users, 0, true)
	})
	if err != nil {
		return accounts.GroupChange{}, fmt.Errorf("accounts/postgres: create group of %q: %w", creator, err)
	}
	g := accounts.Group{ID: id, Version: 1, Created: created.UTC(), Members: make([]accounts.GroupMember, len(users))}
	for i, u := range users {
		g.Members[i] = accounts.GroupMember{User: u, Admin: i == 0}
	}
	return accounts.GroupChange{Group: g, Changed: true, Added: users}, nil
}

// GroupVersion implements accounts.GroupVersioner.
func (s *Store) GroupVersion(ctx context.Context, id string) (uint64, error) {
	if !accounts.ValidGroupID(id) {
		return 0, fmt.Errorf("accounts/postgres: group %q: %w", id, accounts.ErrNotFound)
	}
	var v int64
	err := s.pool.QueryRow(ctx, `SELECT version FROM groups WHERE id = $1`, id).Scan(&v)
	if errors.Is(err, pgx.ErrNoRows) {
		err = accounts.ErrNotFound
	}
	if err != nil {
		return 0, fmt.Errorf("accounts/postgres: group %q: %w", id, err)
	}
	return uint64(v), nil
}

var _ accounts.GroupVersioner = (*Store)(nil)

// Group implements accounts.GroupStore.
func (s *Store) Group(ctx context.Context, id string) (accounts.Group, error) {
	fail := func(err error) (accounts.Group, error) {
		return accounts.Group{}, fmt.Errorf("accounts/postgres: group %q: %w", id, err)
	}
	if !accounts.ValidGroupID(id) {
		return fail(accounts.ErrNotFound)
	}
	rows, err := s.pool.Query(ctx, `
		SELECT g.version, g.created, g.next_ord, m.user_name, m.admin
		FROM groups g LEFT JOIN group_members m ON m.group_id = g.id
		WHERE g.id = $1
		ORDER BY m.ord`, id)
	if err != nil {
		return fail(err)
	}
	defer rows.Close()
	var g groupRow
	found := false
	for rows.Next() {
		found = true
		var (
			user  *string
			admin *bool
		)
		if err := rows.Scan(&g.version, &g.created, &g.nextOrd, &user, &admin); err != nil {
			return fail(err)
		}
		if user != nil {
			g.members = append(g.members, accounts.GroupMember{User: *user, Admin: *admin})
		}
	}
	if err := rows.Err(); err != nil {
		return fail(err)
	}
	if !found {
		return fail(accounts.ErrNotFound)
	}
	return g.group(id), nil
}

// Groups implements accounts.GroupStore.
func (s *Store) Groups(ctx context.Context, user string) ([]accounts.GroupRef, error) {
	refs := []accounts.GroupRef{}
	if !ident.ValidUser(user) {
		return refs, nil
	}
	rows, err := s.pool.Query(ctx, `
		SELECT g.id, g.version
		FROM group_members m JOIN groups g ON g.id = m.group_id
		WHERE m.user_name = $1
		ORDER BY g.id`, user)
	if err != nil {
		return nil, fmt.Errorf("accounts/postgres: groups of %q: %w", user, err)
	}
	defer rows.Close()
	for rows.Next() {
		var (
			r accounts.GroupRef
			v int64
		)
		if err := rows.Scan(&r.ID, &v); err != nil {
			return nil, fmt.Errorf("accounts/postgres: groups of %q: %w", user, err)
		}
		r.Version = uint64(v)
		refs = append(refs, r)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("accounts/postgres: groups of %q: %w", user, err)
	}
	return refs, nil
}

// bumpVersion records a change of group id.
func bumpVersion(ctx context.Context, tx pgx.Tx, id string, g *groupRow, added int) error {
	g.version++
	g.nextOrd += int64(added)
	_, err := tx.Exec(ctx, `UPDATE groups SET version = $2, next_ord = $3 WHERE id = $1`, id, g.version, g.nextOrd)
	return err
}

// AddMembers implements accounts.GroupStore.
func (s *Store) AddMembers(ctx context.Context, id, by string, users []string) (accounts.GroupChange, error) {
	var ch accounts.GroupChange
	err := s.inTx(ctx, func(tx pgx.Tx) error {
		g, err := lockGroup(ctx, tx, id)
		if err != nil {
			return err
		}
		add, err := accounts.PlanAdd(g.members, by, users, s.maxGroupMembers)
		if err != nil {
			return err
		}
		if len(add) == 0 {
			ch = accounts.GroupChange{Group: g.group(id)}
			return nil
		}
		if err := checkUsers(ctx, tx, add); err != nil {
			return err
		}
		if err := insertMembers(ctx, tx, id, add, g.nextOrd, false); err != nil {
			return err
		}
		for _, u := range add {
			g.members = append(g.members, accounts.GroupMember{User: u})
		}
		if err := bumpVersion(ctx, tx, id, &g, len(add)); err != nil {
			return err
		}
		ch = accounts.GroupChange{Group: g.group(id), Changed: true, Added: add}
		return nil
	})
	if err != nil {
		return accounts.GroupChange{}, fmt.Errorf("accounts/postgres: add members to group %q: %w", id, err)
	}
	return ch, nil
}

// RemoveMember implements accounts.GroupStore.
func (s *Store) RemoveMember(ctx context.Context, id, by, user string) (accounts.GroupChange, error) {
	var ch accounts.GroupChange
	err := s.inTx(ctx, func(tx pgx.Tx) error {
		g, err := lockGroup(ctx, tx, id)
		if err != nil {
			return err
		}
		rest, promoted, err := accounts.PlanRemove(g.members, by, user)
		if err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `DELETE FROM group_members WHERE group_id = $1 AND user_name = $2`, id, user); err != nil {
			return err
		}
		g.members = rest
		ch = accounts.GroupChange{Changed: true, Removed: []string{user}}
		if len(rest) == 0 {
			if _, err := tx.Exec(ctx, `DELETE FROM groups WHERE id = $1`, id); err != nil {
				return err
			}
			g.version++
			ch.Group, ch.Deleted = g.group(id), true
			return nil
		}
		if promoted != "" {
			if _, err := tx.Exec(ctx, `UPDATE group_members SET admin = true WHERE group_id = $1 AND user_name = $2`, id, promoted); err != nil {
				return err
			}
		}
		if err := bumpVersion(ctx, tx, id, &g, 0); err != nil {
			return err
		}
		ch.Group = g.group(id)
		return nil
	})
	if err != nil {
		return accounts.GroupChange{}, fmt.Errorf("accounts/postgres: remove %q from group %q: %w", user, id, err)
	}
	return ch, nil
}

// SetAdmin implements accounts.GroupStore.
func (s *Store) SetAdmin(ctx context.Context, id, by, user string, admin bool) (accounts.GroupChange, error) {
	var ch accounts.GroupChange
	err := s.inTx(ctx, func(tx pgx.Tx) error {
		g, err := lockGroup(ctx, tx, id)
		if err != nil {
			return err
		}
		updated, changed, err := accounts.PlanSetAdmin(g.members, by, user, admin)
		if err != nil {
			return err
		}
		if !changed {
			ch = accounts.GroupChange{Group: g.group(id)}
			return nil
		}
		g.members = updated
		if _, err := tx.Exec(ctx, `UPDATE group_members SET admin = $3 WHERE group_id = $1 AND user_name = $2`, id, user, admin); err != nil {
			return err
		}
		if err := bumpVersion(ctx, tx, id, &g, 0); err != nil {
			return err
		}
		ch = accounts.GroupChange{Group: g.group(id), Changed: true}
		return nil
	})
	if err != nil {
		return accounts.GroupChange{}, fmt.Errorf("accounts/postgres: set admin %q in group %q: %w", user, id, err)
	}
	return ch, nil
}
