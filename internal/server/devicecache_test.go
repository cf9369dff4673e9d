package server_test

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/courier-im/courier/internal/server"
	"github.com/courier-im/courier/internal/servertest"
	"github.com/courier-im/courier/internal/testenv"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

// counterValue is the sum of a metric's series in a server's registry.
func counterValue(t *testing.T, s *servertest.Server, name string, labels map[string]string) float64 {
	t.Helper()
	mfs, err := s.Server().Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	sum := 0.0
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metric:
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if v, ok := labels[lp.GetName()]; ok && v != lp.GetValue() {
					continue metric
				}
			}
			sum += m.GetCounter().GetValue()
		}
	}
	return sum
}

// Two nodes on one PostgreSQL and NATS: a device removed, then one linked,
// through node A's API reach node B's device-list cache through the
// cluster's announcements (B's TTL is an hour, so nothing else could tell
// it), and B's sends are checked against the new lists.
func TestDeviceChangesReachOtherNodes(t *testing.T) {
	if testing.Short() {
		t.Skip("cluster test skipped in -short mode")
	}
	t.Parallel()
	pgURL := testenv.PostgresURL(t)
	nats := servertest.StartNATS(t)
	schema := "courier_devcache_" + randomHex(6)
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
	node := func(name string) *servertest.Server {
		return servertest.Start(t, func(c *server.Config) {
			c.DeviceCacheTTL = time.Hour
			c.Cluster = server.ClusterConfig{NATS: nats.URL(), Postgres: pgURL, PostgresSchema: schema, Node: name}
		})
	}
	a, b := node("a"), node("b")
	alice, bob := register(t, a.URL, "alice"), register(t, a.URL, "bob")
	link := func() uint32 {
		t.Helper()
		var resp struct {
			Device uint32 `json:"device"`
		}
		if st := doJSON(t, a.URL, "POST", "/v1/devices", bob, map[string]string{"name": "laptop"}, &resp); st != http.StatusCreated {
			t.Fatalf("link a device through A: %d", st)
		}
		return resp.Device
	}
	second := link()

	ac := dial(t, b.URL, alice)
	ac.until(isSynced)
	// B reads (and keeps) bob's two devices.
	if r := ac.send("m0", "bob", dev("bob", 1), dev("bob", second)); r.GetAccepted() == nil {
		t.Fatalf("send via B to bob's two devices: %v", r)
	}
	if r := ac.send("m1", "bob", dev("bob", 1), dev("bob", second)); r.GetAccepted() == nil {
		t.Fatalf("send via B to bob's two devices: %v", r)
	}
	if hits := counterValue(t, b, "courier_device_cache_hits_total", nil); hits < 1 {
		t.Fatalf("B's cache hits: %v, want its second send served from memory", hits)
	}

	// Removed through A: B refuses a send to the removed device once it
	// has heard of it.
	if st := doJSON(t, a.URL, "DELETE", fmt.Sprintf("/v1/devices/%d", second), bob, nil, nil); st != http.StatusNoContent {
		t.Fatalf("remove a device through A: %d", st)
	}
	n := 0
	eventually(t, 30*time.Second, func() error {
		n++
		r := ac.send(fmt.Sprint("after-remove-", n), "bob", dev("bob", 1), dev("bob", second))
		if ref := r.GetRefused(); ref != nil {
			if ref.Code != pb.RefusalCode_REFUSAL_CODE_STALE_DEVICES {
				t.Fatalf("send to a removed device: %v, want STALE_DEVICES", r)
			}
			for _, ud := range ref.Devices {
				if ud.User == "bob" && fmt.Sprint(ud.Devices) != "[1]" {
					t.Fatalf("STALE_DEVICES lists %v, want bob's device 1 only", ref.Devices)
				}
			}
			return nil
		}
		return fmt.Errorf("B still accepts a send to bob's removed device %d: %v", second, r)
	})

	// Linked through A: B accepts a send to the new device once it has
	// heard of it.
	third := link()
	eventually(t, 30*time.Second, func() error {
		n++
		r := ac.send(fmt.Sprint("after-link-", n), "bob", dev("bob", 1), dev("bob", third))
		if r.GetAccepted() != nil {
			return nil
		}
		if r.GetRefused().GetCode() != pb.RefusalCode_REFUSAL_CODE_STALE_DEVICES {
			t.Fatalf("send to a linked device: %v", r)
		}
		return fmt.Errorf("B does not know bob's new device %d yet: %v", third, r)
	})
	if inv := counterValue(t, b, "courier_device_cache_invalidations_total", map[string]string{"reason": "remote"}); inv < 2 {
		t.Fatalf("B heard %v announcements, want 2", inv)
	}
}

// The cache can be turned off, and a negative TTL is refused at start-up.
func TestDeviceCacheConfig(t *testing.T) {
	t.Parallel()
	if _, err := server.New(server.Config{DataDir: t.TempDir(), DeviceCacheTTL: -time.Second}); err == nil || !strings.Contains(err.Error(), "device cache ttl") {
		t.Fatalf("negative device cache ttl: %v", err)
	}
	for _, size := range []int{-1, 0} {
		s := servertest.Start(t, func(c *server.Config) { c.DeviceCacheSize = size })
		alice := register(t, s.URL, "alice")
		register(t, s.URL, "bob")
		ac := dial(t, s.URL, alice)
		for i := range 2 {
			if r := ac.send(fmt.Sprint("m", i), "bob", dev("bob", 1)); r.GetAccepted() == nil {
				t.Fatalf("cache size %d: send: %v", size, r)
			}
		}
		hits := counterValue(t, s, "courier_device_cache_hits_total", nil)
		if size < 0 && hits != 0 || size == 0 && hits < 1 {
			t.Fatalf("cache size %d: %v hits", size, hits)
		}
		if _, cached := s.Server().Accounts().(interface{ Flush() }); cached != (size >= 0) {
			t.Fatalf("cache size %d: the server's store is %T", size, s.Server().Accounts())
		}
	}
}
