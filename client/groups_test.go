package client_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync"
	"testing"

	"github.com/coder/websocket"

	"github.com/courier-im/courier/client"
	courierv1 "github.com/courier-im/courier/proto/courier/v1"
)

// fakeGroupCipher is a GroupCipher that seals nothing: it records the
// rotations the client asks for.
type fakeGroupCipher struct {
	mu      sync.Mutex
	rotated []string
}

func (f *fakeGroupCipher) Seal(_ context.Context, m client.OutboxMessage, to []client.Device) ([][]byte, error) {
	out := make([][]byte, len(to))
	for i := range out {
		out[i] = m.Body
	}
	return out, nil
}

func (f *fakeGroupCipher) Open(_ context.Context, in client.Inbound) (client.Opened, error) {
	return client.Opened{Body: in.Payload}, nil
}

func (f *fakeGroupCipher) SealGroup(_ context.Context, m client.OutboxMessage, _ client.GroupTarget, _ client.ShareFunc) ([]byte, error) {
	return m.Body, nil
}

func (f *fakeGroupCipher) RotateGroupKey(_ context.Context, group string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.rotated = append(f.rotated, group)
	return nil
}

func (f *fakeGroupCipher) rotations() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.rotated)
}

func TestGroupsNeedAGroupCipher(t *testing.T) {
	c, err := client.New(client.Config{Credentials: fakeCreds("http://127.0.0.1:1")})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	if _, err := c.CreateGroup(ctx, "friends", "bob"); !errors.Is(err, client.ErrNoGroupCipher) {
		t.Errorf("create without a group cipher: %v", err)
	}
	if _, err := c.SendGroup(ctx, "g1", []byte("hi")); !errors.Is(err, client.ErrNoGroupCipher) {
		t.Errorf("send without a group cipher: %v", err)
	}
}

