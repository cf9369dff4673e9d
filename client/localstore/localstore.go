// Package localstore is a device's local database: one SQLite file holding
// the server ids already handled (a client.SeenStore), the outbox (a
// client.OutboxStore) and the message history with each sent message's
// receipt state. The courier CLI keeps one per profile.
//
// The file is in WAL mode with synchronous=FULL: what a method has written
// survives a crash, which is what lets the SDK acknowledge an entry once it
// is stored. Several processes may use the same file; writers wait for
// each other (busy timeout) rather than fail.
//
// The schema is versioned with PRAGMA user_version and migrated forward
// when a file is opened; a file newer than the code is refused.
package localstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	_ "modernc.org/sqlite" // the "sqlite" database/sql driver

	"github.com/courier-im/courier/client"
)

// Direction says whether a message was received or sent by this user.
type Direction string

// Directions.
const (
	In  Direction = "in"  // received from the peer
	Out Direction = "out" // sent to the peer, from this device or another of this user's
)

// Message is one message of the history.
type Message struct {
	ServerID    string // "" while the message waits in the outbox
	ClientMsgID string
	Direction   Direction
	// Peer is the conversation: the other user, or for a group message
	// client.GroupPeer of the group ("#" and its id).
	Peer       string
	Group      string // a group message's group id
	From       string
	FromDevice uint32
	Body       []byte
	// Time is the server's acceptance time, or, while the message waits in
	// the outbox, when it was queued.
	Time time.Time
	// Status is how far a sent message got; a received one is
	// StatusDelivered, and StatusRead once marked read.
	Status client.Status
	// ReadAt is when this user marked a received message read.
	ReadAt time.Time
}

// Ref returns the message's ids.
func (m Message) Ref() client.MessageRef {
	return client.MessageRef{ServerID: m.ServerID, ClientMsgID: m.ClientMsgID}
}

// Store is an open local database. Its methods are safe for concurrent
// use.
type Store struct {
	db *sql.DB
}

var (
	_ client.SeenStore  = (*Store)(nil)
	_ client.GroupStore = (*Store)(nil)
)

// Open opens (creating it if needed) the database at path and brings its
// schema up to date.
func Open(path string) (*Store, error) {
	dsn := path + "?_pragma=journal_mode(WAL)&_pragma=synchronous(FULL)&_pragma=busy_timeout(10000)&_txlock=immediate"
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("localstore: open %s: %w", path, err)
	}
	// One connection: the CLI's needs are small, and writes from one
	// process then never contend with each other.
	db.SetMaxOpenConns(1)
	s := &Store{db: db}
	if err := s.migrate(context.Background()); err != nil {
		db.Close()
		return nil, fmt.Errorf("localstore: %s: %w", path, err)
	}
	return s, nil
}

// DB returns the database, for the layers built on the store that keep
// their own tables in it (client/e2e: keys, sessions, contacts). They are
// created by this package's migrations, so that one file has one schema
// version.
func (s *Store) DB() *sql.DB { return s.db }

// Close closes the database.
func (s *Store) Close() error { return s.db.Close() }

// Version returns the schema version of the open file.
func (s *Store) Version() (int, error) {
	var v int
	err := s.db.QueryRow("PRAGMA user_version").Scan(&v)
	return v, err
}

func (s *Store) migrate(ctx context.Context) (err error) {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	defer func() {
		if err != nil {
			tx.Rollback()
		}
	}()
	var have int
	if err := tx.QueryRowContext(ctx, "PRAGMA user_version").Scan(&have); err != nil {
		return fmt.Errorf("migrate: read the schema version: %w", err)
	}
	if have > len(migrations) {
		return fmt.Errorf("schema version %d is newer than this program knows (%d)", have, len(migrations))
	}
	if have == len(migrations) {
		return tx.Commit()
	}
	for i := have; i < len(migrations); i++ {
		if _, err := tx.ExecContext(ctx, migrations[i]); err != nil {
			return fmt.Errorf("migrate to version %d: %w", i+1, err)
		}
	}
	// PRAGMA values cannot be bound; this one is an int of ours.
	if _, err := tx.ExecContext(ctx, "PRAGMA user_version = "+strconv.Itoa(len(migrations))); err != nil {
		return fmt.Errorf("migrate: set the schema version: %w", err)
	}
	return tx.Commit()
}

