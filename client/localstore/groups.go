package localstore

import (
	"database/sql"
	"errors"
	"fmt"

	"github.com/courier-im/courier/client"
)

// SaveGroup stores g whole: name, membership version, members with their
// admin flags, and whether this user left (client.GroupStore).
func (s *Store) SaveGroup(g client.Group) error {
	if g.ID == "" {
		return errors.New("localstore: save group: no id")
	}
	tx, err := s.db.Begin()
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if _, err := tx.Exec(`INSERT INTO groups (id, name, version, former) VALUES (?, ?, ?, ?)
		ON CONFLICT (id) DO UPDATE SET name = excluded.name, version = excluded.version, former = excluded.former`,
		g.ID, g.Name, g.Version, g.Left); err != nil {
		return fmt.Errorf("localstore: save group: %w", err)
	}
	if _, err := tx.Exec("DELETE FROM group_members WHERE group_id = ?", g.ID); err != nil {
		return fmt.Errorf("localstore: save group: %w", err)
	}
	for _, m := range g.Members {
		if _, err := tx.Exec(`INSERT INTO group_members (group_id, user, admin) VALUES (?, ?, ?)
			ON CONFLICT DO UPDATE SET admin = excluded.admin`, g.ID, m.User, m.Admin); err != nil {
			return fmt.Errorf("localstore: save group: %w", err)
		}
	}
	return tx.Commit()
}

// LoadGroup returns the stored group with this id (client.GroupStore).
func (s *Store) LoadGroup(id string) (client.Group, bool, error) {
	g := client.Group{ID: id}
	err := s.db.QueryRow("SELECT name, version, former FROM groups WHERE id = ?", id).Scan(&g.Name, &g.Version, &g.Left)
	if errors.Is(err, sql.ErrNoRows) {
		return client.Group{}, false, nil
	}
	if err != nil {
		return client.Group{}, false, fmt.Errorf("localstore: load group: %w", err)
	}
	if g.Members, err = s.groupMembers(id); err != nil {
		return client.Group{}, false, err
	}
	return g, true, nil
}

func (s *Store) groupMembers(id string) ([]client.GroupMember, error) {
	rows, err := s.db.Query("SELECT user, admin FROM group_members WHERE group_id = ? ORDER BY user", id)
	if err != nil {
		return nil, fmt.Errorf("localstore: group members: %w", err)
	}
	defer rows.Close()
	var out []client.GroupMember
	for rows.Next() {
		var m client.GroupMember
		if err := rows.Scan(&m.User, &m.Admin); err != nil {
			return nil, err
		}
		out = append(out, m)
	}
	return out, rows.Err()
}

// ListGroups returns every stored group, by name then id
// (client.GroupStore).
func (s *Store) ListGroups() ([]client.Group, error) {
	rows, err := s.db.Query("SELECT id, name, version, former FROM groups ORDER BY name, id")
	if err != nil {
		return nil, fmt.Errorf("localstore: list groups: %w", err)
	}
	var out []client.Group
	for rows.Next() {
		var g client.Group
		if err := rows.Scan(&g.ID, &g.Name, &g.Version, &g.Left); err != nil {
			rows.Close()
			return nil, err
		}
		out = append(out, g)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, err
	}
	for i := range out {
		var err error
		if out[i].Members, err = s.groupMembers(out[i].ID); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// FindGroup returns the stored group whose id is ref, else the one whose
// name is ref (compared without case); a name two groups share is an
// error that lists their ids.
func (s *Store) FindGroup(ref string) (client.Group, bool, error) {
	if g, ok, err := s.LoadGroup(ref); ok || err != nil {
		return g, ok, err
	}
	rows, err := s.db.Query("SELECT id FROM groups WHERE name = ? COLLATE NOCASE ORDER BY id", ref)
	if err != nil {
		return client.Group{}, false, fmt.Errorf("localstore: find group: %w", err)
	}
	var ids []string
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			rows.Close()
			return client.Group{}, false, err
		}
		ids = append(ids, id)
	}
	rows.Close()
	switch len(ids) {
	case 0:
		return client.Group{}, false, rows.Err()
	case 1:
		return s.LoadGroup(ids[0])
	}
	return client.Group{}, false, fmt.Errorf("%d groups are called %q (%v): use the id", len(ids), ref, ids)
}

// UpdateGroupReceipt moves member user's state for the sent group message
// with this server id to st if that is further, and reports whether it
// moved; the message's own status becomes the furthest any member
// reached.
func (s *Store) UpdateGroupReceipt(serverID, user string, st client.Status) (bool, error) {
	if serverID == "" || user == "" {
		return false, errors.New("localstore: group receipt: need a server id and a user")
	}
	tx, err := s.db.Begin()
	if err != nil {
		return false, err
	}
	defer tx.Rollback()
	res, err := tx.Exec(`INSERT INTO group_receipts (server_id, user, status) VALUES (?, ?, ?)
		ON CONFLICT DO UPDATE SET status = excluded.status WHERE excluded.status > group_receipts.status`,
		serverID, user, st)
	if err != nil {
		return false, fmt.Errorf("localstore: group receipt: %w", err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return false, err
	}
	if _, err := tx.Exec(`UPDATE messages SET status = ? WHERE direction = 'out' AND server_id = ? AND status < ?`,
		st, serverID, st); err != nil {
		return false, fmt.Errorf("localstore: group receipt: %w", err)
	}
	return n > 0, tx.Commit()
}

// GroupReceipts returns each member's state for the sent group message
// with this server id (members with no receipt yet are absent).
func (s *Store) GroupReceipts(serverID string) (map[string]client.Status, error) {
	rows, err := s.db.Query("SELECT user, status FROM group_receipts WHERE server_id = ?", serverID)
	if err != nil {
		return nil, fmt.Errorf("localstore: group receipts: %w", err)
	}
	defer rows.Close()
	out := map[string]client.Status{}
	for rows.Next() {
		var u string
		var st client.Status
		if err := rows.Scan(&u, &st); err != nil {
			return nil, err
		}
		out[u] = st
	}
	return out, rows.Err()
}
