package e2e_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/courier-im/courier/client"
	"github.com/courier-im/courier/client/e2e"
	"github.com/courier-im/courier/internal/servertest"
)

func TestConversationAcrossRestarts(t *testing.T) {
	t.Parallel()
	srv := servertest.Start(t)
	alice := newParty(t, register(t, srv, "alice"))
	bob := newParty(t, register(t, srv, "bob"))
	alice.start()
	bob.start()

	alice.send("bob", "hello bob")
	bob.waitMessage("alice", "hello bob")
	bob.send("alice", "hi alice")
	alice.waitMessage("bob", "hi alice")

	// Each client restarts on its store: the sessions are in it.
	alice.stop()
	alice.start()
	alice.send("bob", "after alice restarted")
	bob.waitMessage("alice", "after alice restarted")
	bob.stop()
	bob.start()
	bob.send("alice", "after bob restarted")
	alice.waitMessage("bob", "after bob restarted")

	// The server restarts under both.
	srv.Stop(t)
	srv.Start(t)
	alice.send("bob", "after the server restarted")
	bob.waitMessage("alice", "after the server restarted")
	bob.send("alice", "and back")
	alice.waitMessage("bob", "and back")

	if n := len(alice.decryptErrors()) + len(bob.decryptErrors()); n != 0 {
		t.Fatalf("%d decryption failures: %s / %s", n, alice.describe(), bob.describe())
	}
	if n := bob.countBody("alice", "hello bob"); n != 1 {
		t.Fatalf("bob got the first message %d times", n)
	}
}

// link adds a device to p's account and returns it, its keys published.
func link(t *testing.T, p *party, name string) *party {
	t.Helper()
	api, err := client.NewKeyAPI(p.creds, nil)
	if err != nil {
		t.Fatal(err)
	}
	creds, err := api.LinkDevice(context.Background(), name)
	if err != nil {
		t.Fatalf("link a device to %s: %v", p.name(), err)
	}
	return newParty(t, creds)
}

func TestMultiDeviceAndSyncCopies(t *testing.T) {
	t.Parallel()
	srv := servertest.Start(t)
	alice := newParty(t, register(t, srv, "alice"))
	bob := newParty(t, register(t, srv, "bob"))
	bob2 := link(t, bob, "tablet")
	alice.start()
	bob.start()
	bob2.start()

	alice.send("bob", "to both of bob's devices")
	bob.waitMessage("alice", "to both of bob's devices")
	bob2.waitMessage("alice", "to both of bob's devices")
	bob.send("alice", "from bob's phone")
	alice.waitMessage("bob", "from bob's phone")
	// bob's tablet gets the sync copy, decrypted.
	bob2.waitFor("the sync copy", func() bool {
		return bob2.count(func(ev client.Event) bool {
			m, ok := ev.(*client.MessageEvent)
			return ok && m.Sync && string(m.Body) == "from bob's phone"
		}) == 1
	})
}

