package e2e

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"go.mau.fi/libsignal/ecc"
	"go.mau.fi/libsignal/keys/identity"
	"go.mau.fi/libsignal/keys/prekey"
	"go.mau.fi/libsignal/protocol"
	"go.mau.fi/libsignal/serialize"
	"go.mau.fi/libsignal/session"
	"go.mau.fi/libsignal/signalerror"
	"go.mau.fi/libsignal/state/record"
	"go.mau.fi/libsignal/util/keyhelper"
	"go.mau.fi/libsignal/util/medium"
	"go.mau.fi/libsignal/util/optional"

	"github.com/courier-im/courier/client"
	"github.com/courier-im/courier/client/localstore"
)

// Key management defaults.
const (
	// PreKeyTarget is how many one-time prekeys the Engine keeps on the
	// server; it refills to it when fewer than PreKeyLow are left.
	PreKeyTarget = 100
	PreKeyLow    = 10
	// DefaultSignedPreKeyMaxAge is how long a signed prekey is used before
	// Publish rotates it.
	DefaultSignedPreKeyMaxAge = 7 * 24 * time.Hour
	// keep is how long opened and sent messages are kept for redeliveries
	// and resend requests: the server's default retention.
	keep = 30 * 24 * time.Hour
	// signedKeep is how many signed prekeys are kept (the current one, and
	// older ones for sessions started from them that are still in flight).
	signedKeep = 3
)

// Config configures an Engine.
type Config struct {
	// Store is the device's local database (required).
	Store *localstore.Store
	// Credentials of the device (required).
	Credentials client.Credentials
	// HTTPClient for the key API; nil: a client with a 30 s timeout.
	HTTPClient *http.Client
	// Logger for diagnostics; nil: discarded.
	Logger *slog.Logger
	// Notify is told what the user should see: safety number changes,
	// messages that could not be decrypted, resends. It is called from the
	// Client's goroutines and must not block for long. Optional.
	Notify func(Notice)
	// SignedPreKeyMaxAge: default DefaultSignedPreKeyMaxAge.
	SignedPreKeyMaxAge time.Duration
}

// NoticeKind says what a Notice is about.
type NoticeKind int

// Notice kinds.
const (
	// IdentityChanged: a contact's devices or identity keys changed, so
	// their safety number did. With Verified, sending to them is blocked
	// until Accept.
	IdentityChanged NoticeKind = iota + 1
	// DecryptFailed: a message could not be decrypted; its sender's device
	// was asked to establish a new session and send it again.
	DecryptFailed
	// Resent: this device sent a message again for a device that asked.
	Resent
	// KeysPublished: one-time prekeys were uploaded (Count of them).
	KeysPublished
)

// Notice is something the user should see.
type Notice struct {
	Kind     NoticeKind
	User     string
	Device   uint32
	Verified bool // IdentityChanged: the contact was verified
	Count    int
	Text     string
}

// Errors.
var (
	// ErrIdentityMismatch: the server holds another identity key for this
	// device than the local store (the store was lost or replaced); the
	// device must register again as a new device.
	ErrIdentityMismatch = errors.New("e2e: the server has another identity key for this device: the local store was lost or replaced; register again as a new device")
	// ErrNoKeys: a device of the recipient has not published keys.
	ErrNoKeys = errors.New("e2e: the device has not published encryption keys yet")
)

// BlockedError refuses a send to a verified contact whose safety number
// changed, until the user accepts the change (Engine.Accept).
type BlockedError struct{ User string }

func (e *BlockedError) Error() string {
	return fmt.Sprintf("%s's safety number changed since you verified it; not sending until you accept the change ('courier verify --accept %s')", e.User, e.User)
}

// DecryptError reports a message that could not be decrypted (or was
// tampered with): MessageEvent.Err holds it. The sender's device was asked
// to resend when Asked.
type DecryptError struct {
	From        client.Device
	Group       string // a group message: its group
	ServerID    string
	ClientMsgID string
	Asked       bool
	Err         error
}

func (e *DecryptError) Error() string {
	s := fmt.Sprintf("message from %s could not be decrypted (%v)", e.From, e.Err)
	if e.Group != "" {
		s = fmt.Sprintf("group message from %s could not be decrypted (%v)", e.From, e.Err)
	}
	if e.Asked {
		s += "; asked to resend"
	}
	return s
}

func (e *DecryptError) Unwrap() error { return e.Err }

