package e2e_test

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/courier-im/courier/client"
	"github.com/courier-im/courier/client/e2e"
	"github.com/courier-im/courier/internal/servertest"
)

// Group messaging end to end, against a real in-process server: sender
// keys handed out over the pairwise sessions, one ciphertext per message,
// membership changes, restarts, and the outbox.

// capture wraps an Engine to keep the group payloads it seals.
type capture struct {
	*e2e.Engine
	mu     sync.Mutex
	sealed map[string][]byte // client message id → payload
}

func (c *capture) SealGroup(ctx context.Context, m client.OutboxMessage, to client.GroupTarget, share client.ShareFunc) ([]byte, error) {
	p, err := c.Engine.SealGroup(ctx, m, to, share)
	if err == nil {
		c.mu.Lock()
		c.sealed[m.ClientMsgID] = p
		c.mu.Unlock()
	}
	return p, err
}

func (c *capture) payload(id string) []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.sealed[id]
}

// groupBodies returns the bodies of the group messages p got in group
// from user (sync copies included when from is p's own user).
func (p *party) groupBodies(group, from string) []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []string
	for _, ev := range p.events {
		if m, ok := ev.(*client.MessageEvent); ok && m.Group == group && m.From == from && m.Err == nil {
			out = append(out, string(m.Body))
		}
	}
	return out
}

func (p *party) waitGroupMessage(group, from, body string) {
	p.t.Helper()
	p.waitFor(body+" in the group from "+from, func() bool { return slices.Contains(p.groupBodies(group, from), body) })
}

func (p *party) groupEvents(group string) []*client.GroupEvent {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []*client.GroupEvent
	for _, ev := range p.events {
		if g, ok := ev.(*client.GroupEvent); ok && g.Group.ID == group {
			out = append(out, g)
		}
	}
	return out
}

func (p *party) sendGroup(group, body string) client.Sent {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	sent, err := p.c.SendGroup(ctx, group, []byte(body))
	if err != nil {
		p.t.Fatalf("%s: send to group %s: %v", p.name(), group, err)
	}
	return sent
}

func (p *party) group(id string) client.Group {
	p.t.Helper()
	g, ok, err := p.c.Group(id)
	if err != nil || !ok {
		p.t.Fatalf("%s: group %s: %v, %v", p.name(), id, ok, err)
	}
	return g
}