func ms(t time.Time) int64 { return t.UnixMilli() }

func fromMs(v sql.NullInt64) time.Time {
	if !v.Valid {
		return time.Time{}
	}
	return time.UnixMilli(v.Int64)
}

// Seen reports whether serverID was marked seen (client.SeenStore).
func (s *Store) Seen(serverID string) (bool, error) {
	var one int
	err := s.db.QueryRow("SELECT 1 FROM seen WHERE server_id = ?", serverID).Scan(&one)
	if errors.Is(err, sql.ErrNoRows) {
		return false, nil
	}
	return err == nil, err
}

// MarkSeen records serverID as handled (client.SeenStore).
func (s *Store) MarkSeen(serverID string) error {
	_, err := s.db.Exec("INSERT INTO seen (server_id, seen_at) VALUES (?, ?) ON CONFLICT DO NOTHING", serverID, ms(time.Now()))
	return err
}

// PruneSeen forgets the seen ids recorded before t. Ids are needed only as
// long as the server could deliver their entries again: its retention of
// unacknowledged entries (30 days by default).
func (s *Store) PruneSeen(before time.Time) (int64, error) {
	res, err := s.db.Exec("DELETE FROM seen WHERE seen_at < ?", ms(before))
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}

// RecordReceived stores a message delivered to this device, and reports
// whether it was new. A copy of a message sent by another device of this
// user (ev.Sync) is stored as sent, to ev.To, with StatusSent.
func (s *Store) RecordReceived(ev *client.MessageEvent) (bool, error) {
	dir, peer, status := In, ev.From, client.StatusDelivered
	if ev.Sync {
		dir, peer, status = Out, ev.To, client.StatusSent
	}
	if ev.Group != "" {
		peer = client.GroupPeer(ev.Group)
	}
	res, err := s.db.Exec(`INSERT INTO messages
		(server_id, client_msg_id, direction, peer, group_id, from_user, from_device, body, time, status)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING`,
		ev.ServerID, ev.ClientMsgID, dir, peer, ev.Group, ev.From, ev.FromDevice, nonNil(ev.Body), ms(ev.Time), status)
	if err != nil {
		return false, fmt.Errorf("localstore: record received: %w", err)
	}
	n, err := res.RowsAffected()
	return n == 1, err
}

func nonNil(b []byte) []byte {
	if b == nil {
		return []byte{}
	}
	return b
}

// RecordSent stores a message this device is sending, as StatusPending,
// unless it is stored already. The outbox (Outbox) calls it when a message
// enters it.
func (s *Store) RecordSent(m client.OutboxMessage) error {
	return recordSent(s.db, m)
}

type execer interface {
	Exec(query string, args ...any) (sql.Result, error)
}

func recordSent(db execer, m client.OutboxMessage) error {
	peer, group := m.To, ""
	if m.ToGroup() {
		peer, group = client.GroupPeer(m.Group), m.Group
	}
	_, err := db.Exec(`INSERT INTO messages
		(client_msg_id, direction, peer, group_id, from_user, from_device, body, time, status)
		VALUES (?, 'out', ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING`,
		m.ClientMsgID, peer, group, m.From.User, m.From.ID, nonNil(m.Body), ms(m.Created), client.StatusPending)
	if err != nil {
		return fmt.Errorf("localstore: record sent: %w", err)
	}
	return nil
}

// MarkSent records the server's acceptance of a sent message: its server
// id and time, and StatusSent unless it got further already.
func (s *Store) MarkSent(sent client.Sent) error {
	_, err := s.db.Exec(`UPDATE messages SET server_id = ?, time = ?, status = max(status, ?)
		WHERE direction = 'out' AND client_msg_id = ? AND (server_id IS NULL OR server_id = ?)`,
		sent.ServerID, ms(sent.Time), client.StatusSent, sent.ClientMsgID, sent.ServerID)
	if err != nil {
		return fmt.Errorf("localstore: mark sent: %w", err)
	}
	return nil
}

