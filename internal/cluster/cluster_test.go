package cluster_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	natsjs "github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/courier-im/courier/internal/cluster"
	"github.com/courier-im/courier/internal/directory"
	dirredis "github.com/courier-im/courier/internal/directory/redis"
	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox"
	"github.com/courier-im/courier/internal/mailbox/jetstream"
)

// recorder is a Local that records what its node asks of it, standing in
// for the gateway whose side of this is tested in the multi-node test.
type recorder struct {
	mu         sync.Mutex
	notified   map[ident.Device]int
	typing     []string
	presence   []directory.PresenceEvent
	superseded []string
	reconnects []string
	sessions   []directory.DeviceSession
	events     chan string
}

func newRecorder() *recorder {
	return &recorder{notified: map[ident.Device]int{}, events: make(chan string, 1024)}
}

func (r *recorder) note(s string) {
	select {
	case r.events <- s:
	default:
	}
}

func (r *recorder) Notify(dev ident.Device) {
	r.mu.Lock()
	r.notified[dev]++
	r.mu.Unlock()
	r.note("notify " + dev.String())
}

func (r *recorder) Typing(from ident.Device, to string, typing bool) {
	s := fmt.Sprintf("typing %s %s %v", from, to, typing)
	r.mu.Lock()
	r.typing = append(r.typing, s)
	r.mu.Unlock()
	r.note(s)
}

func (r *recorder) PresenceChanged(user string, online bool, lastSeen time.Time) {
	r.mu.Lock()
	r.presence = append(r.presence, directory.PresenceEvent{User: user, Online: online, LastSeen: lastSeen})
	r.mu.Unlock()
	r.note(fmt.Sprintf("presence %s %v", user, online))
}

func (r *recorder) Supersede(dev ident.Device, session string) {
	r.mu.Lock()
	r.superseded = append(r.superseded, dev.String()+" "+session)
	r.mu.Unlock()
	r.note("supersede " + dev.String() + " " + session)
}

func (r *recorder) Reconnect(dev ident.Device, session string, _ time.Duration) {
	r.mu.Lock()
	r.reconnects = append(r.reconnects, dev.String()+" "+session)
	r.mu.Unlock()
	r.note("reconnect " + dev.String() + " " + session)
}

func (r *recorder) Sessions() []directory.DeviceSession {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]directory.DeviceSession(nil), r.sessions...)
}

func (r *recorder) setSessions(s ...directory.DeviceSession) {
	r.mu.Lock()
	r.sessions = s
	r.mu.Unlock()
}

// waitFor waits for the event want, skipping others.
func (r *recorder) waitFor(t *testing.T, want string) {
	t.Helper()
	timeout := time.After(20 * time.Second)
	for {
		select {
		case got := <-r.events:
			if got == want {
				return
			}
		case <-timeout:
			t.Fatalf("no %q within 20s", want)
		}
	}
}

// env is one test's backends: a JetStream mailbox on an in-process
// nats-server, and a Redis directory under a fresh prefix.
type env struct {
	nc     *nats.Conn
	mb     *jetstream.Store
	nodeSP string // node subject prefix, unique per test
}

func newEnv(t *testing.T, urls string) *env {
	t.Helper()
	nc := connect(t, urls)
	id := randHex(6)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	mb, err := jetstream.Open(ctx, nc, jetstream.Options{Stream: "CT_" + id, SubjectPrefix: "ct." + id})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mb.Close() })
	return &env{nc: nc, mb: mb, nodeSP: "ctnode." + id}
}

func (e *env) directory(t *testing.T, prefix string) directory.Directory {
	rdb := redisClient(t)
	d := dirredis.New(rdb, dirredis.Options{Prefix: prefix, SweepEvery: 50 * time.Millisecond})
	t.Cleanup(func() { d.Close() })
	return d
}

func (e *env) node(t *testing.T, dir directory.Directory, id string, local cluster.Local, ttl time.Duration) *cluster.Node {
	t.Helper()
	n, err := cluster.NewNode(cluster.NodeConfig{Conn: connect(t, e.nc.ConnectedUrl()), Directory: dir, ID: id, SubjectPrefix: e.nodeSP, SessionTTL: ttl})
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Start(local); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}

