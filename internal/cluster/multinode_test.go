package cluster_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/courier-im/courier/client"
	dirredis "github.com/courier-im/courier/internal/directory/redis"
	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/server"
	"github.com/courier-im/courier/internal/servertest"
	"github.com/courier-im/courier/internal/testenv"
)

// The multi-node test runs each courier process as a child: this test
// binary, re-executed with the child's configuration in childEnv, so that
// it can be killed with SIGKILL.
const childEnv = "COURIER_CLUSTER_TEST_CHILD"

type childConfig struct {
	Addr    string
	DataDir string
	Cluster server.ClusterConfig
}

func TestMain(m *testing.M) {
	if c := os.Getenv(childEnv); c != "" {
		runChild(c)
		return
	}
	os.Exit(m.Run())
}

func runChild(spec string) {
	var cc childConfig
	if err := json.Unmarshal([]byte(spec), &cc); err != nil {
		fmt.Println("ERROR", err)
		os.Exit(2)
	}
	srv, err := server.New(server.Config{Addr: cc.Addr, DataDir: cc.DataDir, Cluster: cc.Cluster,
		Logger: servertest.Logger(), MinFreeBytes: 1, ShutdownTimeout: 5 * time.Second})
	if err != nil {
		fmt.Println("ERROR", err)
		os.Exit(1)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	if err := srv.Run(ctx, func(a net.Addr) { fmt.Println("READY", a.String()) }); err != nil {
		fmt.Println("ERROR", err)
		os.Exit(1)
	}
}

// proc is a courier child process.
type proc struct {
	name string
	cmd  *exec.Cmd
	addr string
	done chan struct{}
}

func startProc(t *testing.T, name string, cc childConfig) *proc {
	t.Helper()
	cc.Addr = "127.0.0.1:0"
	cc.DataDir = t.TempDir()
	cc.Cluster.Node = name
	spec, err := json.Marshal(cc)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+string(spec))
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &proc{name: name, cmd: cmd, done: make(chan struct{})}
	go func() { cmd.Wait(); close(p.done) }()
	t.Cleanup(func() { p.kill() })
	ready := make(chan string, 1)
	go func() {
		lines := bufio.NewScanner(out)
		for lines.Scan() {
			if a, ok := strings.CutPrefix(lines.Text(), "READY "); ok {
				ready <- a
			} else {
				t.Logf("%s: %s", name, lines.Text())
			}
		}
	}()
	select {
	case p.addr = <-ready:
	case <-p.done:
		t.Fatalf("%s exited before it was ready", name)
	case <-time.After(60 * time.Second):
		t.Fatalf("%s did not start", name)
	}
	return p
}

func (p *proc) kill() {
	p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.done
}

// router stands for the load balancer in front of a cluster: the API goes
// to the api node, and each client's WebSocket to the first gateway in its
// own order of preference that takes a connection, so that clients sit on
// different gateways and fail over when theirs dies.
func router(t *testing.T, api string, gateways ...*proc) string {
	t.Helper()
	dial := func(ctx context.Context, _, _ string) (net.Conn, error) {
		var last error
		for _, g := range gateways {
			c, err := (&net.Dialer{Timeout: time.Second}).DialContext(ctx, "tcp", g.addr)
			if err == nil {
				return c, nil
			}
			last = err
		}
		return nil, last
	}
	wsProxy := &httputil.ReverseProxy{
		Rewrite:   func(r *httputil.ProxyRequest) { r.SetURL(&url.URL{Scheme: "http", Host: "gateway"}) },
		Transport: &http.Transport{DialContext: dial, DisableKeepAlives: true},
		ErrorHandler: func(w http.ResponseWriter, _ *http.Request, err error) {
			http.Error(w, err.Error(), http.StatusBadGateway)
		},
		FlushInterval: -1,
	}
	apiProxy := &httputil.ReverseProxy{Rewrite: func(r *httputil.ProxyRequest) { r.SetURL(&url.URL{Scheme: "http", Host: api}) }}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v1/ws" {
			wsProxy.ServeHTTP(w, r)
			return
		}
		apiProxy.ServeHTTP(w, r)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return "http://" + ln.Addr().String()
}