// DropUnsent deletes a sent message that the server refused for good: it
// was never sent, so it is not history.
func (s *Store) DropUnsent(clientMsgID string) error {
	_, err := s.db.Exec("DELETE FROM messages WHERE direction = 'out' AND client_msg_id = ? AND server_id IS NULL", clientMsgID)
	return err
}

// UpdateStatus moves a sent message, found by server id or client id, to
// st if that is further than it got, and reports whether it moved: the
// receipt state machine, kept across restarts.
func (s *Store) UpdateStatus(ref client.MessageRef, st client.Status) (bool, error) {
	res, err := s.db.Exec(`UPDATE messages SET status = ?,
			server_id = coalesce(server_id, nullif(?, ''))
		WHERE direction = 'out' AND status < ?
			AND ((server_id = ? AND ? != '') OR (client_msg_id = ? AND ? != ''))`,
		st, ref.ServerID, st, ref.ServerID, ref.ServerID, ref.ClientMsgID, ref.ClientMsgID)
	if err != nil {
		return false, fmt.Errorf("localstore: update status: %w", err)
	}
	n, err := res.RowsAffected()
	return n > 0, err
}

const messageColumns = `server_id, client_msg_id, direction, peer, group_id, from_user, from_device, body, time, status, read_at`

func scanMessages(rows *sql.Rows) ([]Message, error) {
	defer rows.Close()
	var out []Message
	for rows.Next() {
		var m Message
		var serverID sql.NullString
		var t, readAt sql.NullInt64
		if err := rows.Scan(&serverID, &m.ClientMsgID, &m.Direction, &m.Peer, &m.Group, &m.From, &m.FromDevice,
			&m.Body, &t, &m.Status, &readAt); err != nil {
			return nil, err
		}
		m.ServerID = serverID.String
		m.Time = fromMs(t)
		m.ReadAt = fromMs(readAt)
		out = append(out, m)
	}
	return out, rows.Err()
}

// Find returns the message with this server id or client message id.
func (s *Store) Find(ref client.MessageRef) (Message, bool, error) {
	rows, err := s.db.Query(`SELECT `+messageColumns+` FROM messages
		WHERE (server_id = ? AND ? != '') OR (client_msg_id = ? AND ? != '')
		ORDER BY direction DESC LIMIT 1`, // 'out' first: receipts are about sent messages
		ref.ServerID, ref.ServerID, ref.ClientMsgID, ref.ClientMsgID)
	if err != nil {
		return Message{}, false, err
	}
	ms, err := scanMessages(rows)
	if err != nil || len(ms) == 0 {
		return Message{}, false, err
	}
	return ms[0], true, nil
}

// Unread returns the received messages not marked read, from peer (or
// from everyone if peer is ""), oldest first.
func (s *Store) Unread(peer string) ([]Message, error) {
	rows, err := s.db.Query(`SELECT `+messageColumns+` FROM messages
		WHERE direction = 'in' AND read_at IS NULL AND (peer = ? OR ? = '')
		ORDER BY time, id`, peer, peer)
	if err != nil {
		return nil, fmt.Errorf("localstore: unread: %w", err)
	}
	return scanMessages(rows)
}

// MarkRead records that this user read the received messages with these
// server ids, at time at.
func (s *Store) MarkRead(serverIDs []string, at time.Time) error {
	if len(serverIDs) == 0 {
		return nil
	}
	tx, err := s.db.Begin()
	if err != nil {
		return err
	}
	defer tx.Rollback()
	for _, id := range serverIDs {
		if _, err := tx.Exec(`UPDATE messages SET read_at = ?, status = max(status, ?)
			WHERE direction = 'in' AND server_id = ? AND read_at IS NULL`, ms(at), client.StatusRead, id); err != nil {
			return fmt.Errorf("localstore: mark read: %w", err)
		}
	}
	return tx.Commit()
}

