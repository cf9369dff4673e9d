package e2e

import (
	"bytes"
	"context"
	"crypto/sha512"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"go.mau.fi/libsignal/fingerprint"
	"go.mau.fi/libsignal/protocol"

	"github.com/courier-im/courier/client"
)

// fingerprintIterations is how many times the SHA-512 chain is iterated,
// as Signal does for its safety numbers (it makes finding a key set with a
// chosen number costly).
const fingerprintIterations = 5200

// fingerprintOf is one side of a safety number: 30 bytes derived from a
// user's name and the identity keys of all its devices (sorted, so the
// order devices are listed in does not matter). Written from the
// published description of Signal's numeric fingerprint: version 0, the
// key material and the stable identifier hashed once, then the hash and
// the keys hashed again fingerprintIterations times.
func fingerprintOf(user string, keys [][]byte) []byte {
	sorted := slices.Clone(keys)
	slices.SortFunc(sorted, bytes.Compare)
	material := bytes.Join(sorted, nil)
	h := sha512.New()
	h.Write([]byte{0, 0})
	h.Write(material)
	h.Write([]byte(user))
	sum := h.Sum(nil)
	for range fingerprintIterations {
		h.Reset()
		h.Write(sum)
		h.Write(material)
		sum = h.Sum(sum[:0])
	}
	return sum[:30]
}

// DeviceKey is one device's identity key as this device knows it.
type DeviceKey struct {
	Device client.Device
	Key    []byte
}

// Fingerprint returns the key (its 32 bytes, without the type byte) in
// groups of hex digits, for reading out.
func (k DeviceKey) Fingerprint() string {
	key := k.Key
	if len(key) == 33 {
		key = key[1:]
	}
	h := hex.EncodeToString(key)
	var parts []string
	for i := 0; i < len(h); i += 8 {
		parts = append(parts, h[i:min(i+8, len(h))])
	}
	return strings.Join(parts, " ")
}

// Safety is the safety number of this user with a contact: compare Number
// with the contact's (on their device, for this user), out of band. It
// changes when either side's devices or identity keys change.
type Safety struct {
	User   string
	Number string // 60 digits, in 12 groups of 5
	Local  []DeviceKey
	Remote []DeviceKey
	// Verified: the user marked the contact verified at this number.
	Verified bool
	// Changed: the contact was verified, and their keys changed since:
	// sending to them is blocked until Accept.
	Changed bool
	// ChangedAt is when the contact's keys last changed (zero if never
	// seen to change).
	ChangedAt time.Time
}

// devicesOf returns the identity keys known for user's devices, this
// device's own included when user is this user.
func (e *Engine) devicesOf(ctx context.Context, user string) ([]DeviceKey, error) {
	rows, err := e.ss.q.QueryContext(ctx, "SELECT device, identity_key FROM contacts WHERE user = ? ORDER BY device", user)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []DeviceKey
	for rows.Next() {
		var k DeviceKey
		k.Device.User = user
		if err := rows.Scan(&k.Device.ID, &k.Key); err != nil {
			return nil, err
		}
		out = append(out, k)
	}
	if user == e.self.User {
		out = append(out, DeviceKey{Device: e.self, Key: e.IdentityKey()})
		slices.SortFunc(out, func(a, b DeviceKey) int { return int(a.Device.ID) - int(b.Device.ID) })
	}
	return out, rows.Err()
}

func keysOf(dks []DeviceKey) [][]byte {
	out := make([][]byte, len(dks))
	for i, k := range dks {
		out[i] = k.Key
	}
	return out
}

// remoteNumber is the digits of user's side of the safety number: what
// verification pins.
func (e *Engine) remoteNumber(ctx context.Context, user string) (string, []DeviceKey, error) {
	dks, err := e.devicesOf(ctx, user)
	if err != nil || len(dks) == 0 {
		return "", dks, err
	}
	return hex.EncodeToString(fingerprintOf(user, keysOf(dks))), dks, nil
}