func TestGroupConversation(t *testing.T) {
	t.Parallel()
	srv := servertest.Start(t)
	ctx := context.Background()
	alice := newParty(t, register(t, srv, "alice"))
	bob := newParty(t, register(t, srv, "bob"))
	bob2 := link(t, bob, "tablet")
	carol := newParty(t, register(t, srv, "carol"))
	var sealed *capture
	alice.wrap = func(e *e2e.Engine) client.Cipher {
		sealed = &capture{Engine: e, sealed: map[string][]byte{}}
		return sealed
	}
	for _, p := range []*party{alice, bob, bob2, carol} {
		p.start()
	}

	g, err := alice.c.CreateGroup(ctx, "friends", "bob", "carol")
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	if g.Name != "friends" || g.Version == 0 || !g.Admin("alice") || !g.Member("bob") || !g.Member("carol") {
		t.Fatalf("created %+v", g)
	}
	alice.sendGroup(g.ID, "hello group")
	for _, p := range []*party{bob, bob2, carol} {
		p.waitGroupMessage(g.ID, "alice", "hello group")
		// The name came end-to-end encrypted.
		p.waitFor("the group's name", func() bool {
			got, ok, _ := p.c.Group(g.ID)
			return ok && got.Name == "friends"
		})
	}
	// bob answers from his second device: alice, carol and bob's first
	// device (a copy) get it.
	bob2.sendGroup(g.ID, "hi from the tablet")
	for _, p := range []*party{alice, bob, carol} {
		p.waitGroupMessage(g.ID, "bob", "hi from the tablet")
	}

	// Restarts keep the sender keys and what was handed out.
	bob.stop()
	bob.start()
	alice.stop()
	alice.start()
	alice.sendGroup(g.ID, "after the restarts")
	bob.waitGroupMessage(g.ID, "alice", "after the restarts")
	bob.sendGroup(g.ID, "bob after his restart")
	alice.waitGroupMessage(g.ID, "bob", "bob after his restart")
	carol.waitGroupMessage(g.ID, "bob", "bob after his restart")

	// carol is removed: she is told, alice's key is replaced, and what
	// alice sends next neither reaches carol nor opens with her keys.
	g, err = alice.c.RemoveMember(ctx, g.ID, "carol")
	if err != nil {
		t.Fatalf("remove carol: %v", err)
	}
	if g.Member("carol") {
		t.Fatalf("carol still a member: %+v", g)
	}
	carol.waitFor("her removal", func() bool {
		for _, ev := range carol.groupEvents(g.ID) {
			if slices.Contains(ev.Removed, "carol") && ev.By == "alice" {
				return true
			}
		}
		return false
	})
	bob.waitFor("carol's removal", func() bool {
		for _, ev := range bob.groupEvents(g.ID) {
			if slices.Contains(ev.Removed, "carol") {
				return true
			}
		}
		return false
	})
	if !carol.group(g.ID).Left {
		t.Error("carol's store does not say she left")
	}
	secret := alice.sendGroup(g.ID, "without carol")
	bob.waitGroupMessage(g.ID, "alice", "without carol")
	bob2.waitGroupMessage(g.ID, "alice", "without carol")
	// A message bob sent after the removal: carol gets nothing of it either.
	bob.sendGroup(g.ID, "bob without carol")
	alice.waitGroupMessage(g.ID, "bob", "bob without carol")
	if got := carol.groupBodies(g.ID, "alice"); slices.Contains(got, "without carol") {
		t.Fatal("carol got a message sent after her removal")
	}
	p := sealed.payload(secret.ClientMsgID)
	if p == nil {
		t.Fatal("the payload was not captured")
	}
	_, err = carol.eng.Open(ctx, client.Inbound{ServerID: "stolen", ClientMsgID: secret.ClientMsgID,
		From: alice.c.Self(), Group: g.ID, Time: time.Now(), Payload: p})
	var de *e2e.DecryptError
	if !errors.As(err, &de) {
		t.Fatalf("carol opened a message sealed after her removal: %v", err)
	}
	if _, err := carol.c.SendGroup(ctx, g.ID, []byte("let me in")); !errors.Is(err, client.ErrNotMember) {
		t.Fatalf("carol sent to a group she left: %v", err)
	}

	for _, p := range []*party{alice, bob, bob2} {
		if n := len(p.decryptErrors()); n != 0 {
			t.Fatalf("%s: %d decryption failures: %s", p.name(), n, p.describe())
		}
	}
	if n := bob.countGroupBody(g.ID, "alice", "hello group"); n != 1 {
		t.Fatalf("bob got the first message %d times", n)
	}
}

func (p *party) countGroupBody(group, from, body string) int {
	n := 0
	for _, b := range p.groupBodies(group, from) {
		if b == body {
			n++
		}
	}
	return n
}

// A member added since a device last looked: its send is refused as
// stale, it refreshes the group, hands its key to the new member, and the
// retry goes through.
func TestGroupStaleMembership(t *testing.T) {
	t.Parallel()
	srv := servertest.Start(t)
	ctx := context.Background()
	alice := newParty(t, register(t, srv, "alice"))
	bob := newParty(t, register(t, srv, "bob"))
	dave := newParty(t, register(t, srv, "dave"))
	for _, p := range []*party{alice, bob, dave} {
		p.start()
	}
	g, err := alice.c.CreateGroup(ctx, "planning", "bob")
	if err != nil {
		t.Fatal(err)
	}
	bob.waitFor("the group", func() bool { _, ok, _ := bob.c.Group(g.ID); return ok })
	old := bob.group(g.ID)
	bob.sendGroup(g.ID, "before dave")
	alice.waitGroupMessage(g.ID, "bob", "before dave")

	g, err = alice.c.AddMembers(ctx, g.ID, "dave")
	if err != nil {
		t.Fatalf("add dave: %v", err)
	}
	bob.waitFor("dave's arrival", func() bool { return bob.group(g.ID).Member("dave") })
	// bob's device forgets it saw the change: its next send is stale.
	if err := bob.store.SaveGroup(old); err != nil {
		t.Fatal(err)
	}
	bob.sendGroup(g.ID, "welcome dave")
	dave.waitGroupMessage(g.ID, "bob", "welcome dave")
	alice.waitGroupMessage(g.ID, "bob", "welcome dave")
	if got := bob.group(g.ID); got.Version != g.Version || !got.Member("dave") {
		t.Fatalf("bob's group after the retry: %+v (server: %+v)", got, g)
	}
	dave.waitFor("the group's name", func() bool { g, ok, _ := dave.c.Group(g.ID); return ok && g.Name == "planning" })
	for _, p := range []*party{alice, bob, dave} {
		if n := len(p.decryptErrors()); n != 0 {
			t.Fatalf("%s: %d decryption failures: %s", p.name(), n, p.describe())
		}
	}
}

