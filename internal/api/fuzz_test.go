package api_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/courier-im/courier/internal/api"
	"github.com/courier-im/courier/internal/auth"
	"github.com/courier-im/courier/internal/auth/authtest"
	"github.com/courier-im/courier/internal/delivery"
	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox/pebble"
	"github.com/courier-im/courier/internal/metrics"
)

// statusOf is the error table of docs/protocol.md: every code and its
// HTTP status.
var statusOf = map[string]int{
	"invalid":             400,
	"invalid_name":        400,
	"unauthorized":        401,
	"unknown_user":        404,
	"unknown_recipient":   404,
	"name_taken":          409,
	"stale_devices":       409,
	"payload_too_large":   413,
	"rate_limited":        429,
	"storage_unavailable": 503,
	"shutting_down":       503,
	"internal":            500,
}

// endpoints lists, per fuzzed endpoint, its success status and the codes
// it may answer with (the endpoint table of docs/protocol.md, plus the
// codes every body-reading endpoint may give: a malformed or oversized
// body).
var endpoints = map[string]struct {
	success int
	codes   []string
}{
	"/v1/accounts": {201, []string{"invalid", "invalid_name", "name_taken", "payload_too_large"}},
	"/v1/messages": {202, []string{"invalid", "unknown_recipient", "stale_devices", "payload_too_large"}},
	"/v1/receipts": {202, []string{"invalid", "unknown_user", "payload_too_large"}},
}

// apiFixture is the API on in-memory backends, with users alice (devices
// 1 and 2) and bob; requests are made as alice.1.
type apiFixture struct {
	h     http.Handler
	mb    *pebble.Store
	basic string
	runs  int
}

type noNotify struct{}

func (noNotify) Notify(ident.Device) {}

func newAPIFixture(tb testing.TB) *apiFixture {
	tb.Helper()
	accts := authtest.New()
	var alice ident.Device
	var cred string
	for _, u := range []string{"alice", "alice", "bob"} {
		d, c, err := accts.Register(u)
		if err != nil {
			tb.Fatal(err)
		}
		if alice.User == "" {
			alice, cred = d, c
		}
	}
	mb, err := pebble.Open("mailbox", pebble.Options{FS: vfs.NewMem()})
	if err != nil {
		tb.Fatal(err)
	}
	svc := delivery.New(delivery.Config{Mailbox: mb, Accounts: accts, Notifier: noNotify{}, Metrics: metrics.New(prometheus.NewRegistry()),
		MaxPayload: 1024, MaxPayloads: 4})
	mux := http.NewServeMux()
	api.New(api.Config{Accounts: accts, Delivery: svc, Auth: &auth.Authenticator{Accounts: accts}}).Register(mux)
	r := httptest.NewRequest("GET", "/", nil)
	r.SetBasicAuth(alice.String(), cred)
	return &apiFixture{h: mux, mb: mb, basic: r.Header.Get("Authorization")}
}

// fuzzAPI runs body through POST path on a fixture renewed every few
// thousand runs (so that what the runs store does not pile up) and checks
// the answer.
func fuzzAPI(f *testing.F, path string, seeds []string) {
	for _, s := range seeds {
		f.Add([]byte(s))
	}
	var fx *apiFixture
	f.Cleanup(func() {
		if fx != nil {
			fx.mb.Close()
		}
	})
	f.Fuzz(func(t *testing.T, body []byte) {
		if fx == nil || fx.runs >= 5000 {
			if fx != nil {
				fx.mb.Close()
			}
			fx = newAPIFixture(t)
		}
		fx.runs++
		r := httptest.NewRequest("POST", path, bytes.NewReader(body))
		r.Header.Set("Content-Type", "application/json")
		r.Header.Set("Authorization", fx.basic)
		w := httptest.NewRecorder()
		fx.h.ServeHTTP(w, r)
		checkAPIAnswer(t, path, body, w)
	})
}

// checkAPIAnswer checks that an answer is a success of the endpoint or a
// JSON error whose code is documented for it, with the documented status.
func checkAPIAnswer(t testing.TB, path string, body []byte, w *httptest.ResponseRecorder) {
	t.Helper()
	ep := endpoints[path]
	if ct := w.Header().Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		t.Fatalf("POST %s %q: status %d with Content-Type %q", path, body, w.Code, ct)
	}
	if w.Code == ep.success {
		var ok map[string]any
		if err := json.Unmarshal(w.Body.Bytes(), &ok); err != nil {
			t.Fatalf("POST %s %q: success with a body that is not a JSON object: %q", path, body, w.Body)
		}
		switch path {
		case "/v1/accounts":
			if ok["user"] == nil || ok["device"] != float64(1) || ok["credential"] == "" {
				t.Fatalf("POST %s %q: success body %q", path, body, w.Body)
			}
		case "/v1/messages":
			if id, _ := ok["server_id"].(string); len(id) != 26 {
				t.Fatalf("POST %s %q: success body %q", path, body, w.Body)
			}
		}
		return
	}
	var e struct {
		Error struct {
			Code         string `json:"code"`
			Message      string `json:"message"`
			RetryAfterMs int64  `json:"retry_after_ms"`
		} `json:"error"`
	}
	dec := json.NewDecoder(bytes.NewReader(w.Body.Bytes()))
	if err := dec.Decode(&e); err != nil {
		t.Fatalf("POST %s %q: status %d with a body that is not a JSON error: %q", path, body, w.Code, w.Body)
	}
	code := e.Error.Code
	if w.Code == http.StatusInternalServerError {
		t.Fatalf("POST %s %q: 500 (%s: %s)", path, body, code, e.Error.Message)
	}
	allowed := false
	for _, c := range ep.codes {
		allowed = allowed || c == code
	}
	if !allowed || statusOf[code] != w.Code || e.Error.Message == "" {
		t.Fatalf("POST %s %q: status %d, code %q, message %q: not an answer documented for this endpoint", path, body, w.Code, code, e.Error.Message)
	}
}