// numberMayHaveChanged compares user's side of the safety number with the
// one last seen, and tells the user loudly when it changed. Under e.mu.
func (e *Engine) numberMayHaveChanged(ctx context.Context, user string) error {
	if user == e.self.User {
		return nil
	}
	num, _, err := e.remoteNumber(ctx, user)
	if err != nil {
		return err
	}
	var seen string
	var verified sql.NullString
	err = e.ss.q.QueryRowContext(ctx, "SELECT seen_number, verified_number FROM contact_trust WHERE user = ?", user).Scan(&seen, &verified)
	if errors.Is(err, sql.ErrNoRows) {
		_, err = e.ss.q.ExecContext(ctx, "INSERT INTO contact_trust (user, seen_number) VALUES (?, ?)", user, num)
		return err
	}
	if err != nil || seen == num {
		return err
	}
	if _, err := e.ss.q.ExecContext(ctx, "UPDATE contact_trust SET seen_number = ?, changed_at = ? WHERE user = ?",
		num, ms(time.Now()), user); err != nil {
		return err
	}
	if seen != "" {
		text := fmt.Sprintf("%s's safety number changed: their devices or keys changed. Compare it again with 'courier verify %s'.", user, user)
		if verified.Valid {
			text = fmt.Sprintf("%s's safety number changed since you verified it: their devices or keys changed. Sending to %s is blocked until you compare the new number ('courier verify %s') and accept it ('courier verify --accept %s').", user, user, user, user)
		}
		e.notify(Notice{Kind: IdentityChanged, User: user, Verified: verified.Valid, Text: text})
	}
	return nil
}

// identityChanged reports a device whose identity key is not the one
// recorded. Under e.mu.
func (e *Engine) identityChanged(ctx context.Context, user string, device uint32) {
	var verified sql.NullString
	e.ss.q.QueryRowContext(ctx, "SELECT verified_number FROM contact_trust WHERE user = ?", user).Scan(&verified)
	e.notify(Notice{Kind: IdentityChanged, User: user, Device: device, Verified: verified.Valid,
		Text: fmt.Sprintf("%s.%d presents another identity key than before: its messages are refused until you accept it ('courier verify --accept %s')", user, device, user)})
}

// blocked reports whether user is verified and their number changed since.
func (e *Engine) blocked(ctx context.Context, user string) (bool, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	var verified sql.NullString
	err := e.ss.q.QueryRowContext(ctx, "SELECT verified_number FROM contact_trust WHERE user = ?", user).Scan(&verified)
	if errors.Is(err, sql.ErrNoRows) || (err == nil && !verified.Valid) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	num, _, err := e.remoteNumber(ctx, user)
	return err == nil && num != verified.String, err
}

// Refresh updates what this device knows of user's devices and identity
// keys, and of this user's own, from the server's device lists (devices
// without keys are left out), so that SafetyNumber is current.
func (e *Engine) Refresh(ctx context.Context, user string) error {
	if user != e.self.User {
		if err := e.refresh(ctx, e.self.User); err != nil {
			return err
		}
	}
	return e.refresh(ctx, user)
}

