package delivery

import (
	"bytes"
	"sync"
	"testing"
	"time"

	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox"
	pb "github.com/courier-im/courier/proto/courier/v1"
	"google.golang.org/protobuf/proto"
)

// entryRecorder is an EntryNotifier that records what it is told.
type entryRecorder struct {
	mu      sync.Mutex
	entries map[ident.Device][]StoredEntry
	plain   map[ident.Device]int
}

func newEntryRecorder() *entryRecorder {
	return &entryRecorder{entries: map[ident.Device][]StoredEntry{}, plain: map[ident.Device]int{}}
}

func (r *entryRecorder) Notify(d ident.Device) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.plain[d]++
}

func (r *entryRecorder) NotifyEntry(d ident.Device, e StoredEntry) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.entries[d] = append(r.entries[d], e)
}

func (r *entryRecorder) reset() {
	r.mu.Lock()
	defer r.mu.Unlock()
	clear(r.entries)
	clear(r.plain)
}

// checkHanded checks that every device of devs was handed exactly its
// last mailbox entry, after start, and was not told without it.
func checkHanded(t *testing.T, r *entryRecorder, mb mailbox.Store, devs []ident.Device, start time.Time) {
	t.Helper()
	for _, d := range devs {
		got := r.entries[d]
		if len(got) != 1 || r.plain[d] != 0 {
			t.Fatalf("%s: handed %d entries and told %d times without one; want one handed", d, len(got), r.plain[d])
		}
		es, err := mb.Read(t.Context(), d, 0, 100)
		if err != nil {
			t.Fatal(err)
		}
		last := es[len(es)-1]
		if got[0].Seq != last.Seq || !bytes.Equal(got[0].Data, last.Data) {
			t.Fatalf("%s: handed seq %d (%d bytes), mailbox holds seq %d (%d bytes)", d, got[0].Seq, len(got[0].Data), last.Seq, len(last.Data))
		}
		if got[0].Began.Before(start) || got[0].Began.After(time.Now()) {
			t.Fatalf("%s: Began %v is not during the call", d, got[0].Began)
		}
		// Head is what a connection would otherwise decode from Data.
		want := new(pb.Envelope)
		if err := proto.Unmarshal(last.Data, want); err != nil {
			t.Fatal(err)
		}
		want.Payload = nil
		if got[0].Head == nil || !proto.Equal(got[0].Head, want) {
			t.Fatalf("%s: handed head %v, want the entry's envelope without payload %v", d, got[0].Head, want)
		}
	}
}

// TestGroupSendHandsEntries: every copy of a group message (several
// chunks) is handed to its device with its seq, all copies sharing one
// encoding; a retry, which stores nothing, tells the devices only.
func TestGroupSendHandsEntries(t *testing.T) {
	fx := newGroupFixture(t)
	rec := newEntryRecorder()
	cfg := fx.svc.cfg
	cfg.Notifier = rec
	svc := New(cfg)
	req := SendRequest{From: alice1, ClientMsgID: "h1", Group: fx.group.ID, GroupVersion: 1, Payload: []byte("sealed")}
	start := time.Now()
	if _, err := svc.Send(t.Context(), req); err != nil {
		t.Fatal(err)
	}
	targets := fx.targets()
	checkHanded(t, rec, fx.mb, targets, start)
	first := &rec.entries[targets[0]][0].Data[0]
	for _, d := range targets {
		if &rec.entries[d][0].Data[0] != first {
			t.Fatalf("%s was handed its own copy of the envelope, not the shared one", d)
		}
	}

	rec.reset()
	acc, err := svc.Send(t.Context(), req)
	if err != nil || !acc.Duplicate {
		t.Fatalf("retry: %+v, %v", acc, err)
	}
	for _, d := range targets {
		if len(rec.entries[d]) != 0 || rec.plain[d] != 1 {
			t.Fatalf("retry: %s handed %d entries, told %d times; want told once", d, len(rec.entries[d]), rec.plain[d])
		}
	}

	// A membership change hands its GROUP_UPDATE too.
	rec.reset()
	ch, err := fx.groups.AddMembers(t.Context(), fx.group.ID, "alice", []string{"carol"})
	if err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	if err := svc.GroupChanged(t.Context(), alice1, ch); err != nil {
		t.Fatal(err)
	}
	checkHanded(t, rec, fx.mb, append(targets, alice1, ident.Device{User: "carol", ID: 1}), start)
}