// Recent returns the last limit messages with peer, oldest first.
func (s *Store) Recent(peer string, limit int) ([]Message, error) {
	rows, err := s.db.Query(`SELECT `+messageColumns+` FROM messages
		WHERE peer = ? ORDER BY time DESC, id DESC LIMIT ?`, peer, limit)
	if err != nil {
		return nil, fmt.Errorf("localstore: recent: %w", err)
	}
	out, err := scanMessages(rows)
	for i, j := 0, len(out)-1; i < j; i, j = i+1, j-1 {
		out[i], out[j] = out[j], out[i]
	}
	return out, err
}

// Outbox returns the store's outbox, for client.Config.Outbox. A message
// entering it is also recorded in the history, as pending (RecordSent).
func (s *Store) Outbox() client.OutboxStore { return outbox{s} }

type outbox struct{ s *Store }

func (o outbox) Add(m client.OutboxMessage) error {
	tx, err := o.s.db.Begin()
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if _, err := tx.Exec(`INSERT INTO outbox (client_msg_id, from_user, from_device, to_user, body, created, control, content_id, group_id)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`, m.ClientMsgID, m.From.User, m.From.ID, m.To, nonNil(m.Body), ms(m.Created),
		m.Control, m.ContentID, m.Group); err != nil {
		return fmt.Errorf("localstore: outbox: %w", err)
	}
	// A control message or a resend is not the user's: no history.
	if !m.Control && m.ContentID == "" {
		if err := recordSent(tx, m); err != nil {
			return err
		}
	}
	return tx.Commit()
}

func (o outbox) Remove(clientMsgID string) error {
	_, err := o.s.db.Exec("DELETE FROM outbox WHERE client_msg_id = ?", clientMsgID)
	return err
}

func (o outbox) Pending() ([]client.OutboxMessage, error) {
	rows, err := o.s.db.Query(`SELECT client_msg_id, from_user, from_device, to_user, body, created, control, content_id, group_id
		FROM outbox ORDER BY seq`)
	if err != nil {
		return nil, fmt.Errorf("localstore: outbox: %w", err)
	}
	defer rows.Close()
	var out []client.OutboxMessage
	for rows.Next() {
		var m client.OutboxMessage
		var created int64
		if err := rows.Scan(&m.ClientMsgID, &m.From.User, &m.From.ID, &m.To, &m.Body, &created, &m.Control, &m.ContentID, &m.Group); err != nil {
			return nil, err
		}
		m.Created = time.UnixMilli(created)
		out = append(out, m)
	}
	return out, rows.Err()
}

// Search returns the messages of the history whose text matches query, most
// recent first, at most limit: full-text search (SQLite FTS5) over what
// this device stored. Every word of query must occur (as a word, or as a
// word's beginning when it ends with *); case and diacritics are ignored.
func (s *Store) Search(query string, limit int) ([]Message, error) {
	match := ftsQuery(query)
	if match == "" {
		return nil, errors.New("localstore: search: nothing to search for")
	}
	rows, err := s.db.Query(`SELECT `+prefixed("m.", messageColumns)+` FROM messages_fts
		JOIN messages m ON m.id = messages_fts.rowid
		WHERE messages_fts MATCH ? ORDER BY m.time DESC, m.id DESC LIMIT ?`, match, limit)
	if err != nil {
		return nil, fmt.Errorf("localstore: search: %w", err)
	}
	return scanMessages(rows)
}

// ftsQuery turns words typed by a user into an FTS5 query that cannot be
// a syntax error: each word quoted, a trailing * kept as a prefix search.
func ftsQuery(q string) string {
	var terms []string
	for _, w := range strings.Fields(q) {
		prefix := strings.HasSuffix(w, "*")
		w = strings.TrimRight(w, "*")
		if w == "" {
			continue
		}
		t := `"` + strings.ReplaceAll(w, `"`, `""`) + `"`
		if prefix {
			t += "*"
		}
		terms = append(terms, t)
	}
	return strings.Join(terms, " ")
}

func prefixed(p, columns string) string {
	cols := strings.Split(columns, ", ")
	for i, c := range cols {
		cols[i] = p + c
	}
	return strings.Join(cols, ", ")
}
