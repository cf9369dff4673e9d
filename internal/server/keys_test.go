package server_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.mau.fi/libsignal/ecc"
	"go.mau.fi/libsignal/keys/identity"
	"go.mau.fi/libsignal/util/keyhelper"

	"github.com/courier-im/courier/internal/accounts/postgres"
	"github.com/courier-im/courier/internal/keys"
	"github.com/courier-im/courier/internal/server"
	"github.com/courier-im/courier/internal/servertest"
	"github.com/courier-im/courier/internal/testenv"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

// The prekey service and device linking over real HTTP (and the WebSocket,
// for the low-prekey notice), with real libsignal keys.

// deviceKeys is a device's key material, as a client keeps it.
type deviceKeys struct {
	identity *identity.KeyPair
	regID    uint32
	spkID    uint32
	spk      *ecc.ECKeyPair
	spkSig   [64]byte
	prekeys  map[uint32]*ecc.ECKeyPair
}

func newDeviceKeys(t testing.TB) *deviceKeys {
	t.Helper()
	id, err := keyhelper.GenerateIdentityKeyPair()
	if err != nil {
		t.Fatal(err)
	}
	k := &deviceKeys{identity: id, regID: keyhelper.GenerateRegistrationID(), prekeys: map[uint32]*ecc.ECKeyPair{}}
	k.rotate(t, 1)
	return k
}

// rotate makes a new signed prekey.
func (k *deviceKeys) rotate(t testing.TB, id uint32) {
	t.Helper()
	kp, err := ecc.GenerateKeyPair()
	if err != nil {
		t.Fatal(err)
	}
	k.spkID, k.spk = id, kp
	k.spkSig = ecc.CalculateSignature(k.identity.PrivateKey(), kp.PublicKey().Serialize())
}

// newPreKeys makes one-time prekeys with ids from..from+n-1.
func (k *deviceKeys) newPreKeys(t testing.TB, from, n int) []map[string]any {
	t.Helper()
	var out []map[string]any
	for i := from; i < from+n; i++ {
		kp, err := ecc.GenerateKeyPair()
		if err != nil {
			t.Fatal(err)
		}
		k.prekeys[uint32(i)] = kp
		out = append(out, map[string]any{"id": i, "public_key": kp.PublicKey().Serialize()})
	}
	return out
}

func (k *deviceKeys) identityKey() []byte { return k.identity.PublicKey().Serialize() }

// upload is a full PUT /v1/keys body with n new one-time prekeys from id from.
func (k *deviceKeys) upload(t testing.TB, from, n int) map[string]any {
	return map[string]any{
		"identity_key":    k.identityKey(),
		"registration_id": k.regID,
		"signed_prekey": map[string]any{
			"id": k.spkID, "public_key": k.spk.PublicKey().Serialize(), "signature": k.spkSig[:],
		},
		"one_time_prekeys": k.newPreKeys(t, from, n),
	}
}

type bundlesJSON struct {
	User    string `json:"user"`
	Devices []struct {
		Device         uint32 `json:"device"`
		RegistrationID uint32 `json:"registration_id"`
		IdentityKey    []byte `json:"identity_key"`
		SignedPreKey   *struct {
			ID        uint32 `json:"id"`
			PublicKey []byte `json:"public_key"`
			Signature []byte `json:"signature"`
		} `json:"signed_prekey"`
		OneTimePreKey *struct {
			ID        uint32 `json:"id"`
			PublicKey []byte `json:"public_key"`
		} `json:"one_time_prekey"`
	} `json:"devices"`
}

type keyStatusJSON struct {
	IdentityKey    []byte  `json:"identity_key"`
	SignedPreKeyID *uint32 `json:"signed_prekey_id"`
	OneTimePreKeys int     `json:"one_time_prekeys"`
}

func putKeys(t testing.TB, base string, a account, body any) int {
	t.Helper()
	var resp struct {
		OneTimePreKeys int `json:"one_time_prekeys"`
	}
	if st := doJSON(t, base, "PUT", "/v1/keys", a, body, &resp); st != http.StatusOK {
		t.Fatalf("PUT /v1/keys as %s.%d: status %d", a.User, a.Device, st)
	}
	return resp.OneTimePreKeys
}

func fetchBundles(t testing.TB, base string, a account, path string) bundlesJSON {
	t.Helper()
	var b bundlesJSON
	if st := doJSON(t, base, "GET", path, a, nil, &b); st != http.StatusOK {
		t.Fatalf("GET %s as %s.%d: status %d", path, a.User, a.Device, st)
	}
	return b
}

func keyServer(t *testing.T, opts ...servertest.Option) *servertest.Server {
	return servertest.Start(t, append([]servertest.Option{func(c *server.Config) { c.AuthFailures.Burst = 1000 }}, opts...)...)
}

