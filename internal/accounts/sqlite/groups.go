package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/ident"
)

var _ accounts.GroupStore = (*Store)(nil)

// Every group change is a transaction on the one writer connection, begun
// with BEGIN IMMEDIATE: changes are serialised (also across processes
// sharing the file), so each reads the group as the one before it left it
// and the version moves by exactly one per change. Reads are single
// statements on the readers, so one snapshot each.

// groupQuerier is what reading a group needs: a transaction or a pool.
type groupQuerier interface {
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
}

// groupRow is a group as loaded, members in join order.
type groupRow struct {
	version int64
	created int64
	nextOrd int64
	members []accounts.GroupMember
}

// loadGroup reads a group and its members in one statement. ErrNotFound if
// there is no such group.
func loadGroup(ctx context.Context, q groupQuerier, id string) (groupRow, error) {
	var g groupRow
	if !accounts.ValidGroupID(id) {
		return g, accounts.ErrNotFound
	}
	rows, err := q.QueryContext(ctx, `
		SELECT g.version, g.created, g.next_ord, m.user, m.admin
		FROM groups g LEFT JOIN group_members m ON m.group_id = g.id
		WHERE g.id = ?
		ORDER BY m.ord`, id)
	if err != nil {
		return g, err
	}
	defer rows.Close()
	found := false
	for rows.Next() {
		found = true
		var (
			user  sql.NullString
			admin sql.NullInt64
		)
		if err := rows.Scan(&g.version, &g.created, &g.nextOrd, &user, &admin); err != nil {
			return g, err
		}
		if user.Valid {
			g.members = append(g.members, accounts.GroupMember{User: user.String, Admin: admin.Int64 == 1})
		}
	}
	if err := rows.Err(); err != nil {
		return g, err
	}
	if !found {
		return g, accounts.ErrNotFound
	}
	return g, nil
}

func (g groupRow) group(id string) accounts.Group {
	return accounts.Group{ID: id, Version: uint64(g.version), Members: g.members, Created: fromMillis(g.created)}
}