// party is one user's device, with what it received.
type party struct {
	name string
	c    *client.Client
	mu   sync.Mutex
	got  map[string]int // server id -> times handed to the application
	ch   chan struct{}
	evs  chan string // presence and typing, as "presence USER true"
}

// waitEvent waits for the presence or typing event want, skipping others.
func (p *party) waitEvent(t *testing.T, ctx context.Context, want string, poke func()) {
	t.Helper()
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case got := <-p.evs:
			if got == want {
				return
			}
		case <-tick.C:
			if poke != nil {
				poke()
			}
		case <-ctx.Done():
			t.Fatalf("%s never got %q", p.name, want)
		}
	}
}

func newParty(t *testing.T, ctx context.Context, base, name string) *party {
	t.Helper()
	creds, err := client.Register(ctx, base, name, "phone")
	if err != nil {
		t.Fatalf("register %s: %v", name, err)
	}
	p := &party{name: name, got: map[string]int{}, ch: make(chan struct{}, 1), evs: make(chan string, 256)}
	p.c, err = client.New(client.Config{
		Credentials: creds, MinBackoff: 50 * time.Millisecond, MaxBackoff: time.Second, PingInterval: 2 * time.Second,
		Handler: func(ev client.Event) {
			var note string
			switch ev := ev.(type) {
			case *client.PresenceEvent:
				note = fmt.Sprintf("presence %s %v", ev.User, ev.Online)
			case *client.TypingEvent:
				note = fmt.Sprintf("typing %s %v", ev.From, ev.Typing)
			}
			if note != "" {
				select {
				case p.evs <- note:
				default:
				}
			}
			if m, ok := ev.(*client.MessageEvent); ok && !m.Sync {
				p.mu.Lock()
				p.got[m.ServerID]++
				p.mu.Unlock()
				select {
				case p.ch <- struct{}{}:
				default:
				}
			}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.c.Close() })
	go p.c.Run(ctx)
	return p
}

// TestMultiNode is issue 6's multi-node test: three courier processes
// (gateway+api, gateway, worker) over a 3-node NATS cluster (R3), Redis and
// PostgreSQL. Two users on different gateways converse while a gateway is
// killed (its client reconnects to the other), the worker is killed while
// a second one runs, and a NATS node is stopped. Every accepted message
// must reach its recipient exactly once.
func TestMultiNode(t *testing.T) {
	if testing.Short() {
		t.Skip("multi-node test skipped in -short mode")
	}
	redisAddr := testenv.RedisAddr(t)
	pgURL := testenv.PostgresURL(t)
	natsNodes := startNATSCluster(t, 3)
	_, redisKeys := redisPrefix(t)
	schema := "courier_cluster_test_" + randHex(6)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		conn, err := pgx.Connect(ctx, pgURL)
		if err != nil {
			t.Errorf("drop schema: %v", err)
			return
		}
		defer conn.Close(ctx)
		if _, err := conn.Exec(ctx, "DROP SCHEMA IF EXISTS "+pgx.Identifier{schema}.Sanitize()+" CASCADE"); err != nil {
			t.Errorf("drop schema: %v", err)
		}
	})
	base := server.ClusterConfig{
		NATS: urls(natsNodes), Redis: "redis://" + redisAddr + "/0", Postgres: pgURL, Replicas: 3,
		RedisPrefix: redisKeys, PostgresSchema: schema,
		SessionTTL: 2 * time.Second, AckWait: 2 * time.Second,
	}
	with := func(roles string) childConfig {
		r, err := server.ParseRoles(roles)
		if err != nil {
			t.Fatal(err)
		}
		c := base
		c.Roles = r
		return childConfig{Cluster: c}
	}
	p1 := startProc(t, "p1", with("gateway,api"))
	p2 := startProc(t, "p2", with("gateway"))
	w1 := startProc(t, "w1", with("worker"))

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	alice := newParty(t, ctx, router(t, p1.addr, p1, p2), "alice")
	bob := newParty(t, ctx, router(t, p1.addr, p2, p1), "bob")

	// What was accepted, by recipient.
	var mu sync.Mutex
	accepted := map[*party][]string{}
	send := func(from, to *party, n int, tag string) {
		var wg sync.WaitGroup
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				s, err := from.c.Send(ctx, to.name, fmt.Appendf(nil, "%s %s->%s %d", tag, from.name, to.name, i))
				if err != nil {
					t.Errorf("%s: send %s %d: %v", tag, from.name, i, err)
					return
				}
				mu.Lock()
				accepted[to] = append(accepted[to], s.ServerID)
				mu.Unlock()
			}()
		}
		wg.Wait()
	}
	// delivered waits until every message accepted for p has arrived.
	delivered := func(p *party, phase string) {
		t.Helper()
		for {
			mu.Lock()
			want := append([]string(nil), accepted[p]...)
			mu.Unlock()
			p.mu.Lock()
			missing := 0
			for _, id := range want {
				if p.got[id] == 0 {
					missing++
				}
			}
			p.mu.Unlock()
			if missing == 0 {
				return
			}
			select {
			case <-p.ch:
			case <-time.After(time.Second):
			case <-ctx.Done():
				t.Fatalf("%s: %s is missing %d of %d accepted messages", phase, p.name, missing, len(want))
			}
		}
	}
	converse := func(phase string, n int) {
		t.Helper()
		var wg sync.WaitGroup
		wg.Add(2)
		go func() { defer wg.Done(); send(alice, bob, n, phase) }()
		go func() { defer wg.Done(); send(bob, alice, n, phase) }()
		wg.Wait()
		delivered(alice, phase)
		delivered(bob, phase)
		t.Logf("%s: delivered", phase)
	}

	// Each client sits on its own gateway.
	dir := dirredis.New(redisClient(t), dirredis.Options{Prefix: redisKeys, SweepEvery: -1})
	defer dir.Close()
	onNode := func(user, node string) {
		t.Helper()
		eventually(t, 30*time.Second, func() error {
			s, ok, err := dir.Lookup(ctx, ident.Device{User: user, ID: 1})
			if err != nil || !ok || s.Node != node {
				return fmt.Errorf("%s's device is on %+v (%v, %v), want node %s", user, s, ok, err, node)
			}
			return nil
		})
	}
	onNode("alice", "p1")
	onNode("bob", "p2")

	// Presence and typing cross nodes: alice (p1) sees bob (p2) online and
	// typing.
	if err := alice.c.Subscribe(ctx, "bob"); err != nil {
		t.Fatal(err)
	}
	alice.waitEvent(t, ctx, "presence bob true", nil)
	bobTypes := func() { bob.c.SetTyping(ctx, "alice", true) }
	bobTypes()
	alice.waitEvent(t, ctx, "typing bob true", bobTypes)

	converse("start", 20)

	// A gateway dies with messages in flight: bob reconnects through p1.
	go func() { time.Sleep(50 * time.Millisecond); p2.kill() }()
	converse("gateway killed", 40)
	onNode("bob", "p1")

	// A second worker joins; the first dies.
	startProc(t, "w2", with("worker"))
	go func() { time.Sleep(50 * time.Millisecond); w1.kill() }()
	converse("worker killed", 40)

	// One NATS node of three stops: the R3 stream keeps its quorum.
	natsNodes[2].Stop()
	converse("nats node stopped", 40)

	for _, p := range []*party{alice, bob} {
		p.mu.Lock()
		mu.Lock()
		want := map[string]bool{}
		for _, id := range accepted[p] {
			want[id] = true
		}
		mu.Unlock()
		for id, n := range p.got {
			if n != 1 {
				t.Errorf("%s got %s %d times", p.name, id, n)
			}
			if !want[id] {
				t.Errorf("%s got %s, which no send reported accepted", p.name, id)
			}
		}
		if len(want) != 140 {
			t.Errorf("%d messages accepted for %s, want 140", len(want), p.name)
		}
		p.mu.Unlock()
	}

	// Bob leaves (now through p1): alice's subscription, on p1 too, hears
	// it from the directory.
	bob.c.Close()
	alice.waitEvent(t, ctx, "presence bob false", nil)
}