func (e *env) worker(t *testing.T, dir directory.Directory, push cluster.Pusher, ackWait time.Duration, reg ...prometheus.Registerer) *cluster.Worker {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cfg := cluster.WorkerConfig{
		Conn: connect(t, e.nc.ConnectedUrl()), Stream: e.mb.StreamName(), Filter: e.mb.DeviceSubjects(), DeviceOf: e.mb.DeviceOf,
		Directory: dir, Push: push, SubjectPrefix: e.nodeSP, AckWait: ackWait, PushEvery: -1,
	}
	if len(reg) > 0 {
		cfg.Registry = reg[0]
	}
	w, err := cluster.StartWorker(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.Close() })
	return w
}

func (e *env) appendTo(t *testing.T, devs ...ident.Device) {
	t.Helper()
	b := mailbox.Batch{Time: time.Now()}
	for _, d := range devs {
		b.Items = append(b.Items, mailbox.Item{Device: d, Data: []byte("x")})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := e.mb.Append(ctx, b); err != nil {
		t.Fatal(err)
	}
}

// pushLog records wake-ups.
type pushLog struct {
	mu   sync.Mutex
	devs []ident.Device
	ch   chan ident.Device
}

func newPushLog() *pushLog { return &pushLog{ch: make(chan ident.Device, 1024)} }

func (p *pushLog) Push(_ context.Context, dev ident.Device) error {
	p.mu.Lock()
	p.devs = append(p.devs, dev)
	p.mu.Unlock()
	p.ch <- dev
	return nil
}

var (
	alice1 = ident.Device{User: "alice", ID: 1}
	bob1   = ident.Device{User: "bob", ID: 1}
	bob2   = ident.Device{User: "bob", ID: 2}
)

// A new entry for a connected device reaches the node holding it; one for
// a device that is not connected becomes a push; presence goes to every
// node; typing is routed to the addressee's node.
func TestNodesAndWorker(t *testing.T) {
	t.Parallel()
	nats := startNATS(t)
	e := newEnv(t, nats.URL())
	_, prefix := redisPrefix(t)
	d1, d2, dw := e.directory(t, prefix), e.directory(t, prefix), e.directory(t, prefix)
	r1, r2 := newRecorder(), newRecorder()
	n1 := e.node(t, d1, "gw1", r1, time.Minute)
	n2 := e.node(t, d2, "gw2", r2, time.Minute)
	push := newPushLog()
	reg := prometheus.NewRegistry()
	e.worker(t, dw, push, 2*time.Second, reg)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	if err := n1.Register(ctx, alice1, "sa"); err != nil {
		t.Fatal(err)
	}
	r2.waitFor(t, "presence alice true")
	if err := n2.Register(ctx, bob1, "sb"); err != nil {
		t.Fatal(err)
	}
	r1.waitFor(t, "presence bob true")

	e.appendTo(t, bob1)
	r2.waitFor(t, "notify bob.1")
	e.appendTo(t, alice1, bob2) // bob.2 is not connected
	r1.waitFor(t, "notify alice.1")
	select {
	case d := <-push.ch:
		if d != bob2 {
			t.Fatalf("pushed %v, want %v", d, bob2)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("no push for the device that is not connected")
	}

	entries := func(result string) float64 {
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			for _, m := range mf.GetMetric() {
				if mf.GetName() == "courier_worker_entries_total" && m.GetLabel()[0].GetValue() == result {
					return m.GetCounter().GetValue()
				}
			}
		}
		return 0
	}
	eventually(t, 10*time.Second, func() error {
		if n, p := entries("notified"), entries("pushed"); n != 2 || p != 1 {
			return fmt.Errorf("worker metrics: notified %v, pushed %v; want 2, 1", n, p)
		}
		return nil
	})

	n1.Typing(alice1, "bob", true)
	r2.waitFor(t, "typing alice.1 bob true")

	off, err := n2.Unregister(ctx, bob1, "sb")
	if err != nil || !off {
		t.Fatalf("Unregister = %v, %v; want went offline", off, err)
	}
	r1.waitFor(t, "presence bob false")
	online, seen, err := n1.Presence(ctx, "bob")
	if err != nil || online || seen.IsZero() {
		t.Fatalf("Presence(bob) = %v, %v, %v; want offline with a last seen", online, seen, err)
	}
	r1.mu.Lock()
	defer r1.mu.Unlock()
	if len(r1.typing) != 0 {
		t.Errorf("the sender's node got its own typing back: %v", r1.typing)
	}
}

// A device that connects on another node supersedes its older connection,
// which its node is told to close.
func TestSupersedeAcrossNodes(t *testing.T) {
	t.Parallel()
	nats := startNATS(t)
	e := newEnv(t, nats.URL())
	_, prefix := redisPrefix(t)
	r1, r2 := newRecorder(), newRecorder()
	n1 := e.node(t, e.directory(t, prefix), "gw1", r1, time.Minute)
	n2 := e.node(t, e.directory(t, prefix), "gw2", r2, time.Minute)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := n1.Register(ctx, alice1, "old"); err != nil {
		t.Fatal(err)
	}
	if err := n2.Register(ctx, alice1, "new"); err != nil {
		t.Fatal(err)
	}
	r1.waitFor(t, "supersede alice.1 old")
	// The old connection's unregister does not remove the new one.
	if off, err := n1.Unregister(ctx, alice1, "old"); err != nil || off {
		t.Fatalf("Unregister(old) = %v, %v", off, err)
	}
	online, _, err := n2.Presence(ctx, "alice")
	if err != nil || !online {
		t.Fatalf("alice online = %v, %v after the old session left", online, err)
	}
}

// The heartbeat keeps registrations alive, registers again one that
// expired while the directory was out of reach, and closes one that
// another node took.
func TestHeartbeat(t *testing.T) {
	t.Parallel()
	nats := startNATS(t)
	e := newEnv(t, nats.URL())
	_, prefix := redisPrefix(t)
	dir := e.directory(t, prefix)
	r1 := newRecorder()
	ttl := 600 * time.Millisecond
	n1 := e.node(t, dir, "gw1", r1, ttl)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := n1.Register(ctx, alice1, "sa"); err != nil {
		t.Fatal(err)
	}
	r1.setSessions(directory.DeviceSession{Device: alice1, Session: "sa"})
	// Several TTLs later, the heartbeat has kept it.
	time.Sleep(4 * ttl)
	if s, ok, err := dir.Lookup(ctx, alice1); err != nil || !ok || s.ID != "sa" || s.Node != "gw1" {
		t.Fatalf("after 4 TTLs: %+v, %v, %v", s, ok, err)
	}
	// Lost (as if it expired): registered again.
	if _, err := dir.Unregister(ctx, alice1, "sa"); err != nil {
		t.Fatal(err)
	}
	eventually(t, 20*time.Second, func() error {
		s, ok, err := dir.Lookup(ctx, alice1)
		if err != nil || !ok || s.ID != "sa" {
			return fmt.Errorf("not registered again: %+v, %v, %v", s, ok, err)
		}
		return nil
	})
	// Taken by another node: closed.
	if _, _, err := dir.Register(ctx, directory.Session{Device: alice1, Node: "gw9", ID: "other"}, time.Minute); err != nil {
		t.Fatal(err)
	}
	r1.waitFor(t, "supersede alice.1 sa")
}

// A worker that takes an entry and dies without acknowledging it leaves it
// to another worker once the ack wait has passed.
func TestWorkerDeathRedelivers(t *testing.T) {
	t.Parallel()
	nats := startNATS(t)
	e := newEnv(t, nats.URL())
	_, prefix := redisPrefix(t)
	r1 := newRecorder()
	n1 := e.node(t, e.directory(t, prefix), "gw1", r1, time.Minute)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := n1.Register(ctx, bob1, "sb"); err != nil {
		t.Fatal(err)
	}
	// The first worker creates the consumer and is closed at once; a
	// "dying worker" then takes the entry from the same consumer and never
	// acknowledges it.
	w := e.worker(t, e.directory(t, prefix), newPushLog(), time.Second)
	w.Close()
	e.appendTo(t, bob1)
	js, err := natsjs.New(e.nc)
	if err != nil {
		t.Fatal(err)
	}
	cons, err := js.Consumer(ctx, e.mb.StreamName(), cluster.DefaultConsumer)
	if err != nil {
		t.Fatal(err)
	}
	batch, err := cons.Fetch(1, natsjs.FetchMaxWait(10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	taken := 0
	for range batch.Messages() {
		taken++
	}
	if taken != 1 {
		t.Fatalf("the dying worker took %d entries, want 1", taken)
	}
	r1.mu.Lock()
	early := r1.notified[bob1]
	r1.mu.Unlock()
	if early != 0 {
		t.Fatal("notified before any worker handled the entry")
	}
	e.worker(t, e.directory(t, prefix), newPushLog(), time.Second)
	r1.waitFor(t, "notify bob.1")
}

// The webhook provider posts {user, device} and fails on a non-2xx answer
// (the worker then retries).
func TestWebhookPusher(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	var got []map[string]any
	fail := true
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || r.Header.Get("Content-Type") != "application/json" {
			http.Error(w, "bad request", http.StatusBadRequest)
			return
		}
		var body map[string]any
		if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		mu.Lock()
		defer mu.Unlock()
		if fail {
			fail = false
			http.Error(w, "try later", http.StatusServiceUnavailable)
			return
		}
		got = append(got, body)
		w.WriteHeader(http.StatusNoContent)
	}))
	defer srv.Close()
	p, err := cluster.NewWebhook(srv.URL+"/wake", nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := p.Push(ctx, bob2); err == nil {
		t.Fatal("a 503 answer was taken for success")
	}
	if err := p.Push(ctx, bob2); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(got) != 1 || got[0]["user"] != "bob" || got[0]["device"] != float64(2) || len(got[0]) != 2 {
		t.Fatalf("webhook bodies %v, want one {user: bob, device: 2}", got)
	}
	for _, bad := range []string{"", "ftp://x/y", "http://", "::"} {
		if _, err := cluster.NewWebhook(bad, nil); err == nil {
			t.Errorf("NewWebhook(%q) accepted", bad)
		}
	}
	srv.Close()
	if err := p.Push(ctx, bob2); err == nil {
		t.Fatal("a push to a closed server succeeded")
	}
}

// Offline wake-ups go through the webhook end to end, and a failing
// webhook is retried by the worker.
func TestWorkerWebhook(t *testing.T) {
	t.Parallel()
	nats := startNATS(t)
	e := newEnv(t, nats.URL())
	_, prefix := redisPrefix(t)
	calls := make(chan string, 16)
	var mu sync.Mutex
	failures := 1
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var body struct {
			User   string `json:"user"`
			Device uint32 `json:"device"`
		}
		json.NewDecoder(r.Body).Decode(&body)
		mu.Lock()
		defer mu.Unlock()
		if failures > 0 {
			failures--
			calls <- "fail"
			w.WriteHeader(http.StatusBadGateway)
			return
		}
		calls <- fmt.Sprintf("%s.%d", body.User, body.Device)
	}))
	defer srv.Close()
	p, err := cluster.NewWebhook(srv.URL, nil)
	if err != nil {
		t.Fatal(err)
	}
	e.worker(t, e.directory(t, prefix), p, 2*time.Second)
	e.appendTo(t, bob2)
	for _, want := range []string{"fail", "bob.2"} {
		select {
		case got := <-calls:
			if got != want {
				t.Fatalf("webhook call %q, want %q", got, want)
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("no webhook call %q", want)
		}
	}
}

func TestNodeConfigErrors(t *testing.T) {
	nats := startNATS(t)
	nc := connect(t, nats.URL())
	_, prefix := redisPrefix(t)
	rdb := redisClient(t)
	dir := dirredis.New(rdb, dirredis.Options{Prefix: prefix})
	defer dir.Close()
	for _, id := range []string{"", "a.b", "a b", "x*", string(make([]byte, 65))} {
		if _, err := cluster.NewNode(cluster.NodeConfig{Conn: nc, Directory: dir, ID: id}); err == nil {
			t.Errorf("node id %q accepted", id)
		}
	}
	if _, err := cluster.NewNode(cluster.NodeConfig{Directory: dir, ID: "x"}); err == nil {
		t.Error("a node without a connection accepted")
	}
	if _, err := cluster.StartWorker(context.Background(), cluster.WorkerConfig{Conn: nc}); err == nil {
		t.Error("a worker without a stream accepted")
	}
	if got := cluster.NodeID("host.example.com-42"); !cluster.ValidNode(got) || got != "host-example-com-42" {
		t.Errorf("NodeID = %q", got)
	}
}
