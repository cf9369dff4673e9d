package servertest

import (
	"context"
	"net"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// NATS is an in-process nats-server with JetStream on a file store
// (sync_interval: always), on loopback ports picked at run time: the NATS
// of cluster tests. The system nats-server may be too old for the
// JetStream mailbox (it needs 2.12), so tests embed their own.
type NATS struct {
	Name string

	dir       string
	port      int
	routePort int
	routes    []string
	cluster   string
	srv       *server.Server
}

// URL is the server's client URL.
func (n *NATS) URL() string { return "nats://127.0.0.1:" + strconv.Itoa(n.port) }

// Start starts the server (again, after Stop, on the same store and ports).
func (n *NATS) Start(t testing.TB) {
	t.Helper()
	opts := &server.Options{
		ServerName: n.Name, Host: "127.0.0.1", Port: n.port,
		JetStream: true, StoreDir: n.dir, SyncAlways: true, NoLog: true, NoSigs: true,
	}
	if n.cluster != "" {
		opts.Cluster = server.ClusterOpts{Name: n.cluster, Host: "127.0.0.1", Port: n.routePort}
		for _, r := range n.routes {
			u, err := url.Parse(r)
			if err != nil {
				t.Fatal(err)
			}
			opts.Routes = append(opts.Routes, u)
		}
	}
	s, err := server.NewServer(opts)
	if err != nil {
		t.Fatalf("nats-server: %v", err)
	}
	go s.Start()
	if !s.ReadyForConnections(20 * time.Second) {
		s.Shutdown()
		t.Fatalf("nats-server %s did not start", n.Name)
	}
	n.srv = s
}

// Stop shuts the server down (a no-op if it is stopped).
func (n *NATS) Stop() {
	if n.srv != nil {
		n.srv.Shutdown()
		n.srv.WaitForShutdown()
		n.srv = nil
	}
}

// StartNATS starts a standalone JetStream server, stopped when the test
// ends.
func StartNATS(t testing.TB) *NATS {
	t.Helper()
	n := &NATS{Name: "solo", dir: t.TempDir(), port: freePort(t)}
	n.Start(t)
	t.Cleanup(n.Stop)
	return n
}

// StartNATSCluster starts size routed JetStream servers, stopped when the
// test ends, and waits until JetStream answers.
func StartNATSCluster(t testing.TB, size int) []*NATS {
	t.Helper()
	nodes := make([]*NATS, size)
	for i := range nodes {
		nodes[i] = &NATS{Name: "n" + strconv.Itoa(i), dir: t.TempDir(), port: freePort(t), routePort: freePort(t), cluster: "courier-test"}
	}
	for i, a := range nodes {
		for j, b := range nodes {
			if i != j {
				a.routes = append(a.routes, "nats://127.0.0.1:"+strconv.Itoa(b.routePort))
			}
		}
	}
	for _, n := range nodes {
		n.Start(t)
		t.Cleanup(n.Stop)
	}
	nc, err := nats.Connect(NATSURLs(nodes), nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := js.AccountInfo(ctx)
		cancel()
		if err == nil {
			return nodes
		}
		if time.Now().After(deadline) {
			t.Fatalf("the NATS cluster has no JetStream after 30s: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// NATSURLs joins the servers' URLs with commas.
func NATSURLs(nodes []*NATS) string {
	u := make([]string, len(nodes))
	for i, n := range nodes {
		u[i] = n.URL()
	}
	return strings.Join(u, ",")
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