// Engine is a device's end-to-end encryption: a client.Cipher. Its
// methods are safe for concurrent use.
type Engine struct {
	db     *sql.DB
	keys   *client.KeyAPI
	self   client.Device
	log    *slog.Logger
	notify func(Notice)
	maxAge time.Duration
	ser    *serialize.Serializer
	ss     *signalStore
	client atomic.Pointer[client.Client]

	mu     sync.Mutex // libsignal state: sessions, contacts, trust
	keysMu sync.Mutex // prekey generation and upload
	bg     sync.WaitGroup
	ctx    context.Context
	stop   context.CancelFunc

	dirty map[string]bool // users whose identity keys changed in the current operation (under mu)
	// reset is when the session with a device was last dropped after a
	// failure (under mu): the messages it sent in the old session before
	// our request reached it fail too, and must not drop the new session.
	reset map[client.Device]time.Time
}

// resetQuiet is how long after dropping a session with a device further
// failures from it keep the new session (they still ask for resends).
const resetQuiet = time.Minute

var (
	_ client.Cipher         = (*Engine)(nil)
	_ client.KeysLowHandler = (*Engine)(nil)
)

// Open returns the Engine of the device, creating its identity (key pair
// and registration id) in the store the first time. It does not talk to
// the server: Publish does.
func Open(cfg Config) (*Engine, error) {
	if cfg.Store == nil {
		return nil, errors.New("e2e: no store")
	}
	keys, err := client.NewKeyAPI(cfg.Credentials, cfg.HTTPClient)
	if err != nil {
		return nil, err
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Notify == nil {
		cfg.Notify = func(Notice) {}
	}
	if cfg.SignedPreKeyMaxAge <= 0 {
		cfg.SignedPreKeyMaxAge = DefaultSignedPreKeyMaxAge
	}
	ctx, stop := context.WithCancel(context.Background())
	e := &Engine{
		db: cfg.Store.DB(), keys: keys, self: keys.Self(), log: cfg.Logger, notify: cfg.Notify,
		maxAge: cfg.SignedPreKeyMaxAge, ser: serialize.NewProtoBufSerializer(), ctx: ctx, stop: stop,
		dirty: map[string]bool{}, reset: map[client.Device]time.Time{},
	}
	if err := e.loadIdentity(); err != nil {
		stop()
		return nil, err
	}
	cut := ms(time.Now().Add(-keep))
	e.db.Exec("DELETE FROM e2e_inbox WHERE at < ?", cut)
	e.db.Exec("DELETE FROM e2e_sent WHERE created < ?", cut)
	return e, nil
}

func (e *Engine) loadIdentity() error {
	var pub, priv []byte
	var regID uint32
	err := e.db.QueryRow("SELECT public_key, private_key, registration_id FROM e2e_identity WHERE id = 1").Scan(&pub, &priv, &regID)
	if errors.Is(err, sql.ErrNoRows) {
		kp, err := keyhelper.GenerateIdentityKeyPair()
		if err != nil {
			return fmt.Errorf("e2e: generate the identity key: %w", err)
		}
		p := kp.PrivateKey().Serialize()
		pub, priv, regID = kp.PublicKey().Serialize(), p[:], 1+rand.Uint32N(16380)
		if _, err := e.db.Exec(`INSERT INTO e2e_identity (id, public_key, private_key, registration_id, next_prekey_id, next_signed_id)
			VALUES (1, ?, ?, ?, ?, 1)`, pub, priv, regID, 1+rand.Uint32N(medium.MaxValue-1)); err != nil {
			return fmt.Errorf("e2e: store the identity: %w", err)
		}
	} else if err != nil {
		return fmt.Errorf("e2e: load the identity: %w", err)
	}
	pk, err := decodeKey(pub)
	if err != nil || len(priv) != 32 {
		return fmt.Errorf("e2e: the stored identity is corrupt")
	}
	e.ss = &signalStore{q: e.db, ser: e.ser, regID: regID,
		identity: identity.NewKeyPair(identity.NewKey(pk), ecc.NewDjbECPrivateKey([32]byte(priv))),
		changed:  func(user string) { e.dirty[user] = true }}
	return nil
}

// decodeKey parses a serialized public key: 33 bytes, type 0x05.
func decodeKey(b []byte) (ecc.ECPublicKeyable, error) {
	if len(b) != 33 || b[0] != ecc.DjbType {
		return nil, fmt.Errorf("bad public key (%d bytes)", len(b))
	}
	return ecc.DecodePoint(b, 0)
}

// IdentityKey returns this device's public identity key, serialized.
func (e *Engine) IdentityKey() []byte { return e.ss.identity.PublicKey().Serialize() }

// Bind gives the Engine the Client it serves, which it uses to send
// control messages and resends. Call it after client.New, before Run.
func (e *Engine) Bind(c *client.Client) { e.client.Store(c) }

// Close stops the Engine's background work (prekey refills). The store
// stays open: its owner closes it.
func (e *Engine) Close() error {
	e.stop()
	e.bg.Wait()
	return nil
}

// Publish makes the server's copy of this device's keys complete: the
// identity key, registration id, a signed prekey and one-time prekeys
// the first time; later, a new signed prekey when the current one is
// older than the maximum age, and one-time prekeys up to PreKeyTarget when
// fewer than PreKeyLow are left. Register calls it at once; every start
// should (the CLI does).
func (e *Engine) Publish(ctx context.Context) error {
	e.keysMu.Lock()
	defer e.keysMu.Unlock()
	st, err := e.keys.Status(ctx)
	if err != nil {
		return fmt.Errorf("e2e: key status: %w", err)
	}
	up := client.KeyUpload{IdentityKey: e.IdentityKey(), RegistrationID: e.ss.regID}
	if st.IdentityKey != nil && !bytes.Equal(st.IdentityKey, up.IdentityKey) {
		return ErrIdentityMismatch
	}
	newest, created, err := e.newestSigned(ctx)
	if err != nil {
		return err
	}
	if st.IdentityKey == nil || st.SignedPreKeyID == nil || newest == nil || *st.SignedPreKeyID != newest.ID() ||
		time.Since(created) > e.maxAge {
		if newest == nil || time.Since(created) > e.maxAge {
			if newest, err = e.newSigned(ctx); err != nil {
				return err
			}
		}
		sig := newest.Signature()
		up.SignedPreKey = &client.SignedPreKey{ID: newest.ID(), PublicKey: newest.KeyPair().PublicKey().Serialize(), Signature: sig[:]}
	}
	n := 0
	if st.IdentityKey == nil || st.OneTimePreKeys < PreKeyLow {
		n = PreKeyTarget - st.OneTimePreKeys
	}
	_, err = e.upload(ctx, up, n)
	return err
}

// Refill uploads one-time prekeys up to PreKeyTarget if the server has
// fewer than PreKeyLow, and reports how many it uploaded.
func (e *Engine) Refill(ctx context.Context) (int, error) {
	e.keysMu.Lock()
	defer e.keysMu.Unlock()
	st, err := e.keys.Status(ctx)
	if err != nil {
		return 0, fmt.Errorf("e2e: key status: %w", err)
	}
	if st.OneTimePreKeys >= PreKeyLow {
		return 0, nil
	}
	return e.upload(ctx, client.KeyUpload{IdentityKey: e.IdentityKey()}, PreKeyTarget-st.OneTimePreKeys)
}

// RotateSignedPreKey makes and uploads a new signed prekey now.
func (e *Engine) RotateSignedPreKey(ctx context.Context) error {
	e.keysMu.Lock()
	defer e.keysMu.Unlock()
	spk, err := e.newSigned(ctx)
	if err != nil {
		return err
	}
	sig := spk.Signature()
	_, err = e.upload(ctx, client.KeyUpload{IdentityKey: e.IdentityKey(),
		SignedPreKey: &client.SignedPreKey{ID: spk.ID(), PublicKey: spk.KeyPair().PublicKey().Serialize(), Signature: sig[:]}}, 0)
	return err
}

// KeysLow is the server's notice that few one-time prekeys are left: the
// Engine refills them in the background.
func (e *Engine) KeysLow(remaining int) {
	e.bg.Add(1)
	go func() {
		defer e.bg.Done()
		ctx, cancel := context.WithTimeout(e.ctx, time.Minute)
		defer cancel()
		if _, err := e.Refill(ctx); err != nil {
			e.log.Warn("e2e: refill one-time prekeys", "remaining", remaining, "err", err)
		}
	}()
}

func (e *Engine) newestSigned(ctx context.Context) (*record.SignedPreKey, time.Time, error) {
	var b []byte
	var created int64
	err := e.db.QueryRowContext(ctx, "SELECT record, created FROM e2e_signed_prekeys ORDER BY created DESC, id DESC LIMIT 1").Scan(&b, &created)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, time.Time{}, nil
	}
	if err != nil {
		return nil, time.Time{}, err
	}
	r, err := record.NewSignedPreKeyFromBytes(b, e.ser.SignedPreKeyRecord)
	return r, time.UnixMilli(created), err
}

