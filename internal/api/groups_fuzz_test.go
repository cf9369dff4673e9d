package api_test

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/accounts/sqlite"
	"github.com/courier-im/courier/internal/api"
	"github.com/courier-im/courier/internal/auth"
	"github.com/courier-im/courier/internal/delivery"
	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox/pebble"
	"github.com/courier-im/courier/internal/metrics"
)

// The group endpoints' codes (the error table of docs/protocol.md).
func init() {
	for code, status := range map[string]int{
		"unknown_group":    404,
		"not_member":       404,
		"forbidden":        403,
		"too_many_members": 409,
		"last_admin":       409,
		"stale_group":      409,
	} {
		statusOf[code] = status
	}
	ep := endpoints["/v1/messages"]
	ep.codes = append(ep.codes, "stale_group")
	endpoints["/v1/messages"] = ep
	endpoints["/v1/groups"] = struct {
		success int
		codes   []string
	}{201, []string{"invalid", "invalid_name", "unknown_user", "too_many_members", "payload_too_large"}}
	endpoints[groupMembersPath] = struct {
		success int
		codes   []string
	}{200, []string{"invalid", "invalid_name", "unknown_user", "too_many_members", "payload_too_large", "unknown_group", "forbidden"}}
}

// groupMembersPath names POST /v1/groups/{id}/members in endpoints.
const groupMembersPath = "/v1/groups/{id}/members"

// groupFixture is the API on a SQLite account store (which keeps groups)
// and an in-memory mailbox, with users alice (devices 1 and 2), bob and
// carol, and a group of alice's with bob; requests are made as alice.1.
type groupFixture struct {
	h     http.Handler
	st    *sqlite.Store
	mb    *pebble.Store
	basic string
	group string
	runs  int
}

func (fx *groupFixture) close() {
	fx.mb.Close()
	fx.st.Close()
}

func newGroupFixture(tb testing.TB, dir string) *groupFixture {
	tb.Helper()
	ctx := context.Background()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		tb.Fatal(err)
	}
	st, err := sqlite.Open(filepath.Join(dir, "accounts.db"), sqlite.Options{MaxGroupMembers: 8})
	if err != nil {
		tb.Fatal(err)
	}
	cred, hash := accounts.NewCredential()
	for _, u := range []string{"alice", "bob", "carol"} {
		if _, _, err := st.CreateUser(ctx, u, "", hash); err != nil {
			tb.Fatal(err)
		}
	}
	if _, err := st.AddDevice(ctx, "alice", "", hash); err != nil {
		tb.Fatal(err)
	}
	ch, err := st.CreateGroup(ctx, "alice", []string{"bob"})
	if err != nil {
		tb.Fatal(err)
	}
	mb, err := pebble.Open("mailbox", pebble.Options{FS: vfs.NewMem()})
	if err != nil {
		tb.Fatal(err)
	}
	svc := delivery.New(delivery.Config{Mailbox: mb, Accounts: st, Groups: st, Notifier: noNotify{}, Metrics: metrics.New(prometheus.NewRegistry()),
		MaxPayload: 1024, MaxPayloads: 4})
	mux := http.NewServeMux()
	api.New(api.Config{Accounts: st, Groups: st, Delivery: svc, Auth: &auth.Authenticator{Accounts: st}}).Register(mux)
	r := httptest.NewRequest("GET", "/", nil)
	r.SetBasicAuth(ident.Device{User: "alice", ID: 1}.String(), cred)
	return &groupFixture{h: mux, st: st, mb: mb, basic: r.Header.Get("Authorization"), group: ch.Group.ID}
}

// fuzzGroups runs body through POST on the path that path(fx) gives, on a
// fixture renewed every thousand runs, and checks the answer against the
// endpoint table entry key.
func fuzzGroups(f *testing.F, key string, path func(*groupFixture) string, seeds []string) {
	for _, s := range seeds {
		f.Add([]byte(s))
	}
	dir := f.TempDir()
	var (
		fx  *groupFixture
		gen int
	)
	f.Cleanup(func() {
		if fx != nil {
			fx.close()
		}
	})
	f.Fuzz(func(t *testing.T, body []byte) {
		if fx == nil || fx.runs >= 1000 {
			if fx != nil {
				fx.close()
			}
			gen++
			fx = newGroupFixture(t, filepath.Join(dir, fmt.Sprint(gen)))
		}
		fx.runs++
		r := httptest.NewRequest("POST", path(fx), bytes.NewReader(body))
		r.Header.Set("Content-Type", "application/json")
		r.Header.Set("Authorization", fx.basic)
		w := httptest.NewRecorder()
		fx.h.ServeHTTP(w, r)
		checkAPIAnswer(t, key, body, w)
	})
}

var createGroupSeeds = []string{
	`{"members":["bob","carol"]}`,
	`{"members":[]}`,
	`{}`,
	`{"members":["bob","bob","alice"]}`,
	`{"members":["zed"]}`,
	`{"members":["Bob"]}`,
	`{"members":["a","b","c","d","e","f","g","h","i"]}`,
	`{"members":null}`,
	`{"members":[null]}`,
	`{"members":"bob"}`,
	`{"members":["bob"],"name":"secret"}`,
	`{"members":["` + strings.Repeat("b", 33) + `"]}`,
	`[`,
	``,
}

var addMembersSeeds = []string{
	`{"users":["carol"]}`,
	`{"users":["bob"]}`,
	`{"users":[]}`,
	`{"users":["zed"]}`,
	`{"users":["carol","carol"]}`,
	`{"users":["a","b","c","d","e","f","g","h"]}`,
	`{"users":["\u0000"]}`,
	`{"members":["carol"]}`,
	`{"users":null}`,
	`{}`,
}

// FuzzPostGroups fuzzes group creation bodies, as alice.1.
func FuzzPostGroups(f *testing.F) {
	fuzzGroups(f, "/v1/groups", func(*groupFixture) string { return "/v1/groups" }, createGroupSeeds)
}

// FuzzPostGroupMembers fuzzes the bodies that add members, as alice.1 (the
// group's admin).
func FuzzPostGroupMembers(f *testing.F) {
	fuzzGroups(f, groupMembersPath, func(fx *groupFixture) string { return "/v1/groups/" + fx.group + "/members" }, addMembersSeeds)
}
