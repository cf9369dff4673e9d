package api_test

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/prometheus/client_golang/prometheus"
	"go.mau.fi/libsignal/ecc"

	"github.com/courier-im/courier/internal/api"
	"github.com/courier-im/courier/internal/auth"
	"github.com/courier-im/courier/internal/auth/authtest"
	"github.com/courier-im/courier/internal/delivery"
	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/keys"
	"github.com/courier-im/courier/internal/mailbox/pebble"
	"github.com/courier-im/courier/internal/metrics"
)

// keysCodes are the answers PUT /v1/keys may give (docs/protocol.md).
var keysCodes = map[string]int{
	"invalid":           400,
	"bad_signature":     400,
	"identity_mismatch": 409,
	"prekey_exists":     409,
	"too_many_prekeys":  409,
	"payload_too_large": 413,
}

type keysFixture struct {
	h     http.Handler
	st    *authtest.Store
	mb    *pebble.Store
	alice ident.Device
	basic string
	runs  int
}

func newKeysFixture(tb testing.TB) *keysFixture {
	tb.Helper()
	st := authtest.New()
	alice, cred, err := st.Register("alice")
	if err != nil {
		tb.Fatal(err)
	}
	if _, _, err := st.Register("bob"); err != nil {
		tb.Fatal(err)
	}
	mb, err := pebble.Open("mailbox", pebble.Options{FS: vfs.NewMem()})
	if err != nil {
		tb.Fatal(err)
	}
	svc := delivery.New(delivery.Config{Mailbox: mb, Accounts: st, Notifier: noNotify{}, Metrics: metrics.New(prometheus.NewRegistry())})
	ks := keys.New(keys.Config{Store: st, Mailbox: mb, Notifier: noNotify{}, FetchLimit: keys.LimitConfig{Burst: -1}})
	mux := http.NewServeMux()
	api.New(api.Config{Accounts: st, Delivery: svc, Keys: ks, Auth: &auth.Authenticator{Accounts: st}}).Register(mux)
	r := httptest.NewRequest("GET", "/", nil)
	r.SetBasicAuth(alice.String(), cred)
	return &keysFixture{h: mux, st: st, mb: mb, alice: alice, basic: r.Header.Get("Authorization")}
}

// FuzzPutKeys fuzzes PUT /v1/keys bodies, as alice.1: every answer is a
// success or a documented error, never a 500; a success stored exactly the
// identity key of the body, with a signed prekey that verifies.
func FuzzPutKeys(f *testing.F) {
	for _, s := range keySeeds() {
		f.Add([]byte(s))
	}
	var fx *keysFixture
	f.Cleanup(func() {
		if fx != nil {
			fx.mb.Close()
		}
	})
	f.Fuzz(func(t *testing.T, body []byte) {
		if fx == nil || fx.runs >= 2000 {
			if fx != nil {
				fx.mb.Close()
			}
			fx = newKeysFixture(t)
		}
		fx.runs++
		r := httptest.NewRequest("PUT", "/v1/keys", bytes.NewReader(body))
		r.Header.Set("Content-Type", "application/json")
		r.Header.Set("Authorization", fx.basic)
		w := httptest.NewRecorder()
		fx.h.ServeHTTP(w, r)
		if ct := w.Header().Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
			t.Fatalf("PUT /v1/keys %q: status %d with Content-Type %q", body, w.Code, ct)
		}
		if w.Code == http.StatusOK {
			var ok struct {
				N *int `json:"one_time_prekeys"`
			}
			if err := json.Unmarshal(w.Body.Bytes(), &ok); err != nil || ok.N == nil || *ok.N < 0 || *ok.N > keys.MaxStoredPreKeys {
				t.Fatalf("PUT /v1/keys %q: success body %q", body, w.Body)
			}
			var req keys.Upload
			if err := json.Unmarshal(body, &req); err != nil {
				t.Fatalf("PUT /v1/keys %q succeeded but the body does not decode: %v", body, err)
			}
			st, err := fx.st.KeyStatus(t.Context(), fx.alice)
			if err != nil || !bytes.Equal(st.IdentityKey, req.IdentityKey) || st.OneTimePreKeys != *ok.N {
				t.Fatalf("PUT /v1/keys %q succeeded, but the store holds %+v, %v", body, st, err)
			}
			if spk := req.SignedPreKey; spk != nil && !keys.VerifySignedPreKey(req.IdentityKey, spk.PublicKey, spk.Signature) {
				t.Fatalf("PUT /v1/keys %q stored a signed prekey that does not verify", body)
			}
			return
		}
		var e struct {
			Error struct {
				Code    string `json:"code"`
				Message string `json:"message"`
			} `json:"error"`
		}
		if err := json.Unmarshal(w.Body.Bytes(), &e); err != nil {
			t.Fatalf("PUT /v1/keys %q: status %d with a body that is not a JSON error: %q", body, w.Code, w.Body)
		}
		if status, ok := keysCodes[e.Error.Code]; !ok || status != w.Code || e.Error.Message == "" {
			t.Fatalf("PUT /v1/keys %q: status %d, code %q, message %q: not a documented answer", body, w.Code, e.Error.Code, e.Error.Message)
		}
	})
}