// newSigned makes and stores a new signed prekey, and drops the oldest
// beyond signedKeep.
func (e *Engine) newSigned(ctx context.Context) (*record.SignedPreKey, error) {
	var id uint32
	if err := e.db.QueryRowContext(ctx, "UPDATE e2e_identity SET next_signed_id = next_signed_id % ? + 1 WHERE id = 1 RETURNING next_signed_id", medium.MaxValue-1).Scan(&id); err != nil {
		return nil, fmt.Errorf("e2e: signed prekey id: %w", err)
	}
	spk, err := keyhelper.GenerateSignedPreKey(e.ss.identity, id, e.ser.SignedPreKeyRecord)
	if err != nil {
		return nil, err
	}
	if _, err := e.db.ExecContext(ctx, "INSERT OR REPLACE INTO e2e_signed_prekeys (id, record, created) VALUES (?, ?, ?)",
		id, spk.Serialize(), ms(time.Now())); err != nil {
		return nil, fmt.Errorf("e2e: store the signed prekey: %w", err)
	}
	_, err = e.db.ExecContext(ctx, `DELETE FROM e2e_signed_prekeys WHERE id NOT IN
		(SELECT id FROM e2e_signed_prekeys ORDER BY created DESC, id DESC LIMIT ?)`, signedKeep)
	return spk, err
}

