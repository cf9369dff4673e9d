package gateway

import (
	"context"
	"encoding/base64"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/coder/websocket"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"

	"github.com/courier-im/courier/internal/auth"
	"github.com/courier-im/courier/internal/auth/authtest"
	"github.com/courier-im/courier/internal/delivery"
	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox/pebble"
	"github.com/courier-im/courier/internal/metrics"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

// socketFixture is a gateway served over real sockets (httptest), on a
// Pebble mailbox in memory, with users alice and bob: bob's device 1 sends
// through svc, alice's device 1 connects with dial. Everything is closed
// by the test's cleanup.
type socketFixture struct {
	svc   *delivery.Service
	g     *Gateway
	m     *metrics.Metrics
	alice ident.Device
	url   string
	hdr   http.Header
}

// newSocketFixture opens the gateway on transport, with window (0: the
// default); with handOver, stored entries are handed to connections
// (delivery from the append), else connections are only notified.
func newSocketFixture(t *testing.T, transport string, window int, handOver bool) *socketFixture {
	t.Helper()
	accts := authtest.New()
	alice, cred, err := accts.Register("alice")
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := accts.Register("bob"); err != nil {
		t.Fatal(err)
	}
	mb, err := pebble.Open("mailbox", pebble.Options{FS: vfs.NewMem()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mb.Close() })
	m := metrics.New(prometheus.NewRegistry())
	var hand handTo
	var note notifyTo
	var n delivery.Notifier = &note
	if handOver {
		n = &hand
	}
	svc := delivery.New(delivery.Config{Mailbox: mb, Accounts: accts, Notifier: n, Metrics: m})
	g, err := Open(Config{Accounts: accts, Mailbox: mb, Delivery: svc, Auth: &auth.Authenticator{Accounts: accts},
		Metrics: m, WriteTimeout: 5 * time.Second, Transport: transport, Window: window})
	if err != nil {
		t.Fatal(err)
	}
	hand.g, note.g = g, g
	srv := httptest.NewServer(g)
	t.Cleanup(srv.Close)
	t.Cleanup(func() { g.Shutdown(context.Background()) })
	return &socketFixture{svc: svc, g: g, m: m, alice: alice, url: "ws" + strings.TrimPrefix(srv.URL, "http") + "/",
		hdr: http.Header{"Authorization": {"Basic " + base64.StdEncoding.EncodeToString([]byte(alice.String()+":"+cred))}}}
}

// dial connects alice's device 1; the connection is cut at the test's end.
func (fx *socketFixture) dial(ctx context.Context, t *testing.T) *websocket.Conn {
	t.Helper()
	ws, _, err := websocket.Dial(ctx, fx.url, &websocket.DialOptions{HTTPHeader: fx.hdr})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ws.CloseNow() })
	ws.SetReadLimit(-1)
	return ws
}

// readFrame reads and decodes the next frame on ws, failing the test on
// an error (a frame that never comes fails at ctx's deadline).
func readFrame(ctx context.Context, t *testing.T, ws *websocket.Conn) *pb.ServerFrame {
	t.Helper()
	_, b, err := ws.Read(ctx)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	var f pb.ServerFrame
	if err := proto.Unmarshal(b, &f); err != nil {
		t.Fatal(err)
	}
	return &f
}