func TestIdentityChangeAndVerification(t *testing.T) {
	t.Parallel()
	srv := servertest.Start(t)
	ctx := context.Background()
	alice := newParty(t, register(t, srv, "alice"))
	bob := newParty(t, register(t, srv, "bob"))
	bob2 := link(t, bob, "tablet")
	alice.start()
	bob.start()
	bob2.start()
	alice.send("bob", "first")
	bob2.waitMessage("alice", "first")

	if err := alice.eng.Refresh(ctx, "bob"); err != nil {
		t.Fatal(err)
	}
	before, err := alice.eng.SafetyNumber(ctx, "bob")
	if err != nil {
		t.Fatal(err)
	}
	if err := bob.eng.Refresh(ctx, "alice"); err != nil {
		t.Fatal(err)
	}
	bobs, err := bob.eng.SafetyNumber(ctx, "alice")
	if err != nil {
		t.Fatal(err)
	}
	if before.Number != bobs.Number || len(before.Number) != 71 {
		t.Logf("alice: local %x remote %x", before.Local, before.Remote)
		t.Logf("bob: local %x remote %x", bobs.Local, bobs.Remote)
		t.Fatalf("alice sees %q, bob sees %q: the two ends must agree", before.Number, bobs.Number)
	}
	if err := alice.eng.MarkVerified(ctx, "bob"); err != nil {
		t.Fatal(err)
	}

	// bob's tablet re-registers: a new device with a new identity.
	bob2.stop()
	api, _ := client.NewKeyAPI(bob.creds, nil)
	if err := api.RemoveDevice(ctx, bob2.creds.Device); err != nil {
		t.Fatal(err)
	}
	bob3 := link(t, bob, "tablet again")
	bob3.start()

	sendCtx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	_, err = alice.c.Send(sendCtx, "bob", []byte("blocked?"))
	var be *e2e.BlockedError
	if !errors.As(err, &be) || be.User != "bob" {
		t.Fatalf("send to a verified contact whose devices changed: %v, want a BlockedError", err)
	}
	changes := alice.noticesOf(e2e.IdentityChanged)
	if len(changes) == 0 || !changes[len(changes)-1].Verified {
		t.Fatalf("no loud identity change notice: %s", alice.describe())
	}
	after, err := alice.eng.SafetyNumber(ctx, "bob")
	if err != nil {
		t.Fatal(err)
	}
	if after.Number == before.Number || !after.Changed || after.Verified {
		t.Fatalf("after the change: %+v (before %q)", after, before.Number)
	}

	if err := alice.eng.Accept(ctx, "bob"); err != nil {
		t.Fatal(err)
	}
	alice.send("bob", "after accepting")
	bob.waitMessage("alice", "after accepting")
	bob3.waitMessage("alice", "after accepting")
	if n := bob.countBody("alice", "blocked?"); n != 0 {
		t.Fatal("a blocked message was delivered")
	}
}

// tamperer flips a byte of the first payload it seals for a device of
// user, once.
type tamperer struct {
	*e2e.Engine
	user string
	mu   sync.Mutex
	done bool
}

func (tp *tamperer) Seal(ctx context.Context, m client.OutboxMessage, to []client.Device) ([][]byte, error) {
	out, err := tp.Engine.Seal(ctx, m, to)
	tp.mu.Lock()
	defer tp.mu.Unlock()
	if err == nil && !tp.done && !m.Control && m.ContentID == "" {
		for i, d := range to {
			if d.User == tp.user {
				out[i][len(out[i])/2] ^= 0x40
				tp.done = true
				break
			}
		}
	}
	return out, err
}

func TestTamperedCiphertextRejectedAndRecovered(t *testing.T) {
	t.Parallel()
	srv := servertest.Start(t)
	alice := newParty(t, register(t, srv, "alice"))
	bob := newParty(t, register(t, srv, "bob"))
	alice.start()
	bob.start()

	// Tamper with a SignalMessage (a PreKeySignalMessage's outer fields
	// are not authenticated, only its inner message is).
	alice.send("bob", "first")
	bob.waitMessage("alice", "first")
	bob.send("alice", "ack")
	alice.waitMessage("bob", "ack")
	alice.stop()
	alice.wrap = func(e *e2e.Engine) client.Cipher { return &tamperer{Engine: e, user: "bob"} }
	alice.start()
	sent := alice.send("bob", "tampered on the way")
	bob.waitMessage("alice", "tampered on the way") // the resend
	errs := bob.decryptErrors()
	if len(errs) != 1 || !errs[0].Asked || errs[0].From.User != "alice" {
		t.Fatalf("want one reported failure that asked for a resend: %s", bob.describe())
	}
	if got := errs[0].Error(); got == "" || !contains(got, "could not be decrypted") || !contains(got, "asked to resend") {
		t.Fatalf("the failure reads %q", got)
	}
	// The resend carries the message's own client id, once.
	n := bob.count(func(ev client.Event) bool {
		m, ok := ev.(*client.MessageEvent)
		return ok && m.Err == nil && m.ClientMsgID == sent.ClientMsgID
	})
	if n != 1 {
		t.Fatalf("the message came %d times under its id: %s", n, bob.describe())
	}
	if len(alice.noticesOf(e2e.Resent)) != 1 {
		t.Fatalf("alice did not resend: %s", alice.describe())
	}
	// The conversation goes on in the new session.
	alice.send("bob", "next")
	bob.waitMessage("alice", "next")
	bob.send("alice", "reply")
	alice.waitMessage("bob", "reply")
}

