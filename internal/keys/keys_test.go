package keys_test

import (
	"bytes"
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"go.mau.fi/libsignal/ecc"
	"go.mau.fi/libsignal/util/keyhelper"
	"google.golang.org/protobuf/proto"

	"github.com/courier-im/courier/internal/auth/authtest"
	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/keys"
	"github.com/courier-im/courier/internal/mailbox/pebble"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

type material struct {
	identity []byte
	upload   keys.Upload
}

// newMaterial makes a real libsignal identity, a signed prekey and n
// one-time prekeys with ids from 1, as an upload.
func newMaterial(t testing.TB, n int) material {
	t.Helper()
	id, err := keyhelper.GenerateIdentityKeyPair()
	if err != nil {
		t.Fatal(err)
	}
	spk, err := ecc.GenerateKeyPair()
	if err != nil {
		t.Fatal(err)
	}
	sig := ecc.CalculateSignature(id.PrivateKey(), spk.PublicKey().Serialize())
	reg := keyhelper.GenerateRegistrationID()
	up := keys.Upload{
		IdentityKey:    id.PublicKey().Serialize(),
		RegistrationID: &reg,
		SignedPreKey:   &keys.SignedPreKey{ID: 1, PublicKey: spk.PublicKey().Serialize(), Signature: sig[:]},
	}
	for i := 1; i <= n; i++ {
		kp, err := ecc.GenerateKeyPair()
		if err != nil {
			t.Fatal(err)
		}
		up.OneTimePreKeys = append(up.OneTimePreKeys, keys.PreKey{ID: uint32(i), PublicKey: kp.PublicKey().Serialize()})
	}
	return material{identity: up.IdentityKey, upload: up}
}

func TestValidate(t *testing.T) {
	m := newMaterial(t, 3)
	other := newMaterial(t, 0)
	if up, err := m.upload.Validate(); err != nil || len(up.OneTimePreKeys) != 3 || up.SignedPreKey == nil || *up.RegistrationID != *m.upload.RegistrationID {
		t.Fatalf("Validate(good upload) = %+v, %v", up, err)
	}
	// Only the identity key is needed (a later upload).
	if _, err := (&keys.Upload{IdentityKey: m.identity}).Validate(); err != nil {
		t.Errorf("Validate(identity only): %v", err)
	}
	mod := func(f func(u *keys.Upload)) *keys.Upload {
		u := m.upload
		spk := *u.SignedPreKey
		u.SignedPreKey = &spk
		u.OneTimePreKeys = append([]keys.PreKey(nil), u.OneTimePreKeys...)
		f(&u)
		return &u
	}
	flip := func(b []byte, i int) []byte {
		c := bytes.Clone(b)
		c[i] ^= 1
		return c
	}
	tests := []struct {
		name string
		up   *keys.Upload
		code string
	}{
		{"no identity", mod(func(u *keys.Upload) { u.IdentityKey = nil }), keys.CodeInvalid},
		{"short identity", mod(func(u *keys.Upload) { u.IdentityKey = u.IdentityKey[:32] }), keys.CodeInvalid},
		{"identity type 0x00", mod(func(u *keys.Upload) { u.IdentityKey = append([]byte{0}, u.IdentityKey[1:]...) }), keys.CodeInvalid},
		{"signed prekey of 34 bytes", mod(func(u *keys.Upload) { u.SignedPreKey.PublicKey = append(u.SignedPreKey.PublicKey, 0) }), keys.CodeInvalid},
		{"signature of 65 bytes", mod(func(u *keys.Upload) { u.SignedPreKey.Signature = append(u.SignedPreKey.Signature, 0) }), keys.CodeInvalid},
		{"no signature", mod(func(u *keys.Upload) { u.SignedPreKey.Signature = nil }), keys.CodeInvalid},
		{"another identity", mod(func(u *keys.Upload) { u.IdentityKey = other.identity }), keys.CodeBadSignature},
		{"another signed prekey", mod(func(u *keys.Upload) { u.SignedPreKey = other.upload.SignedPreKey }), keys.CodeBadSignature},
		{"flipped signature", mod(func(u *keys.Upload) { u.SignedPreKey.Signature = flip(u.SignedPreKey.Signature, 0) }), keys.CodeBadSignature},
		{"flipped last signature byte", mod(func(u *keys.Upload) { u.SignedPreKey.Signature = flip(u.SignedPreKey.Signature, 63) }), keys.CodeBadSignature},
		{"flipped signed prekey", mod(func(u *keys.Upload) { u.SignedPreKey.PublicKey = flip(u.SignedPreKey.PublicKey, 5) }), keys.CodeBadSignature},
		{"prekey of type 0x06", mod(func(u *keys.Upload) {
			u.OneTimePreKeys[1].PublicKey = append([]byte{6}, u.OneTimePreKeys[1].PublicKey[1:]...)
		}), keys.CodeInvalid},
		{"empty prekey", mod(func(u *keys.Upload) { u.OneTimePreKeys[2].PublicKey = nil }), keys.CodeInvalid},
		{"prekey id twice", mod(func(u *keys.Upload) { u.OneTimePreKeys[2].ID = u.OneTimePreKeys[0].ID }), keys.CodeInvalid},
		{"101 prekeys", mod(func(u *keys.Upload) {
			for i := range 98 {
				u.OneTimePreKeys = append(u.OneTimePreKeys, keys.PreKey{ID: uint32(1000 + i), PublicKey: m.identity})
			}
		}), keys.CodeInvalid},
	}
	for _, tc := range tests {
		_, err := tc.up.Validate()
		var ke *keys.Error
		if !errors.As(err, &ke) || ke.Code != tc.code || ke.Message == "" {
			t.Errorf("%s: Validate error %v, want code %s", tc.name, err, tc.code)
		}
	}
	// Exactly 100 is fine.
	up := mod(func(u *keys.Upload) {
		for i := range 97 {
			u.OneTimePreKeys = append(u.OneTimePreKeys, keys.PreKey{ID: uint32(1000 + i), PublicKey: m.identity})
		}
	})
	if _, err := up.Validate(); err != nil {
		t.Errorf("Validate(100 prekeys): %v", err)
	}
}

func TestVerifySignedPreKey(t *testing.T) {
	m := newMaterial(t, 0)
	spk := m.upload.SignedPreKey
	if !keys.VerifySignedPreKey(m.identity, spk.PublicKey, spk.Signature) {
		t.Fatal("a libsignal signature does not verify")
	}
	for _, args := range [][3][]byte{
		{nil, spk.PublicKey, spk.Signature},
		{m.identity, nil, spk.Signature},
		{m.identity, spk.PublicKey, nil},
		{m.identity[:32], spk.PublicKey, spk.Signature},
		{append([]byte{9}, m.identity[1:]...), spk.PublicKey, spk.Signature},
		{spk.PublicKey, m.identity, spk.Signature},
	} {
		if keys.VerifySignedPreKey(args[0], args[1], args[2]) {
			t.Errorf("VerifySignedPreKey(%x, %x, %x) = true", args[0], args[1], args[2])
		}
	}
}

func TestLimiter(t *testing.T) {
	now := time.Unix(1_000_000, 0)
	l := keys.NewLimiter(keys.LimitConfig{Burst: 3, Every: time.Second, MaxKeys: 2, Now: func() time.Time { return now }})
	for i := range 3 {
		if w := l.Take("a"); w != 0 {
			t.Fatalf("take %d: wait %v", i, w)
		}
	}
	if w := l.Take("a"); w != time.Second {
		t.Errorf("take past the burst: wait %v, want 1s", w)
	}
	now = now.Add(500 * time.Millisecond)
	if w := l.Take("a"); w != 500*time.Millisecond {
		t.Errorf("half a token later: wait %v, want 500ms", w)
	}
	now = now.Add(500 * time.Millisecond)
	if w := l.Take("a"); w != 0 {
		t.Errorf("a token later: wait %v, want 0", w)
	}
	if w := l.Take("b"); w != 0 {
		t.Errorf("another key: wait %v", w)
	}
	// A third key forgets the least recently used one (a), whose bucket
	// starts full again.
	l.Take("c")
	if l.Len() != 2 {
		t.Errorf("Len = %d, want 2", l.Len())
	}
	for i := range 3 {
		if w := l.Take("a"); w != 0 {
			t.Errorf("forgotten key, take %d: wait %v", i, w)
		}
	}
	// Refill stops at the burst.
	now = now.Add(time.Hour)
	for range 3 {
		l.Take("a")
	}
	if w := l.Take("a"); w == 0 {
		t.Error("a bucket refilled beyond its burst")
	}
	var off *keys.Limiter = keys.NewLimiter(keys.LimitConfig{Burst: -1})
	if off != nil || off.Take("x") != 0 || off.Len() != 0 {
		t.Error("a negative burst does not turn the limit off")
	}
}

type recorder struct {
	mu   sync.Mutex
	devs []ident.Device
}

func (r *recorder) Notify(d ident.Device) {
	r.mu.Lock()
	r.devs = append(r.devs, d)
	r.mu.Unlock()
}

// fixture: a service on the in-memory account store and an in-memory
// mailbox, with alice and bob registered.
type fixture struct {
	svc      *keys.Service
	mb       *pebble.Store
	notified *recorder
	alice    ident.Device
	bob      ident.Device
}

func newFixture(t *testing.T, limit keys.LimitConfig) *fixture {
	t.Helper()
	st := authtest.New()
	alice, _, err := st.Register("alice")
	if err != nil {
		t.Fatal(err)
	}
	bob, _, err := st.Register("bob")
	if err != nil {
		t.Fatal(err)
	}
	mb, err := pebble.Open("mailbox", pebble.Options{FS: vfs.NewMem()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mb.Close() })
	rec := &recorder{}
	svc := keys.New(keys.Config{Store: st, Mailbox: mb, Notifier: rec, FetchLimit: limit})
	return &fixture{svc: svc, mb: mb, notified: rec, alice: alice, bob: bob}
}

// notices returns the KEYS_LOW counts in dev's mailbox.
func (fx *fixture) notices(t *testing.T, dev ident.Device) []uint32 {
	t.Helper()
	es, err := fx.mb.Read(t.Context(), dev, 0, 100)
	if err != nil {
		t.Fatal(err)
	}
	var out []uint32
	for _, e := range es {
		env := new(pb.Envelope)
		if err := proto.Unmarshal(e.Data, env); err != nil {
			t.Fatal(err)
		}
		if env.Kind != pb.EnvelopeKind_ENVELOPE_KIND_KEYS_LOW || env.To != dev.User || env.KeysLow == nil {
			t.Fatalf("unexpected mailbox entry %v", env)
		}
		out = append(out, env.KeysLow.Remaining)
	}
	return out
}

// Concurrent fetches tell the device exactly twice: at 9 and at 0.
func TestLowNoticeExactlyOnceEach(t *testing.T) {
	fx := newFixture(t, keys.LimitConfig{Burst: -1})
	m := newMaterial(t, 30)
	if n, err := fx.svc.Put(t.Context(), fx.alice, &m.upload); err != nil || n != 30 {
		t.Fatalf("Put = %d, %v", n, err)
	}
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 5 {
				if _, err := fx.svc.Fetch(t.Context(), fx.bob, "alice", 0); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	got := fx.notices(t, fx.alice)
	if len(got) != 2 || !(got[0] == 9 && got[1] == 0 || got[0] == 0 && got[1] == 9) {
		t.Errorf("notices = %v, want 9 and 0 once each", got)
	}
	if len(fx.notified.devs) != 2 || fx.notified.devs[0] != fx.alice {
		t.Errorf("notified %v, want alice twice", fx.notified.devs)
	}
	// A device that never held 10 is told only at 0.
	m2 := newMaterial(t, 3)
	bobKeys := m2.upload
	if _, err := fx.svc.Put(t.Context(), fx.bob, &bobKeys); err != nil {
		t.Fatal(err)
	}
	for range 5 {
		fx.svc.Fetch(t.Context(), fx.alice, "bob", 0)
	}
	if got := fx.notices(t, fx.bob); len(got) != 1 || got[0] != 0 {
		t.Errorf("notices of a device with 3 prekeys = %v, want [0]", got)
	}
}

// A notice that cannot be stored does not fail the fetch, whose prekey is
// already taken.
func TestLowNoticeFailureDoesNotFailFetch(t *testing.T) {
	fx := newFixture(t, keys.LimitConfig{Burst: -1})
	m := newMaterial(t, 1)
	if _, err := fx.svc.Put(t.Context(), fx.alice, &m.upload); err != nil {
		t.Fatal(err)
	}
	fx.mb.Close()
	bs, err := fx.svc.Fetch(t.Context(), fx.bob, "alice", 0)
	if err != nil || len(bs) != 1 || bs[0].OneTimePreKey == nil {
		t.Fatalf("Fetch with a closed mailbox = %+v, %v; want the bundle", bs, err)
	}
	if len(fx.notified.devs) != 0 {
		t.Errorf("notified %v of a notice that was not stored", fx.notified.devs)
	}
}

func TestServiceErrors(t *testing.T) {
	fx := newFixture(t, keys.LimitConfig{Burst: 2, Every: time.Hour})
	ctx := context.Background()
	code := func(err error) string {
		var ke *keys.Error
		if errors.As(err, &ke) {
			return ke.Code
		}
		return ""
	}
	m := newMaterial(t, 2)
	if _, err := fx.svc.Put(ctx, fx.alice, &keys.Upload{IdentityKey: m.identity}); code(err) != keys.CodeInvalid {
		t.Errorf("incomplete first upload: %v", err)
	}
	if _, err := fx.svc.Put(ctx, fx.alice, &m.upload); err != nil {
		t.Fatal(err)
	}
	if _, err := fx.svc.Put(ctx, fx.alice, &m.upload); code(err) != keys.CodePreKeyExists {
		t.Errorf("same prekeys again: %v", err)
	}
	other := newMaterial(t, 0)
	if _, err := fx.svc.Put(ctx, fx.alice, &other.upload); code(err) != keys.CodeIdentityMismatch {
		t.Errorf("other identity: %v", err)
	}
	gone := ident.Device{User: "alice", ID: 99}
	if _, err := fx.svc.Put(ctx, gone, &other.upload); code(err) != keys.CodeUnauthorized {
		t.Errorf("unknown device: %v", err)
	}
	if _, err := fx.svc.Status(ctx, gone); code(err) != keys.CodeUnauthorized {
		t.Errorf("status of unknown device: %v", err)
	}
	if _, err := fx.svc.IdentityKeys(ctx, "nobody"); code(err) != keys.CodeUnknownUser {
		t.Errorf("identity keys of unknown user: %v", err)
	}
	if _, err := fx.svc.Fetch(ctx, fx.bob, "nobody", 0); code(err) != keys.CodeUnknownUser {
		t.Errorf("fetch of unknown user: %v", err)
	}
	if _, err := fx.svc.Fetch(ctx, fx.bob, "alice", 0); err != nil {
		t.Errorf("second fetch: %v", err)
	}
	_, err := fx.svc.Fetch(ctx, fx.bob, "alice", 0)
	var ke *keys.Error
	if !errors.As(err, &ke) || ke.Code != keys.CodeRateLimited || ke.RetryAfter <= 0 {
		t.Errorf("third fetch: %v, want rate_limited with a retry time", err)
	}
	if _, err := fx.svc.Fetch(ctx, fx.alice, "alice", 0); err != nil {
		t.Errorf("another device's fetch: %v", err)
	}
}