func (e *Engine) refresh(ctx context.Context, user string) error {
	devs, err := e.keys.Devices(ctx, user)
	if err != nil {
		return err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	var current []uint32
	for _, d := range devs {
		current = append(current, d.ID)
	}
	removed, err := e.forgetDevicesExcept(ctx, user, current)
	if err != nil {
		return err
	}
	for _, d := range devs {
		if d.IdentityKey == nil || (user == e.self.User && d.ID == e.self.ID) {
			continue
		}
		if _, err := decodeKey(d.IdentityKey); err != nil {
			return fmt.Errorf("e2e: %s.%d: identity key: %w", user, d.ID, err)
		}
		changed, err := saveContactChecked(ctx, e, user, d.ID, d.IdentityKey)
		if err != nil {
			return err
		}
		removed = removed || changed
	}
	if removed {
		return e.numberMayHaveChanged(ctx, user)
	}
	return nil
}

// saveContactChecked records a device's key unless another key is
// recorded for it (that is reported, and kept until Accept).
func saveContactChecked(ctx context.Context, e *Engine, user string, device uint32, key []byte) (bool, error) {
	var have []byte
	err := e.ss.q.QueryRowContext(ctx, "SELECT identity_key FROM contacts WHERE user = ? AND device = ?", user, device).Scan(&have)
	if err == nil && !bytes.Equal(have, key) {
		e.identityChanged(ctx, user, device)
		return false, nil
	}
	return saveContact(ctx, e.ss.q, user, device, key)
}

// SafetyNumber returns this user's safety number with user, from the keys
// this device knows (call Refresh first to bring them up to date).
func (e *Engine) SafetyNumber(ctx context.Context, user string) (Safety, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	s := Safety{User: user}
	num, remote, err := e.remoteNumber(ctx, user)
	if err != nil {
		return s, err
	}
	if len(remote) == 0 {
		return s, fmt.Errorf("no identity key known for any device of %s", user)
	}
	local, err := e.devicesOf(ctx, e.self.User)
	if err != nil {
		return s, err
	}
	s.Local, s.Remote = local, remote
	s.Number = groups(fingerprint.NewDisplay(fingerprintOf(e.self.User, keysOf(local)), fingerprintOf(user, keysOf(remote))).DisplayText())
	var verified sql.NullString
	var changed sql.NullInt64
	err = e.ss.q.QueryRowContext(ctx, "SELECT verified_number, changed_at FROM contact_trust WHERE user = ?", user).Scan(&verified, &changed)
	if err != nil && !errors.Is(err, sql.ErrNoRows) {
		return s, err
	}
	s.Verified = verified.Valid && verified.String == num
	s.Changed = verified.Valid && verified.String != num
	if changed.Valid {
		s.ChangedAt = time.UnixMilli(changed.Int64)
	}
	return s, nil
}

func groups(digits string) string {
	var parts []string
	for i := 0; i < len(digits); i += 5 {
		parts = append(parts, digits[i:min(i+5, len(digits))])
	}
	return strings.Join(parts, " ")
}

// MarkVerified records that the user compared the safety number with
// user and it matched: from now on, a change of user's keys or devices
// blocks sending to them until accepted.
func (e *Engine) MarkVerified(ctx context.Context, user string) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	num, _, err := e.remoteNumber(ctx, user)
	if err != nil {
		return err
	}
	if num == "" {
		return fmt.Errorf("no identity key known for any device of %s", user)
	}
	_, err = e.ss.q.ExecContext(ctx, `INSERT INTO contact_trust (user, seen_number, verified_number, verified_at) VALUES (?, ?, ?, ?)
		ON CONFLICT (user) DO UPDATE SET seen_number = excluded.seen_number, verified_number = excluded.verified_number,
			verified_at = excluded.verified_at`, user, num, num, ms(time.Now()))
	return err
}

// Accept accepts a change of user's keys or devices: a verified contact
// whose number changed becomes unverified (sending is no longer blocked;
// compare the new number and MarkVerified again), and a device that
// presented a new identity key is trusted with it (its old session is
// dropped).
func (e *Engine) Accept(ctx context.Context, user string) error {
	devs, err := e.keys.Devices(ctx, user)
	if err != nil {
		return err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, d := range devs {
		if d.IdentityKey == nil || (user == e.self.User && d.ID == e.self.ID) {
			continue
		}
		if _, err := decodeKey(d.IdentityKey); err != nil {
			return fmt.Errorf("e2e: %s.%d: identity key: %w", user, d.ID, err)
		}
		changed, err := saveContact(ctx, e.ss.q, user, d.ID, d.IdentityKey)
		if err != nil {
			return err
		}
		if changed {
			e.ss.DeleteSession(ctx, protocol.NewSignalAddress(user, d.ID))
		}
	}
	num, _, err := e.remoteNumber(ctx, user)
	if err != nil {
		return err
	}
	_, err = e.ss.q.ExecContext(ctx, `INSERT INTO contact_trust (user, seen_number) VALUES (?, ?)
		ON CONFLICT (user) DO UPDATE SET seen_number = excluded.seen_number, verified_number = NULL, verified_at = NULL`, user, num)
	return err
}