func contains(s, sub string) bool { return len(s) >= len(sub) && (s == sub || index(s, sub) >= 0) }

func index(s, sub string) int {
	for i := 0; i+len(sub) <= len(s); i++ {
		if s[i:i+len(sub)] == sub {
			return i
		}
	}
	return -1
}

func TestLostSessionRecovery(t *testing.T) {
	t.Parallel()
	srv := servertest.Start(t)
	alice := newParty(t, register(t, srv, "alice"))
	bob := newParty(t, register(t, srv, "bob"))
	alice.start()
	bob.start()
	alice.send("bob", "one")
	bob.waitMessage("alice", "one")
	bob.send("alice", "two")
	alice.waitMessage("bob", "two")

	// bob loses his session with alice (a restored backup, a bug).
	bob.stop()
	reopen := func() {
		bob.open()
		if _, err := bob.store.DB().Exec("DELETE FROM e2e_sessions WHERE user = 'alice'"); err != nil {
			t.Fatal(err)
		}
	}
	reopen()
	// Several messages in the lost session, before bob can ask for any.
	for _, text := range []string{"three", "three bis", "three ter"} {
		if _, err := alice.c.SendAsync("bob", []byte(text)); err != nil {
			t.Fatal(err)
		}
	}
	alice.send("bob", "three quater")
	bob.start()
	for _, text := range []string{"three", "three bis", "three ter", "three quater"} {
		bob.waitMessage("alice", text)
	}
	if errs := bob.decryptErrors(); len(errs) != 4 || !errs[0].Asked {
		t.Fatalf("want four reported failures: %s", bob.describe())
	}
	bob.send("alice", "four")
	alice.waitMessage("bob", "four")
	alice.send("bob", "five")
	bob.waitMessage("alice", "five")
	for _, text := range []string{"three", "three bis", "three ter", "three quater", "five"} {
		if n := bob.countBody("alice", text); n != 1 {
			t.Fatalf("bob got %q %d times", text, n)
		}
	}
}

// Hostile payloads are reported as decryption failures, never a panic or a
// message.
func TestGarbagePayloads(t *testing.T) {
	t.Parallel()
	srv := servertest.Start(t)
	bob := newParty(t, register(t, srv, "bob"))
	from := client.Device{User: "mallory", ID: 1}
	for i, p := range [][]byte{
		nil, {1}, {1, 1}, {2, 1, 0}, {1, 9, 1, 2, 3},
		{1, 1, 0x33, 0x0a, 0x21, 0x05}, {1, 2, 0x33, 0x0a, 0x21, 0x05, 1, 2, 3},
		append([]byte{1, 1, 0x33}, make([]byte, 200)...),
		append([]byte{1, 2, 0x33}, make([]byte, 200)...),
	} {
		o, err := bob.eng.Open(context.Background(), client.Inbound{ServerID: fmt.Sprint("garbage-", i), ClientMsgID: "x", From: from, Payload: p})
		var de *e2e.DecryptError
		if !errors.As(err, &de) || o.Body != nil || de.From != from {
			t.Errorf("payload %x: %+v, %v; want a DecryptError", p, o, err)
		}
	}
}

// A contact with two devices who writes first, from one device then the
// other: their safety number is taken from all their devices at once, so
// no change is reported.
func TestNoSpuriousChangeWhenDevicesWriteFirst(t *testing.T) {
	t.Parallel()
	srv := servertest.Start(t)
	alice := newParty(t, register(t, srv, "alice"))
	bob := newParty(t, register(t, srv, "bob"))
	bob2 := link(t, bob, "tablet")
	alice.start()
	bob.start()
	bob2.start()
	bob.send("alice", "from the phone")
	alice.waitMessage("bob", "from the phone")
	bob2.send("alice", "from the tablet")
	alice.waitMessage("bob", "from the tablet")
	if n := len(alice.noticesOf(e2e.IdentityChanged)); n != 0 {
		t.Fatalf("%d identity change notices for a first contact: %s", n, alice.describe())
	}
	s, err := alice.eng.SafetyNumber(context.Background(), "bob")
	if err != nil || len(s.Remote) != 2 {
		t.Fatalf("alice knows %d of bob's devices (%v)", len(s.Remote), err)
	}
}