// checkUsers fails with an *accounts.UnknownUserError for the first of
// users that does not exist.
func checkUsers(ctx context.Context, tx *sql.Tx, users []string) error {
	for _, u := range users {
		if !ident.ValidUser(u) {
			return &accounts.UnknownUserError{User: u}
		}
		var one int
		err := tx.QueryRowContext(ctx, `SELECT 1 FROM users WHERE name = ?`, u).Scan(&one)
		if errors.Is(err, sql.ErrNoRows) {
			return &accounts.UnknownUserError{User: u}
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// CreateGroup implements accounts.GroupStore.
func (s *Store) CreateGroup(ctx context.Context, creator string, members []string) (accounts.GroupChange, error) {
	users := accounts.CollapseMembers(creator, members)
	if len(users) > s.maxGroupMembers {
		return accounts.GroupChange{}, fmt.Errorf("accounts/sqlite: create group: %w", accounts.TooManyMembers(len(users), s.maxGroupMembers))
	}
	id := accounts.NewGroupID()
	ms := time.Now().UnixMilli()
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		if err := checkUsers(ctx, tx, users); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO groups (id, version, created, next_ord) VALUES (?, 1, ?, ?)`,
			id, ms, len(users)); err != nil {
			return err
		}
		for i, u := range users {
			if _, err := tx.ExecContext(ctx, `INSERT INTO group_members (group_id, user, admin, ord) VALUES (?, ?, ?, ?)`,
				id, u, boolInt(i == 0), i); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return accounts.GroupChange{}, fmt.Errorf("accounts/sqlite: create group of %q: %w", creator, err)
	}
	g := accounts.Group{ID: id, Version: 1, Created: fromMillis(ms), Members: make([]accounts.GroupMember, len(users))}
	for i, u := range users {
		g.Members[i] = accounts.GroupMember{User: u, Admin: i == 0}
	}
	return accounts.GroupChange{Group: g, Changed: true, Added: users}, nil
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// Group implements accounts.GroupStore.
func (s *Store) Group(ctx context.Context, id string) (accounts.Group, error) {
	g, err := loadGroup(ctx, s.r, id)
	if err != nil {
		return accounts.Group{}, fmt.Errorf("accounts/sqlite: group %q: %w", id, err)
	}
	return g.group(id), nil
}

// GroupVersion implements accounts.GroupVersioner.
func (s *Store) GroupVersion(ctx context.Context, id string) (uint64, error) {
	if !accounts.ValidGroupID(id) {
		return 0, fmt.Errorf("accounts/sqlite: group %q: %w", id, accounts.ErrNotFound)
	}
	var v int64
	err := s.r.QueryRowContext(ctx, `SELECT version FROM groups WHERE id = ?`, id).Scan(&v)
	if errors.Is(err, sql.ErrNoRows) {
		err = accounts.ErrNotFound
	}
	if err != nil {
		return 0, fmt.Errorf("accounts/sqlite: group %q: %w", id, err)
	}
	return uint64(v), nil
}

var _ accounts.GroupVersioner = (*Store)(nil)

// Groups implements accounts.GroupStore.
func (s *Store) Groups(ctx context.Context, user string) ([]accounts.GroupRef, error) {
	rows, err := s.r.QueryContext(ctx, `
		SELECT g.id, g.version
		FROM group_members m JOIN groups g ON g.id = m.group_id
		WHERE m.user = ?
		ORDER BY g.id`, user)
	if err != nil {
		return nil, fmt.Errorf("accounts/sqlite: groups of %q: %w", user, err)
	}
	defer rows.Close()
	refs := []accounts.GroupRef{}
	for rows.Next() {
		var (
			r accounts.GroupRef
			v int64
		)
		if err := rows.Scan(&r.ID, &v); err != nil {
			return nil, fmt.Errorf("accounts/sqlite: groups of %q: %w", user, err)
		}
		r.Version = uint64(v)
		refs = append(refs, r)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("accounts/sqlite: groups of %q: %w", user, err)
	}
	return refs, nil
}

// bumpVersion records a change of group id.
func bumpVersion(ctx context.Context, tx *sql.Tx, id string, g *groupRow, added int) error {
	g.version++
	g.nextOrd += int64(added)
	_, err := tx.ExecContext(ctx, `UPDATE groups SET version = ?, next_ord = ? WHERE id = ?`, g.version, g.nextOrd, id)
	return err
}

// AddMembers implements accounts.GroupStore.
func (s *Store) AddMembers(ctx context.Context, id, by string, users []string) (accounts.GroupChange, error) {
	var ch accounts.GroupChange
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		g, err := loadGroup(ctx, tx, id)
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
		for i, u := range add {
			if _, err := tx.ExecContext(ctx, `INSERT INTO group_members (group_id, user, admin, ord) VALUES (?, ?, 0, ?)`,
				id, u, g.nextOrd+int64(i)); err != nil {
				return err
			}
			g.members = append(g.members, accounts.GroupMember{User: u})
		}
		if err := bumpVersion(ctx, tx, id, &g, len(add)); err != nil {
			return err
		}
		ch = accounts.GroupChange{Group: g.group(id), Changed: true, Added: add}
		return nil
	})
	if err != nil {
		return accounts.GroupChange{}, fmt.Errorf("accounts/sqlite: add members to group %q: %w", id, err)
	}
	return ch, nil
}

// RemoveMember implements accounts.GroupStore.
func (s *Store) RemoveMember(ctx context.Context, id, by, user string) (accounts.GroupChange, error) {
	var ch accounts.GroupChange
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		g, err := loadGroup(ctx, tx, id)
		if err != nil {
			return err
		}
		rest, promoted, err := accounts.PlanRemove(g.members, by, user)
		if err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, `DELETE FROM group_members WHERE group_id = ? AND user = ?`, id, user); err != nil {
			return err
		}
		g.members = rest
		ch = accounts.GroupChange{Changed: true, Removed: []string{user}}
		if len(rest) == 0 {
			if _, err := tx.ExecContext(ctx, `DELETE FROM groups WHERE id = ?`, id); err != nil {
				return err
			}
			g.version++
			ch.Group, ch.Deleted = g.group(id), true
			return nil
		}
		if promoted != "" {
			if _, err := tx.ExecContext(ctx, `UPDATE group_members SET admin = 1 WHERE group_id = ? AND user = ?`, id, promoted); err != nil {
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
		return accounts.GroupChange{}, fmt.Errorf("accounts/sqlite: remove %q from group %q: %w", user, id, err)
	}
	return ch, nil
}

// SetAdmin implements accounts.GroupStore.
func (s *Store) SetAdmin(ctx context.Context, id, by, user string, admin bool) (accounts.GroupChange, error) {
	var ch accounts.GroupChange
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		g, err := loadGroup(ctx, tx, id)
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
		if _, err := tx.ExecContext(ctx, `UPDATE group_members SET admin = ? WHERE group_id = ? AND user = ?`, boolInt(admin), id, user); err != nil {
			return err
		}
		if err := bumpVersion(ctx, tx, id, &g, 0); err != nil {
			return err
		}
		ch = accounts.GroupChange{Group: g.group(id), Changed: true}
		return nil
	})
	if err != nil {
		return accounts.GroupChange{}, fmt.Errorf("accounts/sqlite: set admin %q in group %q: %w", user, id, err)
	}
	return ch, nil
}