// The seeds of the fuzz tests: real bodies, valid and not (the same
// inputs are committed in testdata/fuzz).
var accountSeeds = []string{
	`{"name":"carol","device_name":"laptop"}`,
	`{"name":"dave"}`,
	`{"name":"alice","device_name":"taken"}`,
	`{"name":"Alice Smith"}`,
	`{"name":"x","device_name":"` + strings.Repeat("n", 65) + `"}`,
	`{"name":"` + strings.Repeat("e", 33) + `"}`,
	`{"name":"eve","admin":true}`,
	`{"name":"eve"} {}`,
	`{"name":null}`,
	`{"name":"\u0065ve"}`,
	`{}`,
	`[]`,
	``,
}

func messageSeeds() []string {
	p := func(user string, dev int) string {
		return fmt.Sprintf(`{"user":%q,"device":%d,"payload":"Y2lwaGVydGV4dA=="}`, user, dev)
	}
	return []string{
		`{"client_msg_id":"c1","to":"bob","payloads":[` + p("bob", 1) + `,` + p("alice", 2) + `]}`,
		`{"client_msg_id":"c2","to":"alice","payloads":[` + p("alice", 2) + `]}`,
		`{"client_msg_id":"c3","to":"bob","payloads":[` + p("bob", 1) + `]}`,
		`{"client_msg_id":"c4","to":"nobody","payloads":[` + p("nobody", 1) + `]}`,
		`{"client_msg_id":"c5","to":"bob","payloads":[` + p("bob", 1) + `,` + p("bob", 1) + `,` + p("alice", 2) + `,` + p("bob", 2) + `,` + p("bob", 3) + `]}`,
		`{"client_msg_id":"c6","to":"bob","payloads":[{"user":"bob","device":1,"payload":"` + strings.Repeat("QUFB", 400) + `"},` + p("alice", 2) + `]}`,
		`{"client_msg_id":"","to":"bob","payloads":[]}`,
		`{"client_msg_id":"c7","to":"bob","payloads":[{"user":"bob","device":0}]}`,
		`{"client_msg_id":"c8","to":"bob","payloads":[{"user":"bob","device":-1}]}`,
		`{"client_msg_id":"c9","to":"bob","payloads":[{"user":"bob","device":1,"payload":"not base64!"}]}`,
		`{"client_msg_id":"c1","to":"bob","sender":"bob","payloads":[]}`,
		`[[[[[[[[[[[[[[[[[[[[`,
		`{"to":1e999}`,
	}
}

var receiptSeeds = []string{
	`{"sender":"bob","messages":[{"server_id":"01KAR7Q1X6N2Z8M3VJ4T0E5W9C","client_msg_id":"c1"}]}`,
	`{"sender":"bob","messages":[{"server_id":"01KAR7Q1X6N2Z8M3VJ4T0E5W9C"},{"server_id":"x"}]}`,
	`{"sender":"alice","messages":[{"server_id":"x"}]}`,
	`{"sender":"nobody","messages":[{"server_id":"x"}]}`,
	`{"sender":"bob","messages":[]}`,
	`{"sender":"bob","messages":[{"server_id":""}]}`,
	`{"sender":"bob","messages":[{"server_id":"` + strings.Repeat("x", 65) + `"}]}`,
	`{"sender":"BOB","messages":[{"server_id":"x"}]}`,
	`{"sender":"bob","messages":[{"server_id":"\ud800"}]}`,
	`{"sender":"bob","messages":null}`,
}

// FuzzPostAccounts fuzzes registration bodies.
func FuzzPostAccounts(f *testing.F) { fuzzAPI(f, "/v1/accounts", accountSeeds) }

// FuzzPostMessages fuzzes send bodies, as alice.1.
func FuzzPostMessages(f *testing.F) { fuzzAPI(f, "/v1/messages", messageSeeds()) }

// FuzzPostReceipts fuzzes read-report bodies, as alice.1.
func FuzzPostReceipts(f *testing.F) { fuzzAPI(f, "/v1/receipts", receiptSeeds) }
