package e2e

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	grouprecord "go.mau.fi/libsignal/groups/state/record"
	"go.mau.fi/libsignal/keys/identity"
	"go.mau.fi/libsignal/protocol"
	"go.mau.fi/libsignal/serialize"
	"go.mau.fi/libsignal/state/record"
)

// signalStore implements libsignal's IdentityKey, PreKey, SignedPreKey and
// Session stores on the local SQLite file (tables created by
// client/localstore's migrations).
type signalStore struct {
	// q is the database, or the transaction of the operation in progress
	// (Engine.inTx). It is read and swapped under Engine.mu only.
	q        querier
	ser      *serialize.Serializer
	identity *identity.KeyPair
	regID    uint32
	// changed is told of a device whose identity key was recorded for the
	// first time or replaced.
	changed func(user string)
}

// querier is what *sql.DB and *sql.Tx have in common.
type querier interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

func ms(t time.Time) int64 { return t.UnixMilli() }

// IdentityKey store.

func (s *signalStore) GetIdentityKeyPair() *identity.KeyPair { return s.identity }
func (s *signalStore) GetLocalRegistrationID() uint32        { return s.regID }

// SaveIdentity records the identity key of a device (the contacts table).
func (s *signalStore) SaveIdentity(ctx context.Context, addr *protocol.SignalAddress, key *identity.Key) error {
	changed, err := saveContact(ctx, s.q, addr.Name(), addr.DeviceID(), key.Serialize())
	if err != nil {
		return err
	}
	if changed && s.changed != nil {
		s.changed(addr.Name())
	}
	return nil
}

// saveContact records a device's identity key and reports whether that
// was news (a new device, or a new key).
func saveContact(ctx context.Context, db querier, user string, device uint32, key []byte) (bool, error) {
	var have []byte
	err := db.QueryRowContext(ctx, "SELECT identity_key FROM contacts WHERE user = ? AND device = ?", user, device).Scan(&have)
	switch {
	case err == nil && bytes.Equal(have, key):
		return false, nil
	case err != nil && !errors.Is(err, sql.ErrNoRows):
		return false, fmt.Errorf("e2e: contacts: %w", err)
	}
	_, err = db.ExecContext(ctx, `INSERT INTO contacts (user, device, identity_key, first_seen) VALUES (?, ?, ?, ?)
		ON CONFLICT (user, device) DO UPDATE SET identity_key = excluded.identity_key, first_seen = excluded.first_seen`,
		user, device, key, ms(time.Now()))
	if err != nil {
		return false, fmt.Errorf("e2e: contacts: %w", err)
	}
	return true, nil
}

// IsTrustedIdentity trusts the first key seen for a device, and no other:
// the server binds an identity key to a device for good (a new identity
// is a new device), so a different key for a known device means the
// server lies, until the user accepts it (Engine.Accept).
func (s *signalStore) IsTrustedIdentity(ctx context.Context, addr *protocol.SignalAddress, key *identity.Key) (bool, error) {
	var have []byte
	err := s.q.QueryRowContext(ctx, "SELECT identity_key FROM contacts WHERE user = ? AND device = ?",
		addr.Name(), addr.DeviceID()).Scan(&have)
	if errors.Is(err, sql.ErrNoRows) {
		return true, nil
	}
	if err != nil {
		return false, fmt.Errorf("e2e: contacts: %w", err)
	}
	return bytes.Equal(have, key.Serialize()), nil
}

// PreKey store.

func (s *signalStore) LoadPreKey(ctx context.Context, id uint32) (*record.PreKey, error) {
	var b []byte
	err := s.q.QueryRowContext(ctx, "SELECT record FROM e2e_prekeys WHERE id = ?", id).Scan(&b)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("e2e: load prekey %d: %w", id, err)
	}
	return record.NewPreKeyFromBytes(b, s.ser.PreKeyRecord)
}

func (s *signalStore) StorePreKey(ctx context.Context, id uint32, r *record.PreKey) error {
	_, err := s.q.ExecContext(ctx, "INSERT OR REPLACE INTO e2e_prekeys (id, record) VALUES (?, ?)", id, r.Serialize())
	return err
}

func (s *signalStore) ContainsPreKey(ctx context.Context, id uint32) (bool, error) {
	return s.exists(ctx, "SELECT 1 FROM e2e_prekeys WHERE id = ?", id)
}

func (s *signalStore) RemovePreKey(ctx context.Context, id uint32) error {
	_, err := s.q.ExecContext(ctx, "DELETE FROM e2e_prekeys WHERE id = ?", id)
	return err
}

func (s *signalStore) exists(ctx context.Context, q string, args ...any) (bool, error) {
	var one int
	err := s.q.QueryRowContext(ctx, q, args...).Scan(&one)
	if errors.Is(err, sql.ErrNoRows) {
		return false, nil
	}
	return err == nil, err
}

// SignedPreKey store.

func (s *signalStore) LoadSignedPreKey(ctx context.Context, id uint32) (*record.SignedPreKey, error) {
	var b []byte
	err := s.q.QueryRowContext(ctx, "SELECT record FROM e2e_signed_prekeys WHERE id = ?", id).Scan(&b)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("e2e: load signed prekey %d: %w", id, err)
	}
	return record.NewSignedPreKeyFromBytes(b, s.ser.SignedPreKeyRecord)
}