// TestSendAndAckHandEntries: a 1:1 message is handed to each addressed
// device, and the DELIVERED receipt of its ack to each of the sender's
// devices, with or without the mailbox's optional capabilities.
func TestSendAndAckHandEntries(t *testing.T) {
	for _, plain := range []bool{false, true} {
		name := map[bool]string{false: "delete-append", true: "two-operations"}[plain]
		t.Run(name, func(t *testing.T) {
			fx := newAckFixture(t, plain)
			rec := newEntryRecorder()
			cfg := fx.svc.cfg
			cfg.Notifier = rec
			svc := New(cfg)
			start := time.Now()
			if _, err := svc.Send(t.Context(), SendRequest{From: alice1, To: "bob", ClientMsgID: "h1",
				Payloads: []Payload{{Device: bob1, Data: []byte("x")}, {Device: alice2, Data: []byte("y")}}}); err != nil {
				t.Fatal(err)
			}
			checkHanded(t, rec, fx.mb, []ident.Device{bob1, alice2}, start)

			rec.reset()
			acked := fx.delivered(t, bob1)
			start = time.Now()
			if err := svc.Ack(t.Context(), bob1, acked[len(acked)-1:]); err != nil {
				t.Fatal(err)
			}
			checkHanded(t, rec, fx.mb, []ident.Device{alice1, alice2}, start)
		})
	}
}

// plainNotifier is a Notifier without NotifyEntry.
type plainNotifier struct{ r *entryRecorder }

func (n plainNotifier) Notify(d ident.Device) { n.r.Notify(d) }

// TestPlainNotifierIsTold: a Notifier that does not take entries is told
// as before.
func TestPlainNotifierIsTold(t *testing.T) {
	fx := newAckFixture(t, false)
	rec := newEntryRecorder()
	cfg := fx.svc.cfg
	cfg.Notifier = plainNotifier{rec}
	svc := New(cfg)
	if _, err := svc.Send(t.Context(), SendRequest{From: alice1, To: "bob", ClientMsgID: "p1",
		Payloads: []Payload{{Device: bob1, Data: []byte("x")}, {Device: alice2, Data: []byte("y")}}}); err != nil {
		t.Fatal(err)
	}
	if rec.plain[bob1] != 1 || rec.plain[alice2] != 1 || len(rec.entries) != 0 {
		t.Fatalf("told %v, handed %d", rec.plain, len(rec.entries))
	}
}

// TestDeliveredItemsHeads: an ack of messages from several senders makes
// one receipt per sender, and each item's head is its own receipt's
// envelope.
func TestDeliveredItemsHeads(t *testing.T) {
	fx := newGroupFixture(t)
	envs := []*pb.Envelope{
		{Kind: pb.EnvelopeKind_ENVELOPE_KIND_MESSAGE, ServerId: "m1", Sender: "alice", SenderDevice: 1, ClientMsgId: "a"},
		{Kind: pb.EnvelopeKind_ENVELOPE_KIND_MESSAGE, ServerId: "m2", Sender: "carol", SenderDevice: 1, ClientMsgId: "c"},
		{Kind: pb.EnvelopeKind_ENVELOPE_KIND_MESSAGE, ServerId: "m3", Sender: "alice", SenderDevice: 2, ClientMsgId: "b"},
	}
	for _, n := range []int{1, len(envs)} {
		items, heads, err := fx.svc.deliveredItems(t.Context(), ident.Device{User: "bob", ID: 1}, envs[:n])
		if err != nil {
			t.Fatal(err)
		}
		want := map[int]int{1: 2, 3: 3}[n] // alice has 2 devices, carol 1
		if len(items) != want {
			t.Fatalf("%d senders' messages: %d items, want %d", n, len(items), want)
		}
		for i, it := range items {
			env := new(pb.Envelope)
			if err := proto.Unmarshal(it.Data, env); err != nil {
				t.Fatal(err)
			}
			if h := heads.of(i); h == nil || !proto.Equal(h, env) {
				t.Fatalf("item %d (to %s): head %v, want %v", i, it.Device, h, env)
			}
		}
	}
}
