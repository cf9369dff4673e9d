package server_test

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/courier-im/courier/internal/accounts/postgres"
	"github.com/courier-im/courier/internal/server"
	"github.com/courier-im/courier/internal/servertest"
	"github.com/courier-im/courier/internal/testenv"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

type groupJSON struct {
	ID      string `json:"id"`
	Version uint64 `json:"version"`
	Members []struct {
		User  string `json:"user"`
		Admin bool   `json:"admin"`
	} `json:"members"`
}

// memberList renders members as "*alice bob" (admins starred).
func (g groupJSON) memberList() string {
	var s []string
	for _, m := range g.Members {
		if m.Admin {
			s = append(s, "*"+m.User)
		} else {
			s = append(s, m.User)
		}
	}
	return strings.Join(s, " ")
}

type groupErrorJSON struct {
	Error struct {
		Code         string `json:"code"`
		Message      string `json:"message"`
		GroupVersion uint64 `json:"group_version"`
	} `json:"error"`
}

// groupSend sends a group message over the WebSocket and returns the reply.
func (c *wsClient) groupSend(clientID, group string, version uint64, payload string) *pb.ServerFrame {
	c.t.Helper()
	return c.request(&pb.ClientFrame{Body: &pb.ClientFrame_Send{Send: &pb.Send{
		ClientMsgId: clientID, Group: group, GroupVersion: version, Payload: []byte(payload)}}})
}

func isKind(k pb.EnvelopeKind) func(*pb.ServerFrame) bool {
	return func(f *pb.ServerFrame) bool { return f.GetDeliver().GetEnvelope().GetKind() == k }
}

var (
	isGroupUpdate = isKind(pb.EnvelopeKind_ENVELOPE_KIND_GROUP_UPDATE)
	isMessage     = isKind(pb.EnvelopeKind_ENVELOPE_KIND_MESSAGE)
)

// groupUpdate waits for a GROUP_UPDATE, acks it and returns it.
func (c *wsClient) groupUpdate() *pb.Envelope {
	c.t.Helper()
	d := c.until(isGroupUpdate).GetDeliver()
	c.ack(d.Seq)
	return d.Envelope
}

func checkUpdate(t *testing.T, who string, env *pb.Envelope, group, sender string, version uint64, members string, added, removed []string) {
	t.Helper()
	up := env.GetGroupUpdate()
	var ms []string
	for _, m := range up.GetMembers() {
		if m.Admin {
			ms = append(ms, "*"+m.User)
		} else {
			ms = append(ms, m.User)
		}
	}
	if env.Group != group || env.Sender != sender || len(env.Payload) != 0 || up.GetGroup() != group || up.GetVersion() != version ||
		strings.Join(ms, " ") != members || !slices.Equal(up.GetAdded(), added) || !slices.Equal(up.GetRemoved(), removed) {
		t.Errorf("%s: GROUP_UPDATE %v; want group %s v%d by %s, members %q, added %v, removed %v",
			who, env, group, version, sender, members, added, removed)
	}
}

// TestGroupMessaging is a group's life over the API and the WebSocket:
// creation, a message copied to every device but the sender's, receipts,
// stale versions, outsiders, and a removal.
func TestGroupMessaging(t *testing.T) {
	t.Parallel()
	groupMessaging(t, servertest.Start(t))
}

// TestGroupMessagingOnPostgres is TestGroupMessaging on the clustered
// account store (a fresh schema, dropped at the end).
func TestGroupMessagingOnPostgres(t *testing.T) {
	t.Parallel()
	pgURL := testenv.PostgresURL(t)
	var rnd [8]byte
	rand.Read(rnd[:])
	schema := "courier_test_groups_" + hex.EncodeToString(rnd[:])
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
	groupMessaging(t, servertest.Start(t, func(c *server.Config) { c.Accounts = st }))
}

