package server_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"

	dirredis "github.com/courier-im/courier/internal/directory/redis"
	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/server"
	"github.com/courier-im/courier/internal/servertest"
	"github.com/courier-im/courier/internal/testenv"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

func TestParseRoles(t *testing.T) {
	for in, want := range map[string]server.Roles{
		"gateway":            {Gateway: true},
		"api,worker":         {API: true, Worker: true},
		" Gateway , API ":    {Gateway: true, API: true},
		"all":                server.AllRoles,
		"gateway,api,worker": server.AllRoles,
	} {
		got, err := server.ParseRoles(in)
		if err != nil || got != want {
			t.Errorf("ParseRoles(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "gateway,", "web", "gateway;api"} {
		if _, err := server.ParseRoles(bad); err == nil {
			t.Errorf("ParseRoles(%q) accepted", bad)
		}
	}
}

// A role split without the backends its roles share, and bad cluster
// settings, are refused at start-up with a message that says what to give.
func TestClusterConfigErrors(t *testing.T) {
	for _, tc := range []struct {
		cfg  server.ClusterConfig
		want string
	}{
		{server.ClusterConfig{Roles: server.Roles{Gateway: true}}, "give --nats"},
		{server.ClusterConfig{Roles: server.Roles{Worker: true}, NATS: "nats://127.0.0.1:1"}, "give --redis"},
		{server.ClusterConfig{Roles: server.Roles{API: true}, NATS: "nats://127.0.0.1:1"}, "give --postgres"},
		{server.ClusterConfig{Redis: "redis://127.0.0.1:1/0"}, "--redis without --nats"},
		{server.ClusterConfig{Replicas: 3}, "give --nats"},
		{server.ClusterConfig{NATS: "nats://127.0.0.1:1", Replicas: 7}, "replicas 7"},
		{server.ClusterConfig{NATS: "http://127.0.0.1:1"}, "nats URL"},
		{server.ClusterConfig{Node: "a.b"}, "node \"a.b\""},
		{server.ClusterConfig{NATS: "nats://127.0.0.1:1", Redis: "mysql://x"}, "redis URL"},
		{server.ClusterConfig{Postgres: "mysql://x"}, "postgres URL"},
		{server.ClusterConfig{NATS: "nats://127.0.0.1:1", PushWebhook: "ftp://x"}, "push webhook"},
	} {
		_, err := server.New(server.Config{DataDir: t.TempDir(), Cluster: tc.cfg})
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: err %v, want one saying %q", tc.cfg, err, tc.want)
		}
	}
	// A NATS server that is not there is a start-up error, not a hang.
	_, err := server.New(server.Config{DataDir: t.TempDir(), Cluster: server.ClusterConfig{NATS: "nats://127.0.0.1:1"}})
	if err == nil || !strings.Contains(err.Error(), "connect to nats") {
		t.Errorf("unreachable NATS: %v", err)
	}
}

func redisKeys(t *testing.T) (*goredis.Client, string) {
	t.Helper()
	rdb := goredis.NewClient(&goredis.Options{Addr: testenv.RedisAddr(t)})
	b := make([]byte, 8)
	rand.Read(b)
	prefix := "courier-test:" + hex.EncodeToString(b) + ":"
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		iter := rdb.Scan(ctx, 0, prefix+"*", 100).Iterator()
		for iter.Next(ctx) {
			rdb.Del(ctx, iter.Val())
		}
		rdb.Close()
	})
	return rdb, prefix
}

func readiness(h http.Handler) int {
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/v1/ready", nil))
	return rec.Code
}

// One process with every role on NATS (JetStream mailbox) and Redis:
// delivery goes through the worker; readiness follows the backends; a
// graceful shutdown tells the device to reconnect, unregisters its session
// and then fails readiness.
func TestClusterNodeReadinessAndDrain(t *testing.T) {
	t.Parallel()
	rdb, prefix := redisKeys(t)
	nats := servertest.StartNATS(t)
	s := servertest.Start(t, func(c *server.Config) {
		c.Cluster = server.ClusterConfig{NATS: nats.URL(), Redis: "redis://" + rdb.Options().Addr + "/0", RedisPrefix: prefix, Node: "solo"}
	})
	srv := s.Server()
	if code := readiness(srv.Handler()); code != http.StatusOK {
		t.Fatalf("ready: %d, want 200", code)
	}
	alice, bob := register(t, s.URL, "alice"), register(t, s.URL, "bob")
	bc := dial(t, s.URL, bob)
	dir := dirredis.New(rdb, dirredis.Options{Prefix: prefix, SweepEvery: -1})
	defer dir.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if sess, ok, err := dir.Lookup(ctx, ident.Device{User: "bob", ID: 1}); err != nil || !ok || sess.Node != "solo" {
		t.Fatalf("bob's registration: %+v, %v, %v", sess, ok, err)
	}
	ac := dial(t, s.URL, alice)
	if r := ac.send("m1", "bob", dev("bob", 1)); r.GetAccepted() == nil {
		t.Fatalf("send: %v", r)
	}
	if f := bc.until(isDeliver); f.GetDeliver() == nil {
		t.Fatal("no delivery")
	}

	// Readiness follows NATS.
	nats.Stop()
	eventually(t, 30*time.Second, func() error {
		if code := readiness(srv.Handler()); code != http.StatusServiceUnavailable {
			return fmt.Errorf("ready with NATS stopped: %d", code)
		}
		return nil
	})
	nats.Start(t)
	eventually(t, 30*time.Second, func() error {
		if code := readiness(srv.Handler()); code != http.StatusOK {
			return fmt.Errorf("not ready after NATS came back: %d", code)
		}
		return nil
	})

	s.Stop(t)
	f := bc.until(func(f *pb.ServerFrame) bool { return f.GetError() != nil })
	if f.GetError().GetCode() != pb.ErrorCode_ERROR_CODE_SHUTTING_DOWN || f.GetError().GetRetryAfterMs() <= 0 {
		t.Fatalf("on shutdown the device got %v, want SHUTTING_DOWN with a retry delay", f)
	}
	if _, ok, err := dir.Lookup(ctx, ident.Device{User: "bob", ID: 1}); err != nil || ok {
		t.Fatalf("bob still registered after the drain: %v, %v", ok, err)
	}
	if code := readiness(srv.Handler()); code != http.StatusServiceUnavailable {
		t.Fatalf("ready after shutdown: %d, want 503", code)
	}
}