func (s *signalStore) LoadSignedPreKeys(ctx context.Context) ([]*record.SignedPreKey, error) {
	rows, err := s.q.QueryContext(ctx, "SELECT record FROM e2e_signed_prekeys ORDER BY id")
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []*record.SignedPreKey
	for rows.Next() {
		var b []byte
		if err := rows.Scan(&b); err != nil {
			return nil, err
		}
		r, err := record.NewSignedPreKeyFromBytes(b, s.ser.SignedPreKeyRecord)
		if err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

func (s *signalStore) StoreSignedPreKey(ctx context.Context, id uint32, r *record.SignedPreKey) error {
	_, err := s.q.ExecContext(ctx, "INSERT OR REPLACE INTO e2e_signed_prekeys (id, record, created) VALUES (?, ?, ?)",
		id, r.Serialize(), r.Timestamp()*1000)
	return err
}

func (s *signalStore) ContainsSignedPreKey(ctx context.Context, id uint32) (bool, error) {
	return s.exists(ctx, "SELECT 1 FROM e2e_signed_prekeys WHERE id = ?", id)
}

func (s *signalStore) RemoveSignedPreKey(ctx context.Context, id uint32) error {
	_, err := s.q.ExecContext(ctx, "DELETE FROM e2e_signed_prekeys WHERE id = ?", id)
	return err
}

// Session store.

func (s *signalStore) LoadSession(ctx context.Context, addr *protocol.SignalAddress) (*record.Session, error) {
	var b []byte
	err := s.q.QueryRowContext(ctx, "SELECT record FROM e2e_sessions WHERE user = ? AND device = ?",
		addr.Name(), addr.DeviceID()).Scan(&b)
	if errors.Is(err, sql.ErrNoRows) {
		return record.NewSession(s.ser.Session, s.ser.State), nil
	}
	if err != nil {
		return nil, fmt.Errorf("e2e: load session %s: %w", addr, err)
	}
	r, err := record.NewSessionFromBytes(b, s.ser.Session, s.ser.State)
	if err != nil {
		return nil, fmt.Errorf("e2e: session %s is corrupt: %w", addr, err)
	}
	return r, nil
}

func (s *signalStore) GetSubDeviceSessions(ctx context.Context, name string) ([]uint32, error) {
	rows, err := s.q.QueryContext(ctx, "SELECT device FROM e2e_sessions WHERE user = ? ORDER BY device", name)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []uint32
	for rows.Next() {
		var d uint32
		if err := rows.Scan(&d); err != nil {
			return nil, err
		}
		out = append(out, d)
	}
	return out, rows.Err()
}

func (s *signalStore) StoreSession(ctx context.Context, addr *protocol.SignalAddress, r *record.Session) error {
	_, err := s.q.ExecContext(ctx, "INSERT OR REPLACE INTO e2e_sessions (user, device, record) VALUES (?, ?, ?)",
		addr.Name(), addr.DeviceID(), r.Serialize())
	if err != nil {
		return fmt.Errorf("e2e: store session %s: %w", addr, err)
	}
	return nil
}

func (s *signalStore) ContainsSession(ctx context.Context, addr *protocol.SignalAddress) (bool, error) {
	return s.exists(ctx, "SELECT 1 FROM e2e_sessions WHERE user = ? AND device = ?", addr.Name(), addr.DeviceID())
}

func (s *signalStore) DeleteSession(ctx context.Context, addr *protocol.SignalAddress) error {
	_, err := s.q.ExecContext(ctx, "DELETE FROM e2e_sessions WHERE user = ? AND device = ?", addr.Name(), addr.DeviceID())
	return err
}

func (s *signalStore) DeleteAllSessions(ctx context.Context) error {
	_, err := s.q.ExecContext(ctx, "DELETE FROM e2e_sessions")
	return err
}

// SenderKey store (libsignal groups): records per group and sending
// device, in e2e_sender_keys.

func (s *signalStore) StoreSenderKey(ctx context.Context, name *protocol.SenderKeyName, r *grouprecord.SenderKey) error {
	_, err := s.q.ExecContext(ctx, "INSERT OR REPLACE INTO e2e_sender_keys (group_id, user, device, record) VALUES (?, ?, ?, ?)",
		name.GroupID(), name.Sender().Name(), name.Sender().DeviceID(), r.Serialize())
	if err != nil {
		return fmt.Errorf("e2e: store sender key %s/%s: %w", name.GroupID(), name.Sender(), err)
	}
	return nil
}

// LoadSenderKey returns the record, empty if there is none (the group
// cipher expects a record either way).
func (s *signalStore) LoadSenderKey(ctx context.Context, name *protocol.SenderKeyName) (*grouprecord.SenderKey, error) {
	var b []byte
	err := s.q.QueryRowContext(ctx, "SELECT record FROM e2e_sender_keys WHERE group_id = ? AND user = ? AND device = ?",
		name.GroupID(), name.Sender().Name(), name.Sender().DeviceID()).Scan(&b)
	if errors.Is(err, sql.ErrNoRows) {
		return grouprecord.NewSenderKey(s.ser.SenderKeyRecord, s.ser.SenderKeyState), nil
	}
	if err != nil {
		return nil, fmt.Errorf("e2e: load sender key %s/%s: %w", name.GroupID(), name.Sender(), err)
	}
	r, err := grouprecord.NewSenderKeyFromBytes(b, s.ser.SenderKeyRecord, s.ser.SenderKeyState)
	if err != nil {
		return nil, fmt.Errorf("e2e: sender key %s/%s is corrupt: %w", name.GroupID(), name.Sender(), err)
	}
	return r, nil
}