func groupMessaging(t *testing.T, s *servertest.Server) {
	alice, bob, carol, dave := register(t, s.URL, "alice"), register(t, s.URL, "bob"), register(t, s.URL, "carol"), register(t, s.URL, "dave")
	carol2 := linkDevice(t, s.URL, carol, "tablet")
	ac, bc, cc1, cc2, dc := dial(t, s.URL, alice), dial(t, s.URL, bob), dial(t, s.URL, carol), dial(t, s.URL, carol2), dial(t, s.URL, dave)
	all := []*wsClient{ac, bc, cc1, cc2, dc}
	for _, c := range all {
		c.until(isSynced)
	}

	var g groupJSON
	if st := doJSON(t, s.URL, "POST", "/v1/groups", alice, map[string]any{"members": []string{"bob", "carol", "bob"}}, &g); st != http.StatusCreated {
		t.Fatalf("POST /v1/groups: %d", st)
	}
	if g.ID == "" || g.Version != 1 || g.memberList() != "*alice bob carol" {
		t.Fatalf("created group %+v", g)
	}
	for _, c := range []*wsClient{ac, bc, cc1, cc2} {
		checkUpdate(t, c.a.User, c.groupUpdate(), g.ID, "alice", 1, "*alice bob carol", []string{"alice", "bob", "carol"}, nil)
	}

	// One payload, copied to every device of every member but alice.1.
	r := ac.groupSend("g1", g.ID, 1, "sealed with alice's sender key")
	acc := r.GetAccepted()
	if acc == nil || acc.Duplicate {
		t.Fatalf("group send: %v", r)
	}
	var bobSeq uint64
	for _, c := range []*wsClient{bc, cc1, cc2} {
		d := c.until(isDeliver).GetDeliver()
		env := d.Envelope
		if env.Kind != pb.EnvelopeKind_ENVELOPE_KIND_MESSAGE || env.Group != g.ID || env.To != "" || env.Sender != "alice" ||
			env.SenderDevice != 1 || env.ServerId != acc.ServerId || env.ClientMsgId != "g1" || string(env.Payload) != "sealed with alice's sender key" {
			t.Fatalf("%s.%d got %v", c.a.User, c.a.Device, env)
		}
		if c == bc {
			bobSeq = d.Seq
		} else {
			c.ack(d.Seq)
		}
	}
	// A retry stores nothing twice.
	if r := ac.groupSend("g1", g.ID, 1, "sealed with alice's sender key"); r.GetAccepted() == nil || !r.GetAccepted().Duplicate || r.GetAccepted().ServerId != acc.ServerId {
		t.Fatalf("retried group send: %v", r)
	}
	for _, c := range all {
		c.quiet(isMessage)
	}

	// bob's delivery and read receipts reach alice.
	bc.ack(bobSeq)
	var delivered bool
	for range 3 { // carol's two devices acked too
		rcpt, seq := ac.receipt(pb.ReceiptType_RECEIPT_TYPE_DELIVERED)
		ac.ack(seq)
		if rcpt.Sender == "bob" && rcpt.Receipt.Messages[0].ServerId == acc.ServerId {
			delivered = true
			break
		}
	}
	if !delivered {
		t.Fatal("no DELIVERED receipt from bob")
	}
	if rr := bc.request(&pb.ClientFrame{Body: &pb.ClientFrame_Read{Read: &pb.Read{Sender: "alice",
		Messages: []*pb.MessageRef{{ServerId: acc.ServerId, ClientMsgId: "g1"}}}}}); rr.GetOk() == nil {
		t.Fatalf("read: %v", rr)
	}
	rcpt, seq := ac.receipt(pb.ReceiptType_RECEIPT_TYPE_READ)
	if rcpt.Sender != "bob" || rcpt.Group != "" || rcpt.Receipt.Messages[0].ServerId != acc.ServerId {
		t.Fatalf("read receipt: %v", rcpt)
	}
	ac.ack(seq)

	// A stale version is refused with the current one, storing nothing.
	r = bc.groupSend("b1", g.ID, 7, "old key")
	if ref := r.GetRefused(); ref == nil || ref.Code != pb.RefusalCode_REFUSAL_CODE_STALE_GROUP || ref.GroupVersion != 1 {
		t.Fatalf("stale group send: %v", r)
	}
	// An outsider can neither send nor read.
	r = dc.groupSend("d1", g.ID, 1, "hi")
	if ref := r.GetRefused(); ref == nil || ref.Code != pb.RefusalCode_REFUSAL_CODE_UNKNOWN_RECIPIENT {
		t.Fatalf("outsider's group send: %v", r)
	}
	var e groupErrorJSON
	if st := doJSON(t, s.URL, "GET", "/v1/groups/"+g.ID, dave, nil, &e); st != http.StatusNotFound || e.Error.Code != "unknown_group" {
		t.Fatalf("outsider's GET: %d %+v", st, e)
	}
	var list struct {
		Groups []struct {
			ID      string `json:"id"`
			Version uint64 `json:"version"`
		} `json:"groups"`
	}
	if st := doJSON(t, s.URL, "GET", "/v1/groups", dave, nil, &list); st != http.StatusOK || list.Groups == nil || len(list.Groups) != 0 {
		t.Fatalf("outsider's GET /v1/groups: %d %+v", st, list)
	}
	if st := doJSON(t, s.URL, "GET", "/v1/groups", carol2, nil, &list); st != http.StatusOK || len(list.Groups) != 1 ||
		list.Groups[0].ID != g.ID || list.Groups[0].Version != 1 {
		t.Fatalf("carol's GET /v1/groups: %d %+v", st, list)
	}
	for _, c := range all {
		c.quiet(isMessage)
	}

	// carol is removed: everyone, carol included, learns it.
	var g2 groupJSON
	if st := doJSON(t, s.URL, "DELETE", "/v1/groups/"+g.ID+"/members/carol", alice, nil, &g2); st != http.StatusOK ||
		g2.Version != 2 || g2.memberList() != "*alice bob" {
		t.Fatalf("remove carol: %d %+v", st, g2)
	}
	for _, c := range []*wsClient{ac, bc, cc1, cc2} {
		checkUpdate(t, c.a.User, c.groupUpdate(), g.ID, "alice", 2, "*alice bob", nil, []string{"carol"})
	}
	dc.quiet(isGroupUpdate)

	// The old version is stale now; with the new one, carol gets nothing.
	if r := ac.groupSend("g2", g.ID, 1, "x"); r.GetRefused().GetCode() != pb.RefusalCode_REFUSAL_CODE_STALE_GROUP || r.GetRefused().GroupVersion != 2 {
		t.Fatalf("send at the old version: %v", r)
	}
	if r := ac.groupSend("g2", g.ID, 2, "after carol"); r.GetAccepted() == nil {
		t.Fatalf("send at the new version: %v", r)
	}
	if env := bc.until(isMessage).GetDeliver().Envelope; string(env.Payload) != "after carol" || env.Group != g.ID {
		t.Fatalf("bob got %v", env)
	}
	cc1.quiet(isMessage)
	cc2.quiet(isMessage)
	if r := cc1.groupSend("c1", g.ID, 2, "still here?"); r.GetRefused().GetCode() != pb.RefusalCode_REFUSAL_CODE_UNKNOWN_RECIPIENT {
		t.Fatalf("removed member's send: %v", r)
	}
	if st := doJSON(t, s.URL, "GET", "/v1/groups/"+g.ID, carol, nil, &e); st != http.StatusNotFound {
		t.Fatalf("removed member's GET: %d", st)
	}

	// Over HTTP: bob sends to the group; a stale version is a 409 with
	// the current version.
	body := map[string]any{"client_msg_id": "h1", "group": g.ID, "group_version": 2, "payload": base64.StdEncoding.EncodeToString([]byte("over http"))}
	if st := doJSON(t, s.URL, "POST", "/v1/messages", bob, body, nil); st != http.StatusAccepted {
		t.Fatalf("HTTP group send: %d", st)
	}
	if env := ac.until(isMessage).GetDeliver().Envelope; string(env.Payload) != "over http" || env.Sender != "bob" || env.Group != g.ID {
		t.Fatalf("alice got %v", env)
	}
	body["client_msg_id"], body["group_version"] = "h2", 1
	if st := doJSON(t, s.URL, "POST", "/v1/messages", bob, body, &e); st != http.StatusConflict || e.Error.Code != "stale_group" || e.Error.GroupVersion != 2 {
		t.Fatalf("stale HTTP group send: %d %+v", st, e)
	}
	cc1.quiet(isMessage)
}

