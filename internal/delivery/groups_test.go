package delivery

import (
	"bytes"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/accounts/sqlite"
	"github.com/courier-im/courier/internal/auth/authtest"
	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox"
	"github.com/courier-im/courier/internal/mailbox/pebble"
	"github.com/courier-im/courier/internal/metrics"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

type countNotifier struct{ n map[ident.Device]int }

func (c *countNotifier) Notify(d ident.Device) { c.n[d]++ }

// groupFixture is a Service whose groups are in a SQLite store and whose
// device lists are in memory (so that a member can have hundreds of
// devices cheaply): alice has devices 1 and 2, bob bobDevices, carol 1.
type groupFixture struct {
	svc    *Service
	mb     *pebble.Store
	groups *sqlite.Store
	notify *countNotifier
	group  accounts.Group
}

const bobDevices = 600 // with alice.2: more than one GroupChunk

func newGroupFixture(t *testing.T) *groupFixture {
	t.Helper()
	devs := authtest.New()
	reg := func(user string, n int) {
		for range n {
			if _, _, err := devs.Register(user); err != nil {
				t.Fatal(err)
			}
		}
	}
	reg("alice", 2)
	reg("bob", bobDevices)
	reg("carol", 1)
	gs, err := sqlite.Open(filepath.Join(t.TempDir(), "accounts.db"), sqlite.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { gs.Close() })
	for _, u := range []string{"alice", "bob", "carol"} {
		if _, _, err := gs.CreateUser(t.Context(), u, "", []byte{1}); err != nil {
			t.Fatal(err)
		}
	}
	ch, err := gs.CreateGroup(t.Context(), "alice", []string{"bob"})
	if err != nil {
		t.Fatal(err)
	}
	mb, err := pebble.Open("mailbox", pebble.Options{FS: vfs.NewMem()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mb.Close() })
	n := &countNotifier{n: map[ident.Device]int{}}
	svc := New(Config{Mailbox: mb, Accounts: devs, Groups: gs, Notifier: n, Metrics: metrics.New(prometheus.NewRegistry()),
		MaxPayload: 1024, Now: func() time.Time { return time.UnixMilli(1_700_000_000_000) }})
	return &groupFixture{svc: svc, mb: mb, groups: gs, notify: n, group: ch.Group}
}

// targets are the devices a group message from alice.1 goes to.
func (fx *groupFixture) targets() []ident.Device {
	out := []ident.Device{{User: "alice", ID: 2}}
	for i := range bobDevices {
		out = append(out, ident.Device{User: "bob", ID: uint32(i + 1)})
	}
	return out
}

// entries returns what dev's mailbox holds, decoded.
func (fx *groupFixture) entries(t *testing.T, dev ident.Device) []*pb.Envelope {
	t.Helper()
	es, err := fx.mb.Read(t.Context(), dev, 0, 100)
	if err != nil {
		t.Fatal(err)
	}
	var out []*pb.Envelope
	for _, e := range es {
		env := new(pb.Envelope)
		if err := proto.Unmarshal(e.Data, env); err != nil {
			t.Fatal(err)
		}
		out = append(out, env)
	}
	return out
}

var alice1 = ident.Device{User: "alice", ID: 1}

func TestGroupSendToManyDevices(t *testing.T) {
	fx := newGroupFixture(t)
	req := SendRequest{From: alice1, ClientMsgID: "c1", Group: fx.group.ID, GroupVersion: 1, Payload: []byte("sealed")}
	acc, err := fx.svc.Send(t.Context(), req)
	if err != nil || acc.Duplicate {
		t.Fatalf("Send: %+v, %v", acc, err)
	}
	check := func() {
		t.Helper()
		for _, d := range fx.targets() {
			es := fx.entries(t, d)
			if len(es) != 1 {
				t.Fatalf("%s holds %d entries, want 1", d, len(es))
			}
			e := es[0]
			if e.Kind != pb.EnvelopeKind_ENVELOPE_KIND_MESSAGE || e.ServerId != acc.ServerID || e.Group != fx.group.ID || e.To != "" ||
				e.Sender != "alice" || e.SenderDevice != 1 || e.ClientMsgId != "c1" || !bytes.Equal(e.Payload, []byte("sealed")) {
				t.Fatalf("%s holds %v", d, e)
			}
		}
		if es := fx.entries(t, alice1); len(es) != 0 {
			t.Fatalf("the sending device holds %v", es)
		}
	}
	check()
	if fx.notify.n[ident.Device{User: "bob", ID: bobDevices}] != 1 || fx.notify.n[alice1] != 0 {
		t.Errorf("notifications: bob.%d %d, alice.1 %d", bobDevices, fx.notify.n[ident.Device{User: "bob", ID: bobDevices}], fx.notify.n[alice1])
	}
	// A retry stores nothing twice.
	again, err := fx.svc.Send(t.Context(), req)
	if err != nil || !again.Duplicate || again.ServerID != acc.ServerID || !again.Time.Equal(acc.Time) {
		t.Fatalf("retry: %+v, %v; want a duplicate of %+v", again, err, acc)
	}
	check()
}

// A first attempt orders every chunk at once (none waits for the first to
// be durable): every device gets the message once, is told once, and a
// retry is a duplicate.
func TestGroupSendFirstAttemptChunks(t *testing.T) {
	fx := newGroupFixture(t)
	req := SendRequest{From: alice1, ClientMsgID: "c1", Group: fx.group.ID, GroupVersion: 1, Payload: []byte("sealed"), FirstAttempt: true}
	if n := len(fx.targets()); n <= GroupChunk {
		t.Fatalf("%d targets: the test needs more than one chunk of %d", n, GroupChunk)
	}
	p, err := fx.svc.StartSend(t.Context(), req)
	if err != nil {
		t.Fatal(err)
	}
	if len(p.pending) != len(p.parts) || len(p.parts) < 2 {
		t.Fatalf("%d parts, %d ordered: want every chunk ordered by StartSend", len(p.parts), len(p.pending))
	}
	if _, waited := p.pending[0].(done); waited {
		t.Fatal("StartSend waited for the first chunk to be durable")
	}
	if n := fx.notify.n[fx.targets()[0]]; n != 0 {
		t.Fatalf("a device of the first chunk was told %d times before Wait", n)
	}
	acc, err := p.Wait(t.Context())
	if err != nil || acc.Duplicate {
		t.Fatalf("Wait: %+v, %v", acc, err)
	}
	for _, d := range fx.targets() {
		es := fx.entries(t, d)
		if len(es) != 1 || es[0].ServerId != acc.ServerID {
			t.Fatalf("%s holds %v", d, es)
		}
		if fx.notify.n[d] != 1 {
			t.Fatalf("%s told %d times, want once", d, fx.notify.n[d])
		}
	}
	req.FirstAttempt = false
	again, err := fx.svc.Send(t.Context(), req)
	if err != nil || !again.Duplicate || again.ServerID != acc.ServerID {
		t.Fatalf("retry: %+v, %v; want a duplicate of %s", again, err, acc.ServerID)
	}
}

// An earlier attempt that stored only the first chunk is finished by a
// retry, under the first attempt's server id.
func TestGroupSendFinishesAPartialSend(t *testing.T) {
	fx := newGroupFixture(t)
	first := time.UnixMilli(1_600_000_000_000)
	env := &pb.Envelope{Kind: pb.EnvelopeKind_ENVELOPE_KIND_MESSAGE, ServerId: "01EARLIERATTEMPT0000000000", Sender: "alice", SenderDevice: 1,
		ServerTimeMs: first.UnixMilli(), ClientMsgId: "c1", Group: fx.group.ID, Payload: []byte("sealed")}
	items, err := sameItems(env, fx.targets()[:GroupChunk])
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fx.mb.Append(t.Context(), mailbox.Batch{Key: "send/alice.1/c1/0", Receipt: encodeAccepted(env.ServerId, first), Items: items}); err != nil {
		t.Fatal(err)
	}
	acc, err := fx.svc.Send(t.Context(), SendRequest{From: alice1, ClientMsgID: "c1", Group: fx.group.ID, GroupVersion: 1, Payload: []byte("sealed")})
	if err != nil || !acc.Duplicate || acc.ServerID != env.ServerId || !acc.Time.Equal(first) {
		t.Fatalf("retry: %+v, %v", acc, err)
	}
	for _, d := range fx.targets() {
		es := fx.entries(t, d)
		if len(es) != 1 || es[0].ServerId != env.ServerId || es[0].ServerTimeMs != first.UnixMilli() {
			t.Fatalf("%s holds %v, want one copy of %s", d, es, env.ServerId)
		}
	}
}

func TestGroupSendRefusals(t *testing.T) {
	fx := newGroupFixture(t)
	id := fx.group.ID
	carol := ident.Device{User: "carol", ID: 1}
	for _, tc := range []struct {
		name string
		req  SendRequest
		code pb.RefusalCode
	}{
		{"not a member", SendRequest{From: carol, ClientMsgID: "x", Group: id, GroupVersion: 1}, pb.RefusalCode_REFUSAL_CODE_UNKNOWN_RECIPIENT},
		{"no such group", SendRequest{From: alice1, ClientMsgID: "x", Group: accounts.NewGroupID(), GroupVersion: 1}, pb.RefusalCode_REFUSAL_CODE_UNKNOWN_RECIPIENT},
		{"malformed group id", SendRequest{From: alice1, ClientMsgID: "x", Group: "../x", GroupVersion: 1}, pb.RefusalCode_REFUSAL_CODE_INVALID},
		{"stale", SendRequest{From: alice1, ClientMsgID: "x", Group: id, GroupVersion: 2}, pb.RefusalCode_REFUSAL_CODE_STALE_GROUP},
		{"no version", SendRequest{From: alice1, ClientMsgID: "x", Group: id}, pb.RefusalCode_REFUSAL_CODE_STALE_GROUP},
		{"with to", SendRequest{From: alice1, ClientMsgID: "x", Group: id, GroupVersion: 1, To: "bob"}, pb.RefusalCode_REFUSAL_CODE_INVALID},
		{"with payloads", SendRequest{From: alice1, ClientMsgID: "x", Group: id, GroupVersion: 1,
			Payloads: []Payload{{Device: ident.Device{User: "bob", ID: 1}}}}, pb.RefusalCode_REFUSAL_CODE_INVALID},
		{"too large", SendRequest{From: alice1, ClientMsgID: "x", Group: id, GroupVersion: 1, Payload: make([]byte, 1025)}, pb.RefusalCode_REFUSAL_CODE_PAYLOAD_TOO_LARGE},
		{"no client id", SendRequest{From: alice1, Group: id, GroupVersion: 1}, pb.RefusalCode_REFUSAL_CODE_INVALID},
		{"1:1 with a payload", SendRequest{From: alice1, ClientMsgID: "x", To: "bob", Payload: []byte("x"),
			Payloads: []Payload{{Device: ident.Device{User: "bob", ID: 1}}}}, pb.RefusalCode_REFUSAL_CODE_INVALID},
		{"1:1 with a group version", SendRequest{From: alice1, ClientMsgID: "x", To: "bob", GroupVersion: 1,
			Payloads: []Payload{{Device: ident.Device{User: "bob", ID: 1}}}}, pb.RefusalCode_REFUSAL_CODE_INVALID},
	} {
		_, err := fx.svc.Send(t.Context(), tc.req)
		var r *Refusal
		if !errors.As(err, &r) || r.Code != tc.code {
			t.Errorf("%s: %v, want %s", tc.name, err, CodeName(tc.code))
			continue
		}
		if tc.code == pb.RefusalCode_REFUSAL_CODE_STALE_GROUP && r.GroupVersion != 1 {
			t.Errorf("%s: refusal names version %d, want 1", tc.name, r.GroupVersion)
		}
	}
	// A group of one with one device has nobody to send to.
	solo, err := fx.groups.CreateGroup(t.Context(), "carol", nil)
	if err != nil {
		t.Fatal(err)
	}
	_, err = fx.svc.Send(t.Context(), SendRequest{From: ident.Device{User: "carol", ID: 1}, ClientMsgID: "x", Group: solo.Group.ID, GroupVersion: 1})
	var r *Refusal
	if !errors.As(err, &r) || r.Code != pb.RefusalCode_REFUSAL_CODE_INVALID {
		t.Errorf("send to a group of one device: %v, want invalid", err)
	}
	// Nothing was stored by any of them.
	for _, d := range append(fx.targets(), alice1, carol) {
		if es := fx.entries(t, d); len(es) != 0 {
			t.Fatalf("%s holds %v after refusals", d, es)
		}
	}
	// Without a group store, group sends are invalid.
	svc := New(Config{Mailbox: fx.mb, Accounts: fx.groups, Notifier: fx.notify, Metrics: metrics.New(prometheus.NewRegistry())})
	_, err = svc.Send(t.Context(), SendRequest{From: alice1, ClientMsgID: "x", Group: fx.group.ID, GroupVersion: 1})
	if !errors.As(err, &r) || r.Code != pb.RefusalCode_REFUSAL_CODE_INVALID {
		t.Errorf("group send without a group store: %v, want invalid", err)
	}
}

func TestGroupChangedTellsMembersBeforeAndAfter(t *testing.T) {
	fx := newGroupFixture(t)
	ctx := t.Context()
	ch, err := fx.groups.AddMembers(ctx, fx.group.ID, "alice", []string{"carol"})
	if err != nil {
		t.Fatal(err)
	}
	ch, err = fx.groups.RemoveMember(ctx, fx.group.ID, "alice", "bob")
	if err != nil {
		t.Fatal(err)
	}
	for range 2 { // the second call stores nothing twice
		if err := fx.svc.GroupChanged(ctx, alice1, ch); err != nil {
			t.Fatalf("GroupChanged: %v", err)
		}
	}
	devs := append(fx.targets(), alice1, ident.Device{User: "carol", ID: 1})
	for _, d := range devs {
		es := fx.entries(t, d)
		if len(es) != 1 {
			t.Fatalf("%s holds %d entries, want 1", d, len(es))
		}
		e, up := es[0], es[0].GroupUpdate
		if e.Kind != pb.EnvelopeKind_ENVELOPE_KIND_GROUP_UPDATE || e.Sender != "alice" || e.SenderDevice != 1 || e.Group != fx.group.ID ||
			up.GetGroup() != fx.group.ID || up.GetVersion() != 3 || len(up.GetMembers()) != 2 || up.Members[0].User != "alice" || !up.Members[0].Admin ||
			up.Members[1].User != "carol" || up.Members[1].Admin || len(up.Added) != 0 || len(up.Removed) != 1 || up.Removed[0] != "bob" {
			t.Fatalf("%s holds %v", d, e)
		}
	}
	// A change that changed nothing tells nobody.
	same, err := fx.groups.AddMembers(ctx, fx.group.ID, "alice", []string{"carol"})
	if err != nil || same.Changed {
		t.Fatalf("AddMembers of a member: %+v, %v", same, err)
	}
	if err := fx.svc.GroupChanged(ctx, alice1, same); err != nil {
		t.Fatal(err)
	}
	if es := fx.entries(t, alice1); len(es) != 1 {
		t.Fatalf("alice.1 holds %d entries after a no-op change, want 1", len(es))
	}
}

// TestGroupSendNotifiesChunkByChunk: the devices of a durable chunk are
// told at once, before the later chunks are durable and the send is
// accepted; every device is told exactly once.
func TestGroupSendNotifiesChunkByChunk(t *testing.T) {
	fx := newGroupFixture(t)
	targets := fx.targets() // alice.2, then bob's devices: 601, two chunks
	p, err := fx.svc.StartSend(t.Context(), SendRequest{From: alice1, ClientMsgID: "c1", Group: fx.group.ID, GroupVersion: 1, Payload: []byte("sealed")})
	if err != nil {
		t.Fatal(err)
	}
	for i, d := range targets {
		if want := min(1, max(0, GroupChunk-i)); fx.notify.n[d] != want {
			t.Fatalf("after StartSend, device %d (%s) told %d times, want %d", i, d, fx.notify.n[d], want)
		}
	}
	if _, err := p.Wait(t.Context()); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Wait(t.Context()); err != nil { // Wait again: nobody told twice
		t.Fatal(err)
	}
	for i, d := range targets {
		if fx.notify.n[d] != 1 {
			t.Fatalf("after Wait, device %d (%s) told %d times, want 1", i, d, fx.notify.n[d])
		}
	}
	if fx.notify.n[alice1] != 0 {
		t.Errorf("the sending device was told %d times", fx.notify.n[alice1])
	}
}