func TestKeysUploadFetchExhaustion(t *testing.T) {
	t.Parallel()
	s := keyServer(t)
	alice, bob := register(t, s.URL, "alice"), register(t, s.URL, "bob")

	var st keyStatusJSON
	if code := doJSON(t, s.URL, "GET", "/v1/keys", alice, nil, &st); code != http.StatusOK || st.IdentityKey != nil || st.SignedPreKeyID != nil || st.OneTimePreKeys != 0 {
		t.Fatalf("GET /v1/keys before upload: %d %+v, want 200 with nulls and 0", code, st)
	}
	// Before alice uploads, her device is listed without keys.
	b := fetchBundles(t, s.URL, bob, "/v1/keys/alice")
	if len(b.Devices) != 1 || b.Devices[0].IdentityKey != nil || b.Devices[0].SignedPreKey != nil || b.Devices[0].OneTimePreKey != nil {
		t.Fatalf("bundles before upload = %+v, want alice.1 without keys", b)
	}

	k := newDeviceKeys(t)
	if n := putKeys(t, s.URL, alice, k.upload(t, 1, 3)); n != 3 {
		t.Fatalf("PUT /v1/keys = %d one-time prekeys, want 3", n)
	}
	if code := doJSON(t, s.URL, "GET", "/v1/keys", alice, nil, &st); code != http.StatusOK ||
		!bytes.Equal(st.IdentityKey, k.identityKey()) || st.SignedPreKeyID == nil || *st.SignedPreKeyID != 1 || st.OneTimePreKeys != 3 {
		t.Fatalf("GET /v1/keys = %d %+v", code, st)
	}

	seen := map[uint32]bool{}
	for i := range 3 {
		b := fetchBundles(t, s.URL, bob, "/v1/keys/alice")
		if b.User != "alice" || len(b.Devices) != 1 {
			t.Fatalf("fetch %d: %+v", i, b)
		}
		d := b.Devices[0]
		if d.Device != 1 || d.RegistrationID != k.regID || !bytes.Equal(d.IdentityKey, k.identityKey()) {
			t.Fatalf("fetch %d: device %d registration %d identity %x", i, d.Device, d.RegistrationID, d.IdentityKey)
		}
		// The bundle is usable as libsignal takes it: the signature
		// verifies with the identity key.
		if d.SignedPreKey == nil || d.SignedPreKey.ID != 1 || !keys.VerifySignedPreKey(d.IdentityKey, d.SignedPreKey.PublicKey, d.SignedPreKey.Signature) {
			t.Fatalf("fetch %d: signed prekey %+v does not verify", i, d.SignedPreKey)
		}
		pk := d.OneTimePreKey
		if pk == nil || seen[pk.ID] || k.prekeys[pk.ID] == nil || !bytes.Equal(pk.PublicKey, k.prekeys[pk.ID].PublicKey().Serialize()) {
			t.Fatalf("fetch %d: one-time prekey %+v (seen %v)", i, pk, seen)
		}
		seen[pk.ID] = true
	}
	// Exhausted: the signed prekey alone.
	b = fetchBundles(t, s.URL, bob, "/v1/keys/alice")
	if d := b.Devices[0]; d.OneTimePreKey != nil || d.SignedPreKey == nil || d.IdentityKey == nil {
		t.Fatalf("fetch after exhaustion: %+v, want the signed prekey and no one-time prekey", d)
	}
	// The JSON says null, not an absent field.
	raw := rawGet(t, s.URL, "/v1/keys/alice", bob)
	if !strings.Contains(raw, `"one_time_prekey":null`) {
		t.Errorf("exhausted bundle JSON %s lacks \"one_time_prekey\":null", raw)
	}

	// Rotation: the new signed prekey replaces the old.
	k.rotate(t, 2)
	putKeys(t, s.URL, alice, map[string]any{"identity_key": k.identityKey(),
		"signed_prekey": map[string]any{"id": 2, "public_key": k.spk.PublicKey().Serialize(), "signature": k.spkSig[:]}})
	b = fetchBundles(t, s.URL, bob, "/v1/keys/alice")
	if d := b.Devices[0]; d.SignedPreKey == nil || d.SignedPreKey.ID != 2 || !bytes.Equal(d.SignedPreKey.PublicKey, k.spk.PublicKey().Serialize()) {
		t.Errorf("bundle after rotation: %+v, want signed prekey 2", d.SignedPreKey)
	}

	// The device list shows identity keys.
	var devs struct {
		Devices []struct {
			ID          uint32 `json:"id"`
			IdentityKey []byte `json:"identity_key"`
		} `json:"devices"`
	}
	if code := doJSON(t, s.URL, "GET", "/v1/users/alice/devices", bob, nil, &devs); code != http.StatusOK ||
		len(devs.Devices) != 1 || !bytes.Equal(devs.Devices[0].IdentityKey, k.identityKey()) {
		t.Errorf("GET /v1/users/alice/devices = %d %+v, want alice.1 with its identity key", code, devs)
	}
	if raw := rawGet(t, s.URL, "/v1/users/bob/devices", alice); !strings.Contains(raw, `"identity_key":null`) {
		t.Errorf("device list of bob, who uploaded nothing: %s, want \"identity_key\":null", raw)
	}
}