// TestGroupAPIErrors checks the group endpoints' answers to bad input and
// to callers without the right.
func TestGroupAPIErrors(t *testing.T) {
	t.Parallel()
	s := servertest.Start(t, func(c *server.Config) { c.MaxGroupMembers = 3 })
	alice, bob, carol := register(t, s.URL, "alice"), register(t, s.URL, "bob"), register(t, s.URL, "carol")
	register(t, s.URL, "dave")

	raw := func(method, path string, a account, body string) (int, string) {
		t.Helper()
		req, err := http.NewRequest(method, s.URL+path, strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/json")
		if a.Cred != "" {
			req.Header.Set("Authorization", a.basic())
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var e groupErrorJSON
		jsonDecode(resp.Body, &e)
		return resp.StatusCode, e.Error.Code
	}
	var g groupJSON
	if st := doJSON(t, s.URL, "POST", "/v1/groups", alice, map[string]any{"members": []string{"bob"}}, &g); st != http.StatusCreated {
		t.Fatalf("POST /v1/groups: %d", st)
	}
	gp := "/v1/groups/" + g.ID
	for _, tc := range []struct {
		method, path string
		as           account
		body         string
		status       int
		code         string
	}{
		{"POST", "/v1/groups", account{}, `{"members":["bob"]}`, 401, "unauthorized"},
		{"POST", "/v1/groups", alice, `{"members":["bob"`, 400, "invalid"},
		{"POST", "/v1/groups", alice, `{"members":"bob"}`, 400, "invalid"},
		{"POST", "/v1/groups", alice, `{"members":["bob"],"name":"secret"}`, 400, "invalid"},
		{"POST", "/v1/groups", alice, `{"members":["Bob Smith"]}`, 400, "invalid_name"},
		{"POST", "/v1/groups", alice, `{"members":["bob","zed"]}`, 404, "unknown_user"},
		{"POST", "/v1/groups", alice, `{"members":["bob","carol","dave"]}`, 409, "too_many_members"},
		{"GET", "/v1/groups/nope", alice, ``, 404, "unknown_group"},
		{"GET", "/v1/groups/AAAAAAAAAAAAAAAAAAAAAA", alice, ``, 404, "unknown_group"},
		{"GET", gp, carol, ``, 404, "unknown_group"},
		{"POST", gp + "/members", bob, `{"users":["carol"]}`, 403, "forbidden"},
		{"POST", gp + "/members", carol, `{"users":["carol"]}`, 404, "unknown_group"},
		{"POST", gp + "/members", alice, `{"users":[]}`, 400, "invalid"},
		{"POST", gp + "/members", alice, `{"users":["x y"]}`, 400, "invalid_name"},
		{"POST", gp + "/members", alice, `{"users":["zed"]}`, 404, "unknown_user"},
		{"POST", gp + "/members", alice, `{"users":["carol","dave"]}`, 409, "too_many_members"},
		{"DELETE", gp + "/members/alice", bob, ``, 403, "forbidden"},
		{"DELETE", gp + "/members/carol", alice, ``, 404, "not_member"},
		{"DELETE", gp + "/members/bob", carol, ``, 404, "unknown_group"},
		{"PUT", gp + "/admins/bob", bob, ``, 403, "forbidden"},
		{"PUT", gp + "/admins/carol", alice, ``, 404, "not_member"},
		{"DELETE", gp + "/admins/alice", alice, ``, 409, "last_admin"},
	} {
		if st, code := raw(tc.method, tc.path, tc.as, tc.body); st != tc.status || code != tc.code {
			t.Errorf("%s %s as %q %s: %d %q, want %d %q", tc.method, tc.path, tc.as.User, tc.body, st, code, tc.status, tc.code)
		}
	}

	// What may be done: add (idempotently), make admin, hand over, leave.
	var got groupJSON
	if st := doJSON(t, s.URL, "POST", gp+"/members", alice, map[string]any{"users": []string{"carol", "bob"}}, &got); st != 200 || got.Version != 2 || got.memberList() != "*alice bob carol" {
		t.Fatalf("add carol: %d %+v", st, got)
	}
	if st := doJSON(t, s.URL, "POST", gp+"/members", alice, map[string]any{"users": []string{"carol"}}, &got); st != 200 || got.Version != 2 {
		t.Fatalf("add carol again: %d %+v", st, got)
	}
	if st := doJSON(t, s.URL, "PUT", gp+"/admins/bob", alice, nil, &got); st != 200 || got.Version != 3 || got.memberList() != "*alice *bob carol" {
		t.Fatalf("make bob admin: %d %+v", st, got)
	}
	if st := doJSON(t, s.URL, "DELETE", gp+"/admins/alice", bob, nil, &got); st != 200 || got.Version != 4 || got.memberList() != "alice *bob carol" {
		t.Fatalf("bob demotes alice: %d %+v", st, got)
	}
	if st := doJSON(t, s.URL, "DELETE", gp+"/members/bob", bob, nil, &got); st != 200 || got.Version != 5 || got.memberList() != "*alice carol" {
		t.Fatalf("bob leaves: %d %+v", st, got)
	}
	if st := doJSON(t, s.URL, "GET", gp, carol, nil, &got); st != 200 || got.Version != 5 || got.memberList() != "*alice carol" {
		t.Fatalf("carol's GET: %d %+v", st, got)
	}
	// Group sends' own refusals over HTTP.
	for _, tc := range []struct {
		body   map[string]any
		status int
		code   string
	}{
		{map[string]any{"client_msg_id": "x1", "group": g.ID, "group_version": 5, "to": "carol", "payload": "eA=="}, 400, "invalid"},
		{map[string]any{"client_msg_id": "x2", "group": "bad id", "group_version": 5, "payload": "eA=="}, 400, "invalid"},
		{map[string]any{"client_msg_id": "x3", "group": g.ID, "group_version": 5, "payload": "eA=="}, 404, "unknown_recipient"},
		{map[string]any{"client_msg_id": "x4", "to": "alice", "group_version": 5, "payloads": []any{}}, 400, "invalid"},
	} {
		var e groupErrorJSON
		if st := doJSON(t, s.URL, "POST", "/v1/messages", bob, tc.body, &e); st != tc.status || e.Error.Code != tc.code {
			t.Errorf("POST /v1/messages %v as bob: %d %+v, want %d %s", tc.body, st, e, tc.status, tc.code)
		}
	}
	// The last member leaving deletes the group.
	doJSON(t, s.URL, "DELETE", gp+"/members/carol", alice, nil, nil)
	if st := doJSON(t, s.URL, "DELETE", gp+"/members/alice", alice, nil, &got); st != 200 || len(got.Members) != 0 || got.Version != 7 {
		t.Fatalf("the last member leaves: %d %+v", st, got)
	}
	if st, code := raw("GET", gp, alice, ""); st != 404 || code != "unknown_group" {
		t.Fatalf("GET of a deleted group: %d %s", st, code)
	}
}