// keySeeds are upload bodies, valid and not, made with fixed private keys
// (the same inputs are committed in testdata/fuzz/FuzzPutKeys).
func keySeeds() []string {
	b64 := base64.StdEncoding.EncodeToString
	priv := func(b byte) *ecc.ECKeyPair { return ecc.CreateKeyPair(bytes.Repeat([]byte{b}, 32)) }
	id, spk, other := priv(1), priv(2), priv(3)
	sig := ecc.CalculateSignature(id.PrivateKey(), spk.PublicKey().Serialize())
	idKey, spkKey := b64(id.PublicKey().Serialize()), b64(spk.PublicKey().Serialize())
	pks := func(from, n int) string {
		var parts []string
		for i := from; i < from+n; i++ {
			parts = append(parts, fmt.Sprintf(`{"id":%d,"public_key":%q}`, i, b64(priv(byte(10+i%200)).PublicKey().Serialize())))
		}
		return "[" + strings.Join(parts, ",") + "]"
	}
	full := func(identity, spkPub, signature, prekeys string) string {
		return fmt.Sprintf(`{"identity_key":%q,"registration_id":1234,"signed_prekey":{"id":1,"public_key":%q,"signature":%q},"one_time_prekeys":%s}`,
			identity, spkPub, signature, prekeys)
	}
	return []string{
		full(idKey, spkKey, b64(sig[:]), pks(1, 3)),
		fmt.Sprintf(`{"identity_key":%q}`, idKey),
		fmt.Sprintf(`{"identity_key":%q,"one_time_prekeys":%s}`, idKey, pks(50, 2)),
		full(b64(other.PublicKey().Serialize()), spkKey, b64(sig[:]), pks(1, 1)),
		full(idKey, spkKey, b64(sig[:63]), "[]"),
		full(idKey, spkKey, strings.Repeat("A", 88), "[]"),
		full(idKey[:40], spkKey, b64(sig[:]), "[]"),
		full("not base64", spkKey, b64(sig[:]), "[]"),
		full(idKey, spkKey, b64(sig[:]), pks(1, 101)),
		full(idKey, spkKey, b64(sig[:]), `[{"id":1,"public_key":"BQ=="},{"id":1}]`),
		full(idKey, spkKey, b64(sig[:]), `[{"id":-5,"public_key":null}]`),
		`{"identity_key":null,"registration_id":-1}`,
		`{"identity_key":"BQ==","signed_prekey":null,"one_time_prekeys":null,"extra":1}`,
		`{"registration_id":4294967296}`,
		`[]`,
		``,
	}
}