func rawGet(t testing.TB, base, path string, a account) string {
	t.Helper()
	req, _ := http.NewRequest("GET", base+path, nil)
	req.Header.Set("Authorization", a.basic())
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// The bundles of every device of a user in one call, each consuming its
// own device's prekey; ?device=N limits both.
func TestKeysAllDevicesAndDeviceQuery(t *testing.T) {
	t.Parallel()
	s := keyServer(t)
	alice, bob := register(t, s.URL, "alice"), register(t, s.URL, "bob")
	bob2 := linkDevice(t, s.URL, bob, "laptop")
	bob3 := linkDevice(t, s.URL, bob, "tablet") // uploads nothing
	k1, k2 := newDeviceKeys(t), newDeviceKeys(t)
	putKeys(t, s.URL, bob, k1.upload(t, 1, 5))
	putKeys(t, s.URL, bob2, k2.upload(t, 1, 5))

	b := fetchBundles(t, s.URL, alice, "/v1/keys/bob")
	if len(b.Devices) != 3 || b.Devices[0].Device != 1 || b.Devices[1].Device != bob2.Device || b.Devices[2].Device != bob3.Device {
		t.Fatalf("bundles of bob = %+v, want devices 1, %d, %d", b, bob2.Device, bob3.Device)
	}
	if !bytes.Equal(b.Devices[0].IdentityKey, k1.identityKey()) || !bytes.Equal(b.Devices[1].IdentityKey, k2.identityKey()) || b.Devices[2].IdentityKey != nil {
		t.Errorf("identity keys of bob's devices wrong: %+v", b.Devices)
	}
	if b.Devices[0].OneTimePreKey == nil || b.Devices[1].OneTimePreKey == nil || b.Devices[2].OneTimePreKey != nil {
		t.Errorf("one-time prekeys of bob's devices: %+v", b.Devices)
	}
	one := fetchBundles(t, s.URL, alice, fmt.Sprintf("/v1/keys/bob?device=%d", bob2.Device))
	if len(one.Devices) != 1 || one.Devices[0].Device != bob2.Device {
		t.Fatalf("?device=%d: %+v", bob2.Device, one)
	}
	var st1, st2 keyStatusJSON
	doJSON(t, s.URL, "GET", "/v1/keys", bob, nil, &st1)
	doJSON(t, s.URL, "GET", "/v1/keys", bob2, nil, &st2)
	if st1.OneTimePreKeys != 4 || st2.OneTimePreKeys != 3 {
		t.Errorf("after two fetches (one of bob.%d only) bob.1 holds %d, bob.%d %d; want 4 and 3", bob2.Device, st1.OneTimePreKeys, bob2.Device, st2.OneTimePreKeys)
	}
	if b := fetchBundles(t, s.URL, alice, "/v1/keys/bob?device=999"); len(b.Devices) != 0 {
		t.Errorf("?device=999 = %+v, want no devices", b)
	}
	for _, q := range []string{"0", "-1", "01", "x", "4294967296", ""} {
		var e apiError
		if st := doJSON(t, s.URL, "GET", "/v1/keys/bob?device="+q, alice, nil, &e); st != http.StatusBadRequest || e.Error.Code != "invalid" {
			t.Errorf("?device=%s: %d %q, want 400 invalid", q, st, e.Error.Code)
		}
	}
	for _, u := range []string{"nobody", "Bob", "a.b"} {
		var e apiError
		if st := doJSON(t, s.URL, "GET", "/v1/keys/"+u, alice, nil, &e); st != http.StatusNotFound || e.Error.Code != "unknown_user" {
			t.Errorf("GET /v1/keys/%s: %d %q, want 404 unknown_user", u, st, e.Error.Code)
		}
	}
}

// Many devices fetch one device's bundle at once: no one-time prekey is
// handed out twice.
func TestKeysConcurrentFetch(t *testing.T) {
	t.Parallel()
	s := keyServer(t)
	alice := register(t, s.URL, "alice")
	k := newDeviceKeys(t)
	const n = 40
	putKeys(t, s.URL, alice, k.upload(t, 1, n))
	const fetchers, each = 8, 6 // 48 fetches for 40 prekeys
	var (
		mu    sync.Mutex
		got   = map[uint32]int{}
		empty int
		wg    sync.WaitGroup
	)
	for i := range fetchers {
		f := register(t, s.URL, fmt.Sprintf("fetcher%d", i))
		wg.Go(func() {
			for range each {
				var b bundlesJSON
				if st := doJSON(t, s.URL, "GET", "/v1/keys/alice", f, nil, &b); st != http.StatusOK || len(b.Devices) != 1 {
					t.Errorf("fetch: %d %+v", st, b)
					return
				}
				mu.Lock()
				if pk := b.Devices[0].OneTimePreKey; pk != nil {
					got[pk.ID]++
				} else {
					empty++
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	for id, c := range got {
		if c != 1 {
			t.Errorf("prekey %d handed out %d times", id, c)
		}
	}
	if len(got) != n || empty != fetchers*each-n {
		t.Errorf("%d distinct prekeys and %d empty answers, want %d and %d", len(got), empty, n, fetchers*each-n)
	}
}

// A fetch that takes a device below 10 one-time prekeys, and one that
// takes it to 0, put a KEYS_LOW envelope in the device's mailbox: a
// connected device gets it at once.
func TestKeysLowNotice(t *testing.T) {
	t.Parallel()
	s := keyServer(t)
	alice, bob := register(t, s.URL, "alice"), register(t, s.URL, "bob")
	k := newDeviceKeys(t)
	putKeys(t, s.URL, alice, k.upload(t, 1, 12))
	ac := dial(t, s.URL, alice)
	ac.until(isSynced)
	isKeysLow := func(f *pb.ServerFrame) bool {
		return f.GetDeliver().GetEnvelope().GetKind() == pb.EnvelopeKind_ENVELOPE_KIND_KEYS_LOW
	}
	// 12 -> 11 -> 10: no notice.
	fetchBundles(t, s.URL, bob, "/v1/keys/alice")
	fetchBundles(t, s.URL, bob, "/v1/keys/alice")
	ac.quiet(isKeysLow)
	// 10 -> 9: a notice.
	fetchBundles(t, s.URL, bob, "/v1/keys/alice")
	f := ac.until(isKeysLow)
	env := f.GetDeliver().Envelope
	if env.GetKeysLow().GetRemaining() != 9 || env.Sender != "alice" || env.ServerId == "" || len(env.Payload) != 0 {
		t.Fatalf("KEYS_LOW envelope = %v, want remaining 9 from alice's own account", env)
	}
	ac.ack(f.GetDeliver().Seq)
	// 9 -> 1: nothing more.
	for range 8 {
		fetchBundles(t, s.URL, bob, "/v1/keys/alice")
	}
	ac.quiet(isKeysLow)
	// A refill above the threshold and back down: no notice until the
	// count crosses again.
	fetchBundles(t, s.URL, bob, "/v1/keys/alice") // 1 -> 0
	f = ac.until(isKeysLow)
	if r := f.GetDeliver().Envelope.GetKeysLow().GetRemaining(); r != 0 {
		t.Fatalf("second KEYS_LOW remaining = %d, want 0", r)
	}
	ac.ack(f.GetDeliver().Seq)
	// Exhausted fetches take nothing and tell nothing more.
	fetchBundles(t, s.URL, bob, "/v1/keys/alice")
	ac.quiet(isKeysLow)

	// A device that is offline finds the notice on its next connection.
	putKeys(t, s.URL, alice, map[string]any{"identity_key": k.identityKey(), "one_time_prekeys": k.newPreKeys(t, 100, 10)})
	ac.ws.CloseNow()
	<-ac.done
	fetchBundles(t, s.URL, bob, "/v1/keys/alice") // 10 -> 9
	ac = dial(t, s.URL, alice)
	if f := ac.until(isKeysLow); f.GetDeliver().Envelope.GetKeysLow().GetRemaining() != 9 {
		t.Fatalf("KEYS_LOW on reconnect = %v, want remaining 9", f)
	}
}

func TestKeysIdentityMismatch(t *testing.T) {
	t.Parallel()
	s := keyServer(t)
	alice := register(t, s.URL, "alice")
	k := newDeviceKeys(t)
	putKeys(t, s.URL, alice, k.upload(t, 1, 5))
	other := newDeviceKeys(t)
	var e apiError
	if st := doJSON(t, s.URL, "PUT", "/v1/keys", alice, other.upload(t, 50, 5), &e); st != http.StatusConflict || e.Error.Code != "identity_mismatch" {
		t.Fatalf("upload with another identity: %d %q, want 409 identity_mismatch", st, e.Error.Code)
	}
	var st keyStatusJSON
	doJSON(t, s.URL, "GET", "/v1/keys", alice, nil, &st)
	if !bytes.Equal(st.IdentityKey, k.identityKey()) || st.OneTimePreKeys != 5 {
		t.Errorf("after a refused identity change: %+v, want the first identity and 5 prekeys", st)
	}
	// A new identity is a new device: linked, it uploads its own.
	alice2 := linkDevice(t, s.URL, alice, "reinstalled")
	putKeys(t, s.URL, alice2, other.upload(t, 100, 5))
}

// Bad uploads are refused with the documented code and change nothing.
func TestKeysBadUploads(t *testing.T) {
	t.Parallel()
	s := keyServer(t)
	alice := register(t, s.URL, "alice")
	k := newDeviceKeys(t)
	other := newDeviceKeys(t)
	b64 := base64.StdEncoding.EncodeToString
	spk := func(pub, sig []byte) map[string]any {
		return map[string]any{"id": 1, "public_key": pub, "signature": sig}
	}
	withKey := func(mod func(m map[string]any)) map[string]any {
		m := k.upload(t, 1, 2)
		mod(m)
		return m
	}
	badType := append([]byte{0x06}, k.identityKey()[1:]...)
	tests := []struct {
		name   string
		body   any
		status int
		code   string
	}{
		{"signed by another identity", withKey(func(m map[string]any) {
			m["signed_prekey"] = spk(other.spk.PublicKey().Serialize(), other.spkSig[:])
		}), 400, "bad_signature"},
		{"signature of another key", withKey(func(m map[string]any) {
			m["signed_prekey"] = spk(other.spk.PublicKey().Serialize(), k.spkSig[:])
		}), 400, "bad_signature"},
		{"flipped signature bit", withKey(func(m map[string]any) {
			sig := k.spkSig
			sig[10] ^= 1
			m["signed_prekey"] = spk(k.spk.PublicKey().Serialize(), sig[:])
		}), 400, "bad_signature"},
		{"short signature", withKey(func(m map[string]any) {
			m["signed_prekey"] = spk(k.spk.PublicKey().Serialize(), k.spkSig[:63])
		}), 400, "invalid"},
		{"identity key of 32 bytes", withKey(func(m map[string]any) { m["identity_key"] = k.identityKey()[1:] }), 400, "invalid"},
		{"identity key of another type", withKey(func(m map[string]any) { m["identity_key"] = badType }), 400, "invalid"},
		{"no identity key", withKey(func(m map[string]any) { delete(m, "identity_key") }), 400, "invalid"},
		{"identity key not base64", withKey(func(m map[string]any) { m["identity_key"] = "not base64!" }), 400, "invalid"},
		{"identity key in base64url", withKey(func(m map[string]any) {
			m["identity_key"] = base64.URLEncoding.EncodeToString(bytes.Repeat([]byte{0xfb}, 33))
		}), 400, "invalid"},
		{"prekey not base64", withKey(func(m map[string]any) {
			m["one_time_prekeys"] = []map[string]any{{"id": 1, "public_key": "%%%"}}
		}), 400, "invalid"},
		{"prekey too long", withKey(func(m map[string]any) {
			m["one_time_prekeys"] = []map[string]any{{"id": 1, "public_key": b64(make([]byte, 34))}}
		}), 400, "invalid"},
		{"prekey id twice", withKey(func(m map[string]any) {
			pks := k.newPreKeys(t, 7, 2)
			pks[1]["id"] = 7
			m["one_time_prekeys"] = pks
		}), 400, "invalid"},
		{"101 prekeys", withKey(func(m map[string]any) { m["one_time_prekeys"] = k.newPreKeys(t, 1000, 101) }), 400, "invalid"},
		{"negative prekey id", withKey(func(m map[string]any) {
			m["one_time_prekeys"] = []map[string]any{{"id": -1, "public_key": k.identityKey()}}
		}), 400, "invalid"},
		{"first upload without a signed prekey", withKey(func(m map[string]any) { delete(m, "signed_prekey") }), 400, "invalid"},
		{"first upload without a registration id", withKey(func(m map[string]any) { delete(m, "registration_id") }), 400, "invalid"},
		{"unknown field", withKey(func(m map[string]any) { m["device"] = 2 }), 400, "invalid"},
		{"not JSON", "identity_key=x", 400, "invalid"},
		{"body too large", withKey(func(m map[string]any) { m["padding"] = strings.Repeat("x", keys.MaxUploadBytes) }), 413, "payload_too_large"},
	}
	for _, tc := range tests {
		var e apiError
		if st := doJSON(t, s.URL, "PUT", "/v1/keys", alice, tc.body, &e); st != tc.status || e.Error.Code != tc.code || e.Error.Message == "" {
			t.Errorf("%s: %d %q (%s), want %d %s", tc.name, st, e.Error.Code, e.Error.Message, tc.status, tc.code)
		}
	}
	var st keyStatusJSON
	doJSON(t, s.URL, "GET", "/v1/keys", alice, nil, &st)
	if st.IdentityKey != nil || st.OneTimePreKeys != 0 {
		t.Fatalf("after refused uploads: %+v, want nothing stored", st)
	}

	// Limits and ids against what is stored.
	putKeys(t, s.URL, alice, k.upload(t, 1, 100))
	var e apiError
	if st := doJSON(t, s.URL, "PUT", "/v1/keys", alice, map[string]any{"identity_key": k.identityKey(), "one_time_prekeys": k.newPreKeys(t, 100, 1)}, &e); st != http.StatusConflict || e.Error.Code != "prekey_exists" {
		t.Errorf("reused prekey id: %d %q, want 409 prekey_exists", st, e.Error.Code)
	}
	for i := 1; i < 10; i++ {
		putKeys(t, s.URL, alice, map[string]any{"identity_key": k.identityKey(), "one_time_prekeys": k.newPreKeys(t, 1000*i, 100)})
	}
	if st := doJSON(t, s.URL, "PUT", "/v1/keys", alice, map[string]any{"identity_key": k.identityKey(), "one_time_prekeys": k.newPreKeys(t, 50000, 1)}, &e); st != http.StatusConflict || e.Error.Code != "too_many_prekeys" {
		t.Errorf("the 1001st prekey: %d %q, want 409 too_many_prekeys", st, e.Error.Code)
	}
	doJSON(t, s.URL, "GET", "/v1/keys", alice, nil, &st)
	if st.OneTimePreKeys != keys.MaxStoredPreKeys {
		t.Errorf("device holds %d, want %d", st.OneTimePreKeys, keys.MaxStoredPreKeys)
	}

	// Without a credential nothing is answered but 401.
	for _, p := range []struct{ method, path string }{{"PUT", "/v1/keys"}, {"GET", "/v1/keys"}, {"GET", "/v1/keys/alice"}, {"POST", "/v1/devices"}, {"DELETE", "/v1/devices/1"}} {
		if st := doJSON(t, s.URL, p.method, p.path, account{}, map[string]any{}, nil); st != http.StatusUnauthorized {
			t.Errorf("%s %s without credential: %d, want 401", p.method, p.path, st)
		}
	}
}

func TestKeysFetchRateLimit(t *testing.T) {
	t.Parallel()
	s := keyServer(t, func(c *server.Config) { c.KeyFetches = keys.LimitConfig{Burst: 3, Every: time.Hour} })
	alice, bob, carol := register(t, s.URL, "alice"), register(t, s.URL, "bob"), register(t, s.URL, "carol")
	k := newDeviceKeys(t)
	putKeys(t, s.URL, alice, k.upload(t, 1, 10))
	for range 3 {
		fetchBundles(t, s.URL, bob, "/v1/keys/alice")
	}
	req, _ := http.NewRequest("GET", s.URL+"/v1/keys/alice", nil)
	req.Header.Set("Authorization", bob.basic())
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var e apiError
	jsonDecode(resp.Body, &e)
	resp.Body.Close()
	if resp.StatusCode != http.StatusTooManyRequests || e.Error.Code != "rate_limited" || e.Error.RetryAfterMs <= 0 || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("4th fetch: %d %+v Retry-After %q, want 429 rate_limited with a retry time", resp.StatusCode, e.Error, resp.Header.Get("Retry-After"))
	}
	// Fetches of unknown users count too (no free enumeration) ...
	if st := doJSON(t, s.URL, "GET", "/v1/keys/nobody", bob, nil, &e); st != http.StatusTooManyRequests {
		t.Errorf("fetch of an unknown user while limited: %d, want 429", st)
	}
	// ... a limited fetch takes no prekey, and other devices are not limited.
	var st keyStatusJSON
	doJSON(t, s.URL, "GET", "/v1/keys", alice, nil, &st)
	if st.OneTimePreKeys != 7 {
		t.Errorf("alice holds %d prekeys, want 7 (limited fetches take none)", st.OneTimePreKeys)
	}
	fetchBundles(t, s.URL, carol, "/v1/keys/alice")
}

// Linking and removing devices, and what one device may not do to another
// account.
func TestKeysDevicesAuthz(t *testing.T) {
	t.Parallel()
	s := keyServer(t)
	alice, bob := register(t, s.URL, "alice"), register(t, s.URL, "bob")
	alice2 := linkDevice(t, s.URL, alice, "laptop")
	if alice2.User != "alice" || alice2.Device != 2 {
		t.Fatalf("linked device = %+v, want alice.2", alice2)
	}
	ka2 := newDeviceKeys(t)
	putKeys(t, s.URL, alice2, ka2.upload(t, 1, 5))
	ka1 := newDeviceKeys(t)
	putKeys(t, s.URL, alice, ka1.upload(t, 1, 5))

	// An upload always applies to the caller: bob's upload with a field
	// naming alice.2 is refused, and alice.2 is untouched.
	kb := newDeviceKeys(t)
	body := kb.upload(t, 1, 5)
	body["device"] = "alice.2"
	if st := doJSON(t, s.URL, "PUT", "/v1/keys", bob, body, nil); st != http.StatusBadRequest {
		t.Errorf("upload naming another device: %d, want 400", st)
	}
	delete(body, "device")
	putKeys(t, s.URL, bob, body)
	var st keyStatusJSON
	doJSON(t, s.URL, "GET", "/v1/keys", alice2, nil, &st)
	if !bytes.Equal(st.IdentityKey, ka2.identityKey()) || st.OneTimePreKeys != 5 {
		t.Errorf("alice.2 after bob's uploads: %+v", st)
	}

	// Bob cannot remove alice's devices: the path names a device of the
	// caller's own account, and bob has no device 2.
	var e apiError
	if code := doJSON(t, s.URL, "DELETE", "/v1/devices/2", bob, nil, &e); code != http.StatusNotFound || e.Error.Code != "unknown_device" {
		t.Errorf("bob deleting device 2: %d %q, want 404 unknown_device", code, e.Error.Code)
	}
	for _, p := range []string{"/v1/devices/alice.2", "/v1/users/alice/devices/2", "/v1/devices/0", "/v1/devices/02", "/v1/devices/-2"} {
		if code := doJSON(t, s.URL, "DELETE", p, bob, nil, nil); code != http.StatusBadRequest && code != http.StatusNotFound && code != http.StatusMethodNotAllowed {
			t.Errorf("DELETE %s as bob: %d", p, code)
		}
	}
	// Linking adds to the caller's own account only.
	bob2 := linkDevice(t, s.URL, bob, "x")
	if bob2.User != "bob" {
		t.Errorf("bob linked %+v", bob2)
	}
	if code := doJSON(t, s.URL, "GET", "/v1/keys", alice2, nil, &st); code != http.StatusOK {
		t.Errorf("alice.2 after bob's attempts: %d", code)
	}
	b := fetchBundles(t, s.URL, bob, "/v1/keys/alice")
	if len(b.Devices) != 2 {
		t.Fatalf("alice's devices after bob's attempts: %+v", b)
	}

	// alice.1 removes alice.2: its credential stops working and its keys
	// are gone.
	if code := doJSON(t, s.URL, "DELETE", "/v1/devices/2", alice, nil, nil); code != http.StatusNoContent {
		t.Fatalf("alice.1 removing alice.2: %d, want 204", code)
	}
	if code := doJSON(t, s.URL, "GET", "/v1/keys", alice2, nil, nil); code != http.StatusUnauthorized {
		t.Errorf("removed device's credential: %d, want 401", code)
	}
	b = fetchBundles(t, s.URL, bob, "/v1/keys/alice")
	if len(b.Devices) != 1 || b.Devices[0].Device != 1 {
		t.Errorf("alice's bundles after removing alice.2: %+v, want alice.1 only", b)
	}
	if code := doJSON(t, s.URL, "DELETE", "/v1/devices/2", alice, nil, &e); code != http.StatusNotFound || e.Error.Code != "unknown_device" {
		t.Errorf("removing alice.2 twice: %d %q, want 404 unknown_device", code, e.Error.Code)
	}
	// A device may remove itself.
	alice3 := linkDevice(t, s.URL, alice, "phone")
	if code := doJSON(t, s.URL, "DELETE", fmt.Sprintf("/v1/devices/%d", alice3.Device), alice3, nil, nil); code != http.StatusNoContent {
		t.Errorf("alice.%d removing itself: %d, want 204", alice3.Device, code)
	}
	if alice3.Device != 3 {
		t.Errorf("device ids are reused: got %d, want 3", alice3.Device)
	}

	// Bad link requests.
	for _, body := range []any{map[string]any{"name": strings.Repeat("n", 65)}, map[string]any{"user": "bob"}, "x"} {
		if code := doJSON(t, s.URL, "POST", "/v1/devices", alice, body, &e); code != http.StatusBadRequest || e.Error.Code != "invalid" {
			t.Errorf("POST /v1/devices %v: %d %q, want 400 invalid", body, code, e.Error.Code)
		}
	}
	// An account has a bounded number of devices.
	var last int
	for i := range 64 {
		var a account
		code := doJSON(t, s.URL, "POST", "/v1/devices", alice, map[string]string{"name": "d"}, &a)
		if code == http.StatusConflict {
			last = i
			break
		}
		if code != http.StatusCreated {
			t.Fatalf("link %d: %d", i, code)
		}
	}
	if last == 0 {
		t.Error("an account could link 64 more devices, want a limit")
	}
}

// linkDevice links a new device to a's account.
func linkDevice(t testing.TB, base string, a account, name string) account {
	t.Helper()
	var resp struct {
		User       string `json:"user"`
		Device     uint32 `json:"device"`
		Credential string `json:"credential"`
	}
	if st := doJSON(t, base, "POST", "/v1/devices", a, map[string]string{"name": name}, &resp); st != http.StatusCreated {
		t.Fatalf("POST /v1/devices as %s.%d: %d", a.User, a.Device, st)
	}
	return account{User: resp.User, Device: resp.Device, Cred: resp.Credential}
}

// The prekey service on the clustered account store: a server whose
// accounts are in PostgreSQL (a fresh schema, dropped at the end).
func TestKeysOnPostgres(t *testing.T) {
	t.Parallel()
	pgURL := testenv.PostgresURL(t)
	var rnd [8]byte
	rand.Read(rnd[:])
	schema := "courier_test_keys_" + hex.EncodeToString(rnd[:])
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		conn, err := pgx.Connect(ctx, pgURL)
		if err != nil {
			t.Errorf("drop schema: %v", err)
			return
		}
		defer conn.Close(ctx)
		if _, err := conn.Exec(ctx, `DROP SCHEMA IF EXISTS `+pgx.Identifier{schema}.Sanitize()+` CASCADE`); err != nil {
			t.Errorf("drop schema: %v", err)
		}
	})
	st, err := postgres.Open(t.Context(), pgURL, postgres.Options{Schema: schema})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() }) // after the server's shutdown, registered below
	s := keyServer(t, func(c *server.Config) { c.Accounts = st })

	alice, bob := register(t, s.URL, "alice"), register(t, s.URL, "bob")
	alice2 := linkDevice(t, s.URL, alice, "laptop")
	k1, k2 := newDeviceKeys(t), newDeviceKeys(t)
	putKeys(t, s.URL, alice, k1.upload(t, 1, 11))
	putKeys(t, s.URL, alice2, k2.upload(t, 1, 30))
	ac := dial(t, s.URL, alice)
	ac.until(isSynced)

	var (
		mu  sync.Mutex
		got = map[[2]uint32]int{}
		wg  sync.WaitGroup
	)
	for i := range 4 {
		f := register(t, s.URL, fmt.Sprintf("fetcher%d", i))
		wg.Go(func() {
			for range 5 {
				var b bundlesJSON
				if st := doJSON(t, s.URL, "GET", "/v1/keys/alice", f, nil, &b); st != http.StatusOK || len(b.Devices) != 2 {
					t.Errorf("fetch: %d %+v", st, b)
					return
				}
				mu.Lock()
				for _, d := range b.Devices {
					if d.OneTimePreKey != nil {
						got[[2]uint32{d.Device, d.OneTimePreKey.ID}]++
					}
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	for k, c := range got {
		if c != 1 {
			t.Errorf("prekey %d of alice.%d handed out %d times", k[1], k[0], c)
		}
	}
	if len(got) != 11+20 {
		t.Errorf("%d prekeys handed out, want 31 (all 11 of alice.1, 20 of alice.2)", len(got))
	}
	// alice.1 went 11 -> 0 under concurrent fetches: exactly two notices.
	isKeysLow := func(f *pb.ServerFrame) bool {
		return f.GetDeliver().GetEnvelope().GetKind() == pb.EnvelopeKind_ENVELOPE_KIND_KEYS_LOW
	}
	var remaining []uint32
	for range 2 {
		f := ac.until(isKeysLow)
		remaining = append(remaining, f.GetDeliver().Envelope.GetKeysLow().GetRemaining())
		ac.ack(f.GetDeliver().Seq)
	}
	ac.quiet(isKeysLow)
	// The fetches ran concurrently, so the notices may be in either order.
	slices.Sort(remaining)
	if !slices.Equal(remaining, []uint32{0, 9}) {
		t.Errorf("KEYS_LOW notices %v, want one at 9 and one at 0", remaining)
	}
	var e apiError
	if code := doJSON(t, s.URL, "PUT", "/v1/keys", alice, k2.upload(t, 100, 1), &e); code != http.StatusConflict || e.Error.Code != "identity_mismatch" {
		t.Errorf("identity change on PostgreSQL: %d %q", code, e.Error.Code)
	}
	if code := doJSON(t, s.URL, "DELETE", fmt.Sprintf("/v1/devices/%d", alice2.Device), alice, nil, nil); code != http.StatusNoContent {
		t.Fatalf("remove alice.2: %d", code)
	}
	if b := fetchBundles(t, s.URL, bob, "/v1/keys/alice"); len(b.Devices) != 1 {
		t.Errorf("bundles after removing alice.2: %+v", b)
	}
}
