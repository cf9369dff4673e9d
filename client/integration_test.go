package client_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/courier-im/courier/client"
	"github.com/courier-im/courier/internal/servertest"
)

// These tests run the SDK against a real courier server, in process.

func register(t testing.TB, srv *servertest.Server, name string) client.Credentials {
	t.Helper()
	creds, err := client.Register(context.Background(), srv.URL, name, name+"-laptop")
	if err != nil {
		t.Fatalf("register %s: %v", name, err)
	}
	return creds
}

type clientOpt func(*client.Config)

// fast makes retries quick, so that tests which wait for a reconnect or a
// resend do not wait for production backoffs.
func fast(cfg *client.Config) {
	cfg.MinBackoff = 10 * time.Millisecond
	cfg.MaxBackoff = 200 * time.Millisecond
}

// newClient makes a client for creds that records its events; the test's
// cleanup closes it.
func newClient(t testing.TB, creds client.Credentials, opts ...clientOpt) (*client.Client, *recorder) {
	t.Helper()
	rec := newRecorder()
	cfg := client.Config{Credentials: creds, Handler: rec.handle}
	for _, o := range opts {
		o(&cfg)
	}
	c, err := client.New(cfg)
	if err != nil {
		t.Fatalf("new client: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c, rec
}

// online makes a client and runs it until its first SyncedEvent.
func online(t testing.TB, creds client.Credentials, opts ...clientOpt) (*client.Client, *recorder, <-chan error) {
	t.Helper()
	c, rec := newClient(t, creds, opts...)
	done := runClient(t, c)
	waitEvent[*client.SyncedEvent](t, rec, creds.User+" synced", nil)
	return c, rec, done
}

func receiptFor(id string, st client.Status) func(*client.ReceiptEvent) bool {
	return func(e *client.ReceiptEvent) bool { return e.Message.ServerID == id && e.Status == st }
}

func messageWith(id string) func(*client.MessageEvent) bool {
	return func(e *client.MessageEvent) bool { return e.ServerID == id }
}

func TestOnlineDeliveryWithReceipts(t *testing.T) {
	srv := servertest.Start(t)
	alice, bob := register(t, srv, "alice"), register(t, srv, "bob")
	ca, ra, _ := online(t, alice)
	cb, rb, _ := online(t, bob)
	ctx := context.Background()

	sent, err := ca.Send(ctx, "bob", []byte("dinner at 8?"))
	if err != nil {
		t.Fatalf("send: %v", err)
	}
	if sent.ServerID == "" || sent.ClientMsgID == "" || sent.Duplicate || sent.Time.IsZero() {
		t.Fatalf("send returned %+v", sent)
	}
	msg := waitEvent(t, rb, "bob gets the message", messageWith(sent.ServerID))
	if msg.From != "alice" || msg.FromDevice != alice.Device || msg.To != "bob" || msg.Sync ||
		msg.ClientMsgID != sent.ClientMsgID || !bytes.Equal(msg.Body, []byte("dinner at 8?")) || msg.Err != nil {
		t.Fatalf("bob got %+v", msg)
	}
	d := waitEvent(t, ra, "delivered receipt", receiptFor(sent.ServerID, client.StatusDelivered))
	if d.By != "bob" || d.ByDevice != bob.Device || d.To != "bob" || d.Message.ClientMsgID != sent.ClientMsgID {
		t.Fatalf("delivered receipt %+v", d)
	}
	if err := cb.MarkRead(ctx, "alice", client.MessageRef{ServerID: msg.ServerID, ClientMsgID: msg.ClientMsgID}); err != nil {
		t.Fatalf("mark read: %v", err)
	}
	waitEvent(t, ra, "read receipt", receiptFor(sent.ServerID, client.StatusRead))
	if st := ca.Status(sent.ServerID); st != client.StatusRead {
		t.Errorf("Status by server id = %v, want read", st)
	}
	if st := ca.Status(sent.ClientMsgID); st != client.StatusRead {
		t.Errorf("Status by client id = %v, want read", st)
	}
	// Exactly one event per step, in order.
	var got []client.Status
	for _, ev := range ra.snapshot() {
		if r, ok := ev.(*client.ReceiptEvent); ok && r.Message.ClientMsgID == sent.ClientMsgID {
			got = append(got, r.Status)
		}
	}
	want := []client.Status{client.StatusSent, client.StatusDelivered, client.StatusRead}
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] || got[2] != want[2] {
		t.Fatalf("alice's receipts for the message: %v, want %v", got, want)
	}
}

func TestOfflineDeliveryThenConnect(t *testing.T) {
	srv := servertest.Start(t)
	alice, bob := register(t, srv, "alice"), register(t, srv, "bob")
	ca, ra, _ := online(t, alice)
	ctx := context.Background()

	var sent []client.Sent
	for _, text := range []string{"one", "two", "three"} {
		s, err := ca.Send(ctx, "bob", []byte(text))
		if err != nil {
			t.Fatalf("send %q: %v", text, err)
		}
		sent = append(sent, s)
	}
	// bob connects later and catches up, in order, before Synced.
	_, rb, _ := online(t, bob)
	var got []string
	for _, ev := range rb.snapshot() {
		switch e := ev.(type) {
		case *client.MessageEvent:
			got = append(got, string(e.Body))
		case *client.SyncedEvent:
			if e.Pending != 3 {
				t.Errorf("synced with %d pending, want 3", e.Pending)
			}
			if len(got) != 3 || got[0] != "one" || got[1] != "two" || got[2] != "three" {
				t.Fatalf("before Synced bob had %q, want one two three in order", got)
			}
		}
	}
	for _, s := range sent {
		waitEvent(t, ra, "delivered "+s.ServerID, receiptFor(s.ServerID, client.StatusDelivered))
	}
}

// countingTransport records the client message ids of the sends that go
// over HTTP, and can lose the answer to the first one after the server has
// handled it.
type countingTransport struct {
	mu        sync.Mutex
	ids       []string
	loseFirst bool
	changed   chan struct{}
}

func newCountingTransport() *countingTransport {
	return &countingTransport{changed: make(chan struct{}, 1)}
}

func (ct *countingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.Method != http.MethodPost || req.URL.Path != "/v1/messages" {
		return http.DefaultTransport.RoundTrip(req)
	}
	body, err := io.ReadAll(req.Body)
	if err != nil {
		return nil, err
	}
	var in struct {
		ClientMsgID string `json:"client_msg_id"`
	}
	json.Unmarshal(body, &in)
	ct.mu.Lock()
	ct.ids = append(ct.ids, in.ClientMsgID)
	lose := ct.loseFirst && len(ct.ids) == 1
	ct.mu.Unlock()
	select {
	case ct.changed <- struct{}{}:
	default:
	}
	req.Body = io.NopCloser(bytes.NewReader(body))
	resp, err := http.DefaultTransport.RoundTrip(req)
	if lose && err == nil {
		resp.Body.Close()
		return nil, errors.New("test: answer lost")
	}
	return resp, err
}

func (ct *countingTransport) attempts() []string {
	ct.mu.Lock()
	defer ct.mu.Unlock()
	return append([]string(nil), ct.ids...)
}

func (ct *countingTransport) waitAttempts(t testing.TB, n int) {
	t.Helper()
	deadline := time.NewTimer(waitTimeout)
	defer deadline.Stop()
	for len(ct.attempts()) < n {
		select {
		case <-ct.changed:
		case <-deadline.C:
			t.Fatalf("timed out waiting for %d send attempts; saw %d", n, len(ct.attempts()))
		}
	}
}

func withTransport(rt http.RoundTripper) clientOpt {
	return func(cfg *client.Config) { cfg.HTTPClient = &http.Client{Transport: rt} }
}

// Send works without Run, over HTTP; while the server is down the outbox
// keeps trying with the same client id, and the message is accepted once
// when the server is back.
func TestSendWhileServerDown(t *testing.T) {
	srv := servertest.Start(t)
	alice, bob := register(t, srv, "alice"), register(t, srv, "bob")
	ct := newCountingTransport()
	ca, _ := newClient(t, alice, fast, withTransport(ct))
	ctx := context.Background()
	if _, err := ca.Devices(ctx, "bob"); err != nil { // warm the device cache
		t.Fatal(err)
	}
	if _, err := ca.Devices(ctx, "alice"); err != nil {
		t.Fatal(err)
	}

	srv.Stop(t)
	type result struct {
		sent client.Sent
		err  error
	}
	res := make(chan result, 1)
	go func() {
		s, err := ca.Send(ctx, "bob", []byte("are you there?"))
		res <- result{s, err}
	}()
	ct.waitAttempts(t, 3)
	srv.Start(t)
	var r result
	select {
	case r = <-res:
	case <-time.After(waitTimeout):
		t.Fatal("send did not complete after the server came back")
	}
	if r.err != nil {
		t.Fatalf("send: %v", r.err)
	}
	ids := ct.attempts()
	for _, id := range ids {
		if id != r.sent.ClientMsgID {
			t.Fatalf("attempts used client ids %q; want all %q", ids, r.sent.ClientMsgID)
		}
	}
	_, rb, _ := online(t, bob)
	if n := count(rb, messageWith(r.sent.ServerID)); n != 1 {
		t.Fatalf("bob got the message %d times, want once", n)
	}
}

// A send whose answer is lost is retried with the same id; the server
// answers "duplicate" and stores it once.
func TestLostAnswerIsRetriedAsDuplicate(t *testing.T) {
	srv := servertest.Start(t)
	alice, bob := register(t, srv, "alice"), register(t, srv, "bob")
	ct := newCountingTransport()
	ct.loseFirst = true
	ca, _ := newClient(t, alice, fast, withTransport(ct))
	sent, err := ca.Send(context.Background(), "bob", []byte("once"))
	if err != nil {
		t.Fatalf("send: %v", err)
	}
	if !sent.Duplicate {
		t.Errorf("send after a lost answer: Duplicate = false, want true")
	}
	if ids := ct.attempts(); len(ids) != 2 || ids[0] != ids[1] {
		t.Fatalf("attempts %q; want two with one id", ids)
	}
	_, rb, _ := online(t, bob)
	if n := count(rb, func(e *client.MessageEvent) bool { return string(e.Body) == "once" }); n != 1 {
		t.Fatalf("bob got the message %d times, want once", n)
	}
}

// With Run connected, a message sent while the server restarts is
// accepted after the reconnect, and the state change comes as an event.
func TestOutboxAcrossRestart(t *testing.T) {
	srv := servertest.Start(t)
	alice, bob := register(t, srv, "alice"), register(t, srv, "bob")
	ca, ra, _ := online(t, alice, fast)
	if _, err := ca.Devices(context.Background(), "bob"); err != nil {
		t.Fatal(err)
	}
	srv.Stop(t)
	waitEvent(t, ra, "disconnected", func(e *client.ConnectionEvent) bool { return e.State == client.Disconnected })
	ref, err := ca.SendAsync("bob", []byte("sent while down"))
	if err != nil {
		t.Fatal(err)
	}
	if st := ca.Status(ref.ClientMsgID); st != client.StatusPending {
		t.Errorf("status while the server is down = %v, want pending", st)
	}
	srv.Start(t)
	ev := waitEvent(t, ra, "accepted", func(e *client.ReceiptEvent) bool {
		return e.Message.ClientMsgID == ref.ClientMsgID && e.Status == client.StatusSent
	})
	if ev.Message.ServerID == "" || ev.To != "bob" {
		t.Fatalf("acceptance event %+v", ev)
	}
	_, rb, _ := online(t, bob)
	waitEvent(t, rb, "bob gets it", messageWith(ev.Message.ServerID))
	waitEvent(t, ra, "delivered", receiptFor(ev.Message.ServerID, client.StatusDelivered))
}

// An entry handled but not acknowledged (the connection died first) comes
// again on the next connection; Seen acknowledges it without a second
// event.
func TestRedeliveryIsSuppressed(t *testing.T) {
	srv := servertest.Start(t)
	alice, bob := register(t, srv, "alice"), register(t, srv, "bob")
	ca, _ := newClient(t, alice)

	release := make(chan struct{})
	holding := make(chan struct{})
	var once sync.Once
	cb, rb := newClient(t, bob, fast, func(cfg *client.Config) {
		rec := cfg.Handler
		cfg.Handler = func(ev client.Event) {
			if _, ok := ev.(*client.MessageEvent); ok {
				once.Do(func() {
					close(holding)
					<-release // the first message is handled only after the restart
				})
			}
			rec(ev)
		}
	})
	runClient(t, cb)
	waitEvent[*client.SyncedEvent](t, rb, "bob synced", nil)

	sent, err := ca.Send(context.Background(), "bob", []byte("exactly once on screen"))
	if err != nil {
		t.Fatal(err)
	}
	<-holding
	srv.Restart(t)
	close(release)
	// The second connection's catch-up holds the entry again.
	waitEvent(t, rb, "a catch-up with the entry", func(e *client.SyncedEvent) bool { return e.Pending >= 1 })
	if n := count(rb, messageWith(sent.ServerID)); n != 1 {
		t.Fatalf("bob's handler saw the message %d times, want once", n)
	}
}

// When the recipient (or the sender) gets a new device, the first send is
// refused as stale; the SDK takes the lists from the refusal and retries
// with the same id, and every device gets the message.
func TestStaleDevicesRetry(t *testing.T) {
	srv := servertest.Start(t)
	alice, bob := register(t, srv, "alice"), register(t, srv, "bob")
	ct := newCountingTransport()
	ca, ra := newClient(t, alice, withTransport(ct))
	ctx := context.Background()
	if _, err := ca.Send(ctx, "bob", []byte("before")); err != nil {
		t.Fatal(err)
	}

	bob2ID, bob2Secret := srv.AddDevice(t, "bob")
	alice2ID, alice2Secret := srv.AddDevice(t, "alice")
	sent, err := ca.Send(ctx, "bob", []byte("after"))
	if err != nil {
		t.Fatalf("send with stale device lists: %v", err)
	}
	ids := ct.attempts()
	if len(ids) != 3 || ids[1] != sent.ClientMsgID || ids[2] != sent.ClientMsgID {
		t.Fatalf("attempts %q: want the first send, then the stale one and its retry with %s", ids, sent.ClientMsgID)
	}

	_, rb1, _ := online(t, bob)
	_, rb2, _ := online(t, client.Credentials{Server: srv.URL, User: "bob", Device: bob2ID, Secret: bob2Secret})
	_, ra2, _ := online(t, client.Credentials{Server: srv.URL, User: "alice", Device: alice2ID, Secret: alice2Secret})
	waitEvent(t, rb1, "bob.1 gets it", messageWith(sent.ServerID))
	waitEvent(t, rb2, "bob.2 gets it", messageWith(sent.ServerID))
	syncCopy := waitEvent(t, ra2, "alice.2 gets the sync copy", messageWith(sent.ServerID))
	if !syncCopy.Sync || syncCopy.To != "bob" || syncCopy.From != "alice" || string(syncCopy.Body) != "after" {
		t.Fatalf("sync copy %+v", syncCopy)
	}
	// Receipts reach the sender's other device too.
	waitEvent(t, ra2, "alice.2 sees it delivered", receiptFor(sent.ServerID, client.StatusDelivered))

	// The same over the connection: the refusal comes as a Refused frame.
	runClient(t, ca)
	waitEvent[*client.SyncedEvent](t, ra, "alice.1 synced", nil)
	bob3ID, bob3Secret := srv.AddDevice(t, "bob")
	sent3, err := ca.Send(ctx, "bob", []byte("over the connection"))
	if err != nil {
		t.Fatalf("send over the connection with stale device lists: %v", err)
	}
	if n := len(ct.attempts()); n != 3 {
		t.Fatalf("%d HTTP send attempts; the connection should have carried the last send", n)
	}
	_, rb3, _ := online(t, client.Credentials{Server: srv.URL, User: "bob", Device: bob3ID, Secret: bob3Secret})
	waitEvent(t, rb3, "bob.3 gets it", messageWith(sent3.ServerID))
}

func TestPermanentRefusals(t *testing.T) {
	srv := servertest.Start(t)
	alice := register(t, srv, "alice")
	register(t, srv, "bob")
	ca, ra := newClient(t, alice)
	ctx := context.Background()

	_, err := ca.Send(ctx, "nobody", []byte("hello?"))
	var re *client.RefusedError
	if !errors.As(err, &re) || re.Code != client.CodeUnknownRecipient {
		t.Fatalf("send to an unknown user: %v, want a refusal with code unknown_recipient", err)
	}
	_, err = ca.Send(ctx, "bob", make([]byte, 65<<10))
	if !errors.As(err, &re) || re.Code != client.CodePayloadTooLarge {
		t.Fatalf("send of 65 KiB: %v, want a refusal with code payload_too_large", err)
	}
	ref, err := ca.SendAsync("nobody", []byte("async"))
	if err != nil {
		t.Fatal(err)
	}
	failed := waitEvent(t, ra, "send failure", func(e *client.SendFailedEvent) bool { return e.Message.ClientMsgID == ref.ClientMsgID })
	if !errors.As(failed.Err, &re) || re.Code != client.CodeUnknownRecipient || failed.To != "nobody" {
		t.Fatalf("failure event %+v", failed)
	}
	if st := ca.Status(ref.ClientMsgID); st != client.StatusUnknown {
		t.Errorf("status of a refused message = %v, want unknown", st)
	}
	// Run stays usable: the outbox moved on.
	if _, err := ca.Send(ctx, "bob", []byte("fine")); err != nil {
		t.Fatalf("send after refusals: %v", err)
	}
	if _, err := client.Register(ctx, srv.URL, "alice", ""); !errors.As(err, &re) || re.Code != client.CodeNameTaken {
		t.Fatalf("register a taken name: %v", err)
	}
}

func TestUnauthorizedStopsRun(t *testing.T) {
	srv := servertest.Start(t)
	alice := register(t, srv, "alice")
	alice.Secret = "not-the-credential"
	c, rec := newClient(t, alice, fast)
	err := c.Run(context.Background())
	if !errors.Is(err, client.ErrUnauthorized) {
		t.Fatalf("Run with a wrong credential: %v, want ErrUnauthorized", err)
	}
	waitEvent(t, rec, "the final disconnect", func(e *client.ConnectionEvent) bool {
		return e.State == client.Disconnected && errors.Is(e.Err, client.ErrUnauthorized)
	})
	if _, err := c.Devices(context.Background(), "alice"); !errors.Is(err, client.ErrUnauthorized) {
		t.Fatalf("devices with a wrong credential: %v", err)
	}
}

func TestSupersededStopsRun(t *testing.T) {
	srv := servertest.Start(t)
	alice := register(t, srv, "alice")
	_, _, first := online(t, alice, fast)
	online(t, alice, fast)
	select {
	case err := <-first:
		if !errors.Is(err, client.ErrSuperseded) {
			t.Fatalf("the older Run returned %v, want ErrSuperseded", err)
		}
	case <-time.After(waitTimeout):
		t.Fatal("the older Run did not stop when superseded")
	}
}

func TestPresenceAndTyping(t *testing.T) {
	srv := servertest.Start(t)
	alice, bob := register(t, srv, "alice"), register(t, srv, "bob")
	ca, ra, _ := online(t, alice, fast)
	ctx := context.Background()
	if err := ca.Subscribe(ctx, "bob"); err != nil {
		t.Fatal(err)
	}
	waitEvent(t, ra, "bob offline", func(e *client.PresenceEvent) bool { return e.User == "bob" && !e.Online })
	var re *client.RefusedError
	if err := ca.Subscribe(ctx, "nobody"); !errors.As(err, &re) || re.Code != client.CodeUnknownUser {
		t.Fatalf("subscribe to an unknown user: %v", err)
	}

	cb, _, _ := online(t, bob)
	waitEvent(t, ra, "bob online", func(e *client.PresenceEvent) bool { return e.User == "bob" && e.Online })
	if err := cb.SetTyping(ctx, "alice", true); err != nil {
		t.Fatal(err)
	}
	typing := waitEvent(t, ra, "bob typing", func(e *client.TypingEvent) bool { return e.From == "bob" && e.Typing })
	if typing.FromDevice != bob.Device {
		t.Errorf("typing from device %d, want %d", typing.FromDevice, bob.Device)
	}

	// Subscriptions are made again after a reconnect.
	before := count[*client.PresenceEvent](ra, nil)
	srv.Restart(t)
	ra.wait(t, "presence after the reconnect", func(evs []client.Event) bool {
		n := 0
		for _, ev := range evs {
			if p, ok := ev.(*client.PresenceEvent); ok && p.User == "bob" {
				n++
			}
		}
		return n > before
	})

	cOff, _ := newClient(t, alice)
	if err := cOff.SetTyping(ctx, "bob", true); !errors.Is(err, client.ErrNotConnected) {
		t.Fatalf("typing without a connection: %v, want ErrNotConnected", err)
	}
}

// MarkRead and Send work over HTTP alone (no Run), as a one-shot program
// uses them.
func TestMarkReadOverHTTP(t *testing.T) {
	srv := servertest.Start(t)
	alice, bob := register(t, srv, "alice"), register(t, srv, "bob")
	ca, ra, _ := online(t, alice)
	sent, err := ca.Send(context.Background(), "bob", []byte("read me"))
	if err != nil {
		t.Fatal(err)
	}
	cb, _ := newClient(t, bob)
	if err := cb.MarkRead(context.Background(), "alice", sent.MessageRef); err != nil {
		t.Fatalf("mark read over HTTP: %v", err)
	}
	waitEvent(t, ra, "read receipt", receiptFor(sent.ServerID, client.StatusRead))
	// bob connects now, which acknowledges the message: its delivered
	// receipt reaches alice after the read one, and must change nothing.
	// alice's mailbox is in order, so once she has bob's next message she
	// has handled the receipt.
	cb2, _, _ := online(t, bob)
	marker, err := cb2.Send(context.Background(), "alice", []byte("marker"))
	if err != nil {
		t.Fatal(err)
	}
	waitEvent(t, ra, "bob's next message", messageWith(marker.ServerID))
	if n := count(ra, receiptFor(sent.ServerID, client.StatusDelivered)); n != 0 {
		t.Fatalf("a delivered receipt after read produced %d events", n)
	}
	if st := ca.Status(sent.ServerID); st != client.StatusRead {
		t.Fatalf("status %v, want read", st)
	}
}