// upload sends up with n new one-time prekeys (in batches the server
// takes), storing them locally first, and returns how many it uploaded.
func (e *Engine) upload(ctx context.Context, up client.KeyUpload, n int) (int, error) {
	sent := 0
	for first := true; first || sent < n; first = false {
		batch := min(n-sent, client.MaxPreKeysPerUpload)
		pks, err := e.newPreKeys(ctx, batch)
		if err != nil {
			return sent, err
		}
		up.OneTimePreKeys = pks
		if _, err := e.keys.Upload(ctx, up); err != nil {
			var re *client.RefusedError
			if errors.As(err, &re) && re.Code == "identity_mismatch" {
				return sent, ErrIdentityMismatch
			}
			return sent, fmt.Errorf("e2e: upload keys: %w", err)
		}
		sent += batch
		up = client.KeyUpload{IdentityKey: up.IdentityKey}
	}
	if sent > 0 {
		e.notify(Notice{Kind: KeysPublished, User: e.self.User, Device: e.self.ID, Count: sent,
			Text: fmt.Sprintf("published %d one-time prekeys", sent)})
	}
	return sent, nil
}

func (e *Engine) newPreKeys(ctx context.Context, n int) ([]client.PreKey, error) {
	if n <= 0 {
		return nil, nil
	}
	tx, err := e.db.BeginTx(ctx, nil)
	if err != nil {
		return nil, err
	}
	defer tx.Rollback()
	var next uint32
	if err := tx.QueryRowContext(ctx, "SELECT next_prekey_id FROM e2e_identity WHERE id = 1").Scan(&next); err != nil {
		return nil, err
	}
	out := make([]client.PreKey, n)
	for i := range out {
		kp, err := ecc.GenerateKeyPair()
		if err != nil {
			return nil, err
		}
		r := record.NewPreKey(next, kp, e.ser.PreKeyRecord)
		if _, err := tx.ExecContext(ctx, "INSERT OR REPLACE INTO e2e_prekeys (id, record) VALUES (?, ?)", next, r.Serialize()); err != nil {
			return nil, err
		}
		out[i] = client.PreKey{ID: next, PublicKey: kp.PublicKey().Serialize()}
		next = next%(medium.MaxValue-1) + 1 // ids 1..MaxValue-1, wrapping
	}
	if _, err := tx.ExecContext(ctx, "UPDATE e2e_identity SET next_prekey_id = ? WHERE id = 1", next); err != nil {
		return nil, err
	}
	return out, tx.Commit()
}