func TestGroupArgumentsChecked(t *testing.T) {
	c, err := client.New(client.Config{Credentials: fakeCreds("http://127.0.0.1:1"), Cipher: &fakeGroupCipher{}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	for _, name := range []string{"", "  ", "two\nlines", string(make([]byte, 300))} {
		if _, err := c.CreateGroup(ctx, name, "bob"); err == nil {
			t.Errorf("create %q: no error", name)
		}
	}
	if _, err := c.CreateGroup(ctx, "friends", "Bob!"); err == nil {
		t.Error("a bad member name was taken")
	}
	for _, id := range []string{"", "a/b", "#x", string(make([]byte, 65))} {
		if _, err := c.SendGroupAsync(id, []byte("hi")); err == nil {
			t.Errorf("send to group %q: no error", id)
		}
	}
	if _, err := c.AddMembers(ctx, "g1"); err == nil {
		t.Error("add no one: no error")
	}
	// A group this device left is refused before anything is queued.
	left := client.Group{ID: "g9", Version: 3, Left: true}
	cfg := client.Config{Credentials: fakeCreds("http://127.0.0.1:1"), Cipher: &fakeGroupCipher{}, Groups: &groupStore{}}
	cfg.Groups.SaveGroup(left)
	c2, err := client.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if _, err := c2.SendGroupAsync("g9", []byte("hi")); !errors.Is(err, client.ErrNotMember) {
		t.Errorf("send to a group left: %v", err)
	}
}

// groupStore is a GroupStore for tests.
type groupStore struct {
	mu sync.Mutex
	m  map[string]client.Group
}

func (s *groupStore) SaveGroup(g client.Group) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.m == nil {
		s.m = map[string]client.Group{}
	}
	s.m[g.ID] = g
	return nil
}

func (s *groupStore) LoadGroup(id string) (client.Group, bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	g, ok := s.m[id]
	return g, ok, nil
}

func (s *groupStore) ListGroups() ([]client.Group, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []client.Group
	for _, g := range s.m {
		out = append(out, g)
	}
	return out, nil
}

func groupUpdate(serverID string, seq, version uint64, by string, members []string, added, removed []string) *courierv1.ServerFrame {
	u := &courierv1.GroupUpdate{Group: "g1", Version: version, Added: added, Removed: removed}
	for _, m := range members {
		u.Members = append(u.Members, &courierv1.GroupMember{User: m, Admin: m == "bob"})
	}
	return deliver(seq, &courierv1.Envelope{Kind: courierv1.EnvelopeKind_ENVELOPE_KIND_GROUP_UPDATE, ServerId: serverID,
		Sender: by, SenderDevice: 1, ServerTimeMs: 1000, GroupUpdate: u})
}

// Group updates are stored in order (a late, older one changes nothing),
// reported, and a removal replaces this device's sender key; a removal of
// this user marks the group left.
func TestGroupUpdates(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("/v1/ws", func(w http.ResponseWriter, r *http.Request) {
		ws, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer ws.CloseNow()
		writeFrame(t, ws, hello())
		writeFrame(t, ws, groupUpdate("U1", 1, 1, "bob", []string{"alice", "bob", "carol"}, []string{"alice", "bob", "carol"}, nil))
		writeFrame(t, ws, groupUpdate("U2", 2, 2, "bob", []string{"alice", "bob"}, nil, []string{"carol"}))
		writeFrame(t, ws, groupUpdate("U3", 3, 1, "bob", []string{"alice", "bob", "carol"}, nil, nil)) // late
		writeFrame(t, ws, groupUpdate("U4", 4, 3, "bob", []string{"bob"}, nil, []string{"alice"}))
		writeFrame(t, ws, &courierv1.ServerFrame{Body: &courierv1.ServerFrame_Synced{Synced: &courierv1.Synced{Pending: 4}}})
		for {
			f, err := readFrame(ws)
			if err != nil {
				return
			}
			if f.GetAck() != nil {
				writeFrame(t, ws, &courierv1.ServerFrame{Id: f.Id, Body: &courierv1.ServerFrame_Ok{Ok: &courierv1.Ok{}}})
			}
		}
	})
	srv := httptest.NewServer(mux)
	defer srv.Close()
	cipher := &fakeGroupCipher{}
	store := &groupStore{}
	rec := newRecorder()
	c, err := client.New(client.Config{Credentials: fakeCreds(srv.URL), Handler: rec.handle, Cipher: cipher, Groups: store})
	if err != nil {
		t.Fatal(err)
	}
	runClient(t, c)
	waitEvent[*client.SyncedEvent](t, rec, "synced", nil)

	var evs []*client.GroupEvent
	for _, ev := range rec.snapshot() {
		if g, ok := ev.(*client.GroupEvent); ok {
			evs = append(evs, g)
		}
	}
	if len(evs) != 3 {
		t.Fatalf("%d group events, want 3: %s", len(evs), describe(rec.snapshot()))
	}
	if evs[0].Group.Version != 1 || len(evs[0].Added) != 3 || evs[0].By != "bob" {
		t.Errorf("creation: %+v", evs[0])
	}
	if evs[1].Group.Version != 2 || !slices.Equal(evs[1].Removed, []string{"carol"}) || evs[1].Group.Member("carol") {
		t.Errorf("carol's removal: %+v", evs[1])
	}
	if !evs[2].Group.Left || !slices.Equal(evs[2].Removed, []string{"alice"}) {
		t.Errorf("alice's removal: %+v", evs[2])
	}
	// One rotation: for carol's removal (none once alice is out).
	if got := cipher.rotations(); !slices.Equal(got, []string{"g1"}) {
		t.Errorf("rotations: %v", got)
	}
	g, ok, _ := c.Group("g1")
	if !ok || g.Version != 3 || !g.Left || !g.Admin("bob") {
		t.Errorf("stored: %+v", g)
	}
	if _, err := c.SendGroupAsync("g1", []byte("hi")); !errors.Is(err, client.ErrNotMember) {
		t.Errorf("send after removal: %v", err)
	}
}

// Flush returns once what was queued before it has left the outbox.
func TestFlush(t *testing.T) {
	var mu sync.Mutex
	var got []string
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/users/bob/devices", func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte(`{"devices":[{"id":1}]}`))
	})
	mux.HandleFunc("GET /v1/users/alice/devices", func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte(`{"devices":[{"id":1}]}`))
	})
	mux.HandleFunc("POST /v1/messages", func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		got = append(got, r.URL.Path)
		mu.Unlock()
		w.WriteHeader(http.StatusAccepted)
		w.Write([]byte(`{"server_id":"S","server_time":"2025-01-01T00:00:00Z"}`))
	})
	srv := httptest.NewServer(mux)
	defer srv.Close()
	c, err := client.New(client.Config{Credentials: fakeCreds(srv.URL)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for range 3 {
		if _, err := c.SendAsync("bob", []byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	n := len(got)
	mu.Unlock()
	if n != 3 {
		t.Fatalf("%d messages sent before Flush returned", n)
	}
}