// A group message written while the server is down waits in the outbox,
// across a restart of the client, and goes once the server is back.
func TestGroupOfflineOutbox(t *testing.T) {
	t.Parallel()
	srv := servertest.Start(t)
	ctx := context.Background()
	alice := newParty(t, register(t, srv, "alice"))
	bob := newParty(t, register(t, srv, "bob"))
	alice.start()
	bob.start()
	g, err := alice.c.CreateGroup(ctx, "offline", "bob")
	if err != nil {
		t.Fatal(err)
	}
	alice.sendGroup(g.ID, "online first")
	bob.waitGroupMessage(g.ID, "alice", "online first")

	srv.Stop(t)
	ref, err := alice.c.SendGroupAsync(g.ID, []byte("typed offline"))
	if err != nil {
		t.Fatal(err)
	}
	if st := alice.c.Status(ref.ClientMsgID); st != client.StatusPending {
		t.Fatalf("status while offline: %v", st)
	}
	alice.stop() // the message stays in the store's outbox
	srv.Start(t)
	alice.start()
	bob.waitGroupMessage(g.ID, "alice", "typed offline")
	alice.waitFor("the acceptance", func() bool {
		return alice.count(func(ev client.Event) bool {
			r, ok := ev.(*client.ReceiptEvent)
			return ok && r.Message.ClientMsgID == ref.ClientMsgID && r.Group == g.ID
		}) > 0
	})
	// Delivered receipts come per member.
	alice.waitFor("bob's delivered receipt", func() bool {
		return alice.count(func(ev client.Event) bool {
			r, ok := ev.(*client.ReceiptEvent)
			return ok && r.Group == g.ID && r.By == "bob" && r.Status >= client.StatusDelivered
		}) > 0
	})
	if n := bob.countGroupBody(g.ID, "alice", "typed offline"); n != 1 {
		t.Fatalf("bob got the offline message %d times", n)
	}
	if m, found, err := alice.store.Find(client.MessageRef{ClientMsgID: ref.ClientMsgID}); err != nil || !found || m.Group != g.ID || m.Peer != client.GroupPeer(g.ID) {
		t.Fatalf("alice's history: %+v, %v, %v", m, found, err)
	}
}

// A device linked after the sender handed out its key cannot decrypt the
// next group message: it is shown as such, the sender's device is asked,
// hands the key to it and sends the message again, which then opens
// under its original id.
func TestGroupNewDeviceRecovers(t *testing.T) {
	t.Parallel()
	srv := servertest.Start(t)
	ctx := context.Background()
	alice := newParty(t, register(t, srv, "alice"))
	bob := newParty(t, register(t, srv, "bob"))
	alice.start()
	bob.start()
	g, err := alice.c.CreateGroup(ctx, "late", "bob")
	if err != nil {
		t.Fatal(err)
	}
	alice.sendGroup(g.ID, "before the tablet")
	bob.waitGroupMessage(g.ID, "alice", "before the tablet")

	bob2 := link(t, bob, "tablet")
	bob2.start()
	sent := alice.sendGroup(g.ID, "to the new tablet")
	bob2.waitGroupMessage(g.ID, "alice", "to the new tablet")
	errs := bob2.decryptErrors()
	if len(errs) != 1 || errs[0].Group != g.ID || !errs[0].Asked {
		t.Fatalf("bob2's decryption failures: %+v", errs)
	}
	var got *client.MessageEvent
	bob2.mu.Lock()
	for _, ev := range bob2.events {
		if m, ok := ev.(*client.MessageEvent); ok && m.Err == nil && string(m.Body) == "to the new tablet" {
			got = m
		}
	}
	bob2.mu.Unlock()
	if got == nil || got.ClientMsgID != sent.ClientMsgID {
		t.Fatalf("the resent message's id: %+v, want %s", got, sent.ClientMsgID)
	}
	// bob's first device had it already: the resend is not shown twice.
	alice.sendGroup(g.ID, "and after")
	bob.waitGroupMessage(g.ID, "alice", "and after")
	bob2.waitGroupMessage(g.ID, "alice", "and after")
	if n := bob.countGroupBody(g.ID, "alice", "to the new tablet"); n != 1 {
		t.Fatalf("bob's first device got the message %d times", n)
	}
}