// Seal encrypts m for each device of to (client.Cipher), establishing
// the sessions it lacks from the devices' prekey bundles.
func (e *Engine) Seal(ctx context.Context, m client.OutboxMessage, to []client.Device) ([][]byte, error) {
	var frame []byte
	if m.ContentID != "" {
		frame = m.Body // a resend: the frame sent the first time
	} else {
		kind, body := byte(kindMessage), m.Body
		if m.Control {
			kind = kindControl
		}
		if m.Control && m.Group != "" {
			// A group's name, for a member.
			body = groupControl{op: opGroupInfo, group: m.Group, data: m.Body}.encode()
		}
		frame = inner{kind: kind, id: m.ClientMsgID, body: body}.encode()
	}
	byUser := map[string][]uint32{}
	var users []string
	for _, d := range to {
		if _, ok := byUser[d.User]; !ok {
			users = append(users, d.User)
		}
		byUser[d.User] = append(byUser[d.User], d.ID)
	}
	if _, ok := byUser[m.To]; !ok {
		users = append(users, m.To) // a user whose only device is this one
	}
	for _, u := range users {
		if err := e.ensureSessions(ctx, u, byUser[u]); err != nil {
			return nil, err
		}
	}
	if !m.Control && m.To != e.self.User {
		if blocked, err := e.blocked(ctx, m.To); err != nil {
			return nil, err
		} else if blocked {
			return nil, &BlockedError{User: m.To}
		}
	}
	out := make([][]byte, len(to))
	// One transaction: the frame kept for resends and every session
	// advanced, or nothing.
	err := e.inTx(ctx, func() error {
		if m.ContentID == "" {
			if _, err := e.ss.q.ExecContext(ctx, `INSERT INTO e2e_sent (client_msg_id, to_user, body, created) VALUES (?, ?, ?, ?)
				ON CONFLICT DO NOTHING`, m.ClientMsgID, m.To, frame, ms(m.Created)); err != nil {
				return fmt.Errorf("e2e: keep the sent message: %w", err)
			}
		}
		for i, d := range to {
			addr := protocol.NewSignalAddress(d.User, d.ID)
			cipher := session.NewCipher(e.builder(addr), addr)
			msg, err := cipher.Encrypt(ctx, frame)
			if err != nil {
				return &client.SealError{Device: d, Err: err}
			}
			typ := byte(typeWhisper)
			if msg.Type() == protocol.PREKEY_TYPE {
				typ = typePreKey
			}
			out[i] = append([]byte{payloadVersion, typ}, msg.Serialize()...)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// inTx runs fn under e.mu with the signal store's queries in one
// transaction, committed if fn succeeds. fn must not use e.db: the store
// has one connection, which the transaction holds.
func (e *Engine) inTx(ctx context.Context, fn func() error) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	tx, err := e.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("e2e: begin: %w", err)
	}
	e.ss.q = tx
	defer func() { e.ss.q = e.db }()
	if err := fn(); err != nil {
		tx.Rollback()
		return err
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("e2e: commit: %w", err)
	}
	return nil
}

func (e *Engine) builder(addr *protocol.SignalAddress) *session.Builder {
	return session.NewBuilder(e.ss, e.ss, e.ss, e.ss, addr, e.ser)
}

// ensureSessions makes sure there is a session with each of devs, the
// current devices of user (other than this one): it forgets devices no
// longer listed, and fetches bundles for those without a session. A
// change of the device set is a change of user's safety number.
func (e *Engine) ensureSessions(ctx context.Context, user string, devs []uint32) error {
	current := slices.Clone(devs)
	if user == e.self.User {
		current = append(current, e.self.ID)
	}
	e.mu.Lock()
	removed, err := e.forgetDevicesExcept(ctx, user, current)
	var missing []uint32
	for _, d := range devs {
		ok, cerr := e.ss.ContainsSession(ctx, protocol.NewSignalAddress(user, d))
		if cerr != nil {
			err = cerr
		}
		if !ok {
			missing = append(missing, d)
		}
	}
	e.mu.Unlock()
	if err != nil {
		return err
	}
	var bundles []client.Bundle
	switch {
	case len(missing) == 0:
	case len(missing) == len(devs) && len(devs) > 1:
		bundles, err = e.keys.Bundles(ctx, user, 0)
	default:
		for _, d := range missing {
			b, ferr := e.keys.Bundles(ctx, user, d)
			if ferr != nil {
				err = ferr
				break
			}
			bundles = append(bundles, b...)
		}
	}
	if err != nil {
		return &client.SealError{Device: client.Device{User: user}, Err: fmt.Errorf("fetch prekey bundles: %w", err)}
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, d := range missing {
		i := slices.IndexFunc(bundles, func(b client.Bundle) bool { return b.Device == d })
		dev := client.Device{User: user, ID: d}
		if i < 0 {
			return &client.SealError{Device: dev, Err: fmt.Errorf("the server sent no prekey bundle for %s", dev)}
		}
		if err := e.processBundle(ctx, dev, bundles[i]); err != nil {
			return &client.SealError{Device: dev, Err: err}
		}
	}
	if removed || e.dirty[user] {
		delete(e.dirty, user)
		return e.numberMayHaveChanged(ctx, user)
	}
	return nil
}

// processBundle starts a session with dev from its bundle. Under e.mu.
func (e *Engine) processBundle(ctx context.Context, dev client.Device, b client.Bundle) error {
	if b.IdentityKey == nil || b.SignedPreKey == nil {
		return fmt.Errorf("%s: %w", dev, ErrNoKeys)
	}
	ik, err := decodeKey(b.IdentityKey)
	if err != nil {
		return fmt.Errorf("%s: identity key: %w", dev, err)
	}
	spk, err := decodeKey(b.SignedPreKey.PublicKey)
	if err != nil || len(b.SignedPreKey.Signature) != 64 {
		return fmt.Errorf("%s: bad signed prekey", dev)
	}
	preKeyID := optional.NewEmptyUint32()
	var pk ecc.ECPublicKeyable
	if b.OneTimePreKey != nil {
		if pk, err = decodeKey(b.OneTimePreKey.PublicKey); err != nil {
			return fmt.Errorf("%s: one-time prekey: %w", dev, err)
		}
		preKeyID = optional.NewOptionalUint32(b.OneTimePreKey.ID)
	}
	key := identity.NewKey(ik)
	addr := protocol.NewSignalAddress(dev.User, dev.ID)
	trusted, err := e.ss.IsTrustedIdentity(ctx, addr, key)
	if err != nil {
		return err
	}
	if !trusted {
		e.identityChanged(ctx, dev.User, dev.ID)
		return fmt.Errorf("%s: the server gave another identity key than before for this device: %w", dev, signalerror.ErrUntrustedIdentity)
	}
	bundle := prekey.NewBundle(b.RegistrationID, dev.ID, preKeyID, b.SignedPreKey.ID, pk, spk,
		[64]byte(b.SignedPreKey.Signature), key)
	if err := e.builder(addr).ProcessBundle(ctx, bundle); err != nil {
		return fmt.Errorf("%s: %w", dev, err)
	}
	return e.ss.SaveIdentity(ctx, addr, key)
}

// forgetDevicesExcept drops the contacts and sessions of user's devices
// not in current, and reports whether there were any. Under e.mu.
func (e *Engine) forgetDevicesExcept(ctx context.Context, user string, current []uint32) (bool, error) {
	rows, err := e.ss.q.QueryContext(ctx, "SELECT device FROM contacts WHERE user = ?", user)
	if err != nil {
		return false, err
	}
	var gone []uint32
	for rows.Next() {
		var d uint32
		if err := rows.Scan(&d); err != nil {
			rows.Close()
			return false, err
		}
		if !slices.Contains(current, d) {
			gone = append(gone, d)
		}
	}
	rows.Close()
	for _, d := range gone {
		if _, err := e.ss.q.ExecContext(ctx, "DELETE FROM contacts WHERE user = ? AND device = ?", user, d); err != nil {
			return false, err
		}
		if _, err := e.ss.q.ExecContext(ctx, "DELETE FROM e2e_sessions WHERE user = ? AND device = ?", user, d); err != nil {
			return false, err
		}
	}
	return len(gone) > 0, nil
}

// Open decrypts a message (client.Cipher). A message it cannot decrypt
// is reported as a *DecryptError, after asking the sender's device to
// start a new session and resend.
func (e *Engine) Open(ctx context.Context, in client.Inbound) (client.Opened, error) {
	var body []byte
	var msgID string
	var dropped bool
	err := e.db.QueryRowContext(ctx, "SELECT body, msg_id, dropped FROM e2e_inbox WHERE server_id = ?", in.ServerID).Scan(&body, &msgID, &dropped)
	if err == nil {
		return client.Opened{Body: body, ClientMsgID: msgID, Drop: dropped}, nil // delivered again
	}
	if !errors.Is(err, sql.ErrNoRows) {
		return client.Opened{}, fmt.Errorf("e2e: inbox: %w", err)
	}
	// Decrypt and record in one transaction: a crash leaves either both
	// the session advanced and the message kept (a redelivery is answered
	// from e2e_inbox), or neither (it is decrypted again).
	var out client.Opened
	var resend *resendRequest
	var cause error
	err = e.inTx(ctx, func() error {
		plain, err := e.decrypt(ctx, in)
		if err != nil {
			cause = err
			return err
		}
		m, err := decodeInner(plain)
		if err != nil {
			cause = err
			return err
		}
		record := func(id string, body []byte, dropped bool) (bool, error) {
			res, err := e.ss.q.ExecContext(ctx, `INSERT INTO e2e_inbox (server_id, from_user, from_device, msg_id, body, dropped, at)
				VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING`, in.ServerID, in.From.User, in.From.ID, id, body, dropped, ms(time.Now()))
			if err != nil {
				return false, fmt.Errorf("e2e: inbox: %w", err)
			}
			n, err := res.RowsAffected()
			return n == 1, err
		}
		if m.kind == kindControl {
			out.Drop = true
			if _, err := record("", nil, true); err != nil {
				return err
			}
			if in.Group != "" {
				e.log.Warn("e2e: dropping a control message sent to a group", "from", in.From, "group", in.Group)
				return nil
			}
			op, err := decodeControlOp(m.body)
			if err != nil {
				e.log.Warn("e2e: bad control message", "from", in.From, "err", err)
				return nil
			}
			switch op.op {
			case opResend:
				resend = &op.resend
			case opSenderKey:
				if err := e.takeSenderKey(ctx, in.From, op.group); err != nil {
					e.log.Warn("e2e: cannot take a sender key", "from", in.From, "group", op.group.group, "err", err)
				}
			case opGroupInfo:
				out.GroupInfo = &client.GroupInfo{Group: op.group.group, Name: string(op.group.data)}
			}
			return nil
		}
		fresh, err := record(m.id, m.body, false)
		if err != nil {
			return err
		}
		if !fresh {
			// A resend of a message this device opened before.
			out.Drop = true
			_, err := record("", nil, true)
			return err
		}
		out = client.Opened{Body: m.body, ClientMsgID: m.id}
		return nil
	})
	e.newDevices(ctx, in.From.User)
	if cause != nil {
		return client.Opened{}, e.failed(ctx, in, cause)
	}
	if err != nil {
		return client.Opened{}, err
	}
	if resend != nil {
		e.control(ctx, in, *resend)
	}
	return out, nil
}

// newDevices follows up a message from a device of user not seen before
// (its identity key was just recorded): the user's whole device list is
// fetched, so that the safety number covers all their devices at once
// (rather than changing once per device as each first writes), and then
// compared with the one last seen.
func (e *Engine) newDevices(ctx context.Context, user string) {
	e.mu.Lock()
	dirty := e.dirty[user]
	delete(e.dirty, user)
	e.mu.Unlock()
	if !dirty || user == e.self.User {
		return
	}
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := e.refresh(rctx, user); err != nil {
		e.log.Info("e2e: fetch the devices of a new sender", "user", user, "err", err)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.numberMayHaveChanged(ctx, user); err != nil {
		e.log.Warn("e2e: safety number", "user", user, "err", err)
	}
}

// decrypt opens the outer payload, under e.mu. libsignal does not expect
// hostile input everywhere: a panic in it is a malformed payload.
func (e *Engine) decrypt(ctx context.Context, in client.Inbound) (plain []byte, err error) {
	p := in.Payload
	if len(p) < 3 || p[0] != payloadVersion {
		return nil, fmt.Errorf("%w: unknown version or too short", errMalformed)
	}
	defer func() {
		if r := recover(); r != nil {
			plain, err = nil, fmt.Errorf("%w: %v", errMalformed, r)
		}
	}()
	if (in.Group != "") != (p[1] == typeSenderKey) {
		return nil, fmt.Errorf("%w: message type %d for group %q", errMalformed, p[1], in.Group)
	}
	addr := protocol.NewSignalAddress(in.From.User, in.From.ID)
	cipher := session.NewCipher(e.builder(addr), addr)
	switch p[1] {
	case typeSenderKey:
		return e.decryptGroup(ctx, in, p[2:])
	case typePreKey:
		msg, err := protocol.NewPreKeySignalMessageFromBytes(p[2:], e.ser.PreKeySignalMessage, e.ser.SignalMessage)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", errMalformed, err)
		}
		plain, err = cipher.DecryptMessage(ctx, msg)
		if err != nil {
			return nil, err
		}
	case typeWhisper:
		msg, err := protocol.NewSignalMessageFromBytes(p[2:], e.ser.SignalMessage)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", errMalformed, err)
		}
		if plain, err = cipher.Decrypt(ctx, msg); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("%w: unknown message type %d", errMalformed, p[1])
	}
	return plain, nil
}

// failed handles a message that could not be opened: the session with its
// sender's device is dropped and the device asked, in a new session, to
// send the message again. A message from a device whose identity key
// changed is not asked for again: the user must look at that first.
func (e *Engine) failed(ctx context.Context, in client.Inbound, cause error) error {
	derr := &DecryptError{From: in.From, Group: in.Group, ServerID: in.ServerID, ClientMsgID: in.ClientMsgID, Err: cause}
	if c := e.client.Load(); in.Group != "" && c != nil && in.From != e.self {
		// The sender key is missing or old (a device that joined or was
		// not handed it): the pairwise session is fine. Ask the sender's
		// device to hand its key again and resend.
		req := resendRequest{device: in.From.ID, ids: []string{in.ClientMsgID}}
		if _, err := c.SendControl(in.From.User, req.encode(), true, ""); err != nil {
			e.log.Error("e2e: ask for a resend", "from", in.From, "group", in.Group, "err", err)
		} else {
			derr.Asked = true
		}
	} else if errors.Is(cause, signalerror.ErrUntrustedIdentity) {
		e.mu.Lock()
		e.identityChanged(ctx, in.From.User, in.From.ID)
		e.mu.Unlock()
	} else if c := e.client.Load(); c != nil && in.From != e.self {
		var err error
		e.mu.Lock()
		if time.Since(e.reset[in.From]) > resetQuiet {
			err = e.ss.DeleteSession(ctx, protocol.NewSignalAddress(in.From.User, in.From.ID))
			e.reset[in.From] = time.Now()
		}
		e.mu.Unlock()
		if err == nil {
			req := resendRequest{device: in.From.ID, ids: []string{in.ClientMsgID}}
			_, err = c.SendControl(in.From.User, req.encode(), true, "")
		}
		if err != nil {
			e.log.Error("e2e: ask for a resend", "from", in.From, "err", err)
		} else {
			derr.Asked = true
		}
	}
	e.log.Warn("e2e: cannot decrypt", "from", in.From, "id", in.ServerID, "err", cause)
	e.notify(Notice{Kind: DecryptFailed, User: in.From.User, Device: in.From.ID, Text: derr.Error()})
	return derr
}

// control acts on a resend request.
func (e *Engine) control(ctx context.Context, in client.Inbound, req resendRequest) {
	if req.device != e.self.ID {
		return // for another device of this user
	}
	c := e.client.Load()
	if c == nil {
		return
	}
	for _, id := range req.ids {
		var to, group string
		var frame []byte
		err := e.db.QueryRowContext(ctx, "SELECT to_user, body, group_id FROM e2e_sent WHERE client_msg_id = ?", id).Scan(&to, &frame, &group)
		if errors.Is(err, sql.ErrNoRows) {
			e.log.Info("e2e: asked to resend a message this device does not have", "from", in.From, "msg", id)
			continue
		}
		if err == nil && group != "" {
			err = e.reshare(ctx, c, in.From, group)
			if err == nil {
				_, err = c.ResendGroup(group, frame, id)
			}
		} else if err == nil {
			_, err = c.SendControl(to, frame, false, id)
		}
		if err != nil {
			e.log.Error("e2e: resend", "msg", id, "err", err)
			continue
		}
		e.notify(Notice{Kind: Resent, User: in.From.User, Device: in.From.ID,
			Text: fmt.Sprintf("%s could not decrypt message %s; sent it again", in.From, id)})
	}
}

// Reset forgets the device identity, keys and sessions kept in store, for a
// store taken over by a new device (a profile registered again): the new
// device makes its own identity when an Engine is next opened. Contacts'
// identity keys and verifications are kept: they are still theirs.
func Reset(store *localstore.Store) error {
	_, err := store.DB().Exec(`DELETE FROM e2e_identity; DELETE FROM e2e_prekeys; DELETE FROM e2e_signed_prekeys;
		DELETE FROM e2e_sessions; DELETE FROM e2e_inbox; DELETE FROM e2e_sent;
		DELETE FROM e2e_sender_keys; DELETE FROM e2e_sender_key_shared;`)
	if err != nil {
		return fmt.Errorf("e2e: reset: %w", err)
	}
	return nil
}

// reshare makes the next message to group hand this device's sender key
// to dev again (it could not decrypt a message), after refreshing the
// device list of dev's user (dev may be new) when there is a Client.
func (e *Engine) reshare(ctx context.Context, c *client.Client, dev client.Device, group string) error {
	if _, err := e.db.ExecContext(ctx, "DELETE FROM e2e_sender_key_shared WHERE group_id = ? AND user = ? AND device = ?",
		group, dev.User, dev.ID); err != nil {
		return fmt.Errorf("e2e: sender key holders: %w", err)
	}
	if c == nil {
		return nil
	}
	if _, err := c.Devices(ctx, dev.User); err != nil {
		e.log.Info("e2e: refresh the devices of a group member", "user", dev.User, "err", err)
	}
	return nil
}
