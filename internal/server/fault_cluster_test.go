package server_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/jackc/pgx/v5"
	natsserver "github.com/nats-io/nats-server/v2/server"
	goredis "github.com/redis/go-redis/v9"
	"github.com/rs/zerolog"

	"github.com/courier-im/courier/internal/checker"
	"github.com/courier-im/courier/internal/server"
	"github.com/courier-im/courier/internal/servertest"
	"github.com/courier-im/courier/internal/testenv"
)

// backendProxies puts a toxiproxy proxy (used as a library, in process) in
// front of each of a cluster node's backends.
type backendProxies struct {
	api     *toxiproxy.ApiServer
	proxies map[string]*toxiproxy.Proxy // "nats", "redis", "postgres"
	addrs   map[string]string           // their listening addresses
}

func newBackendProxies(t *testing.T, upstreams map[string]string) *backendProxies {
	t.Helper()
	bp := &backendProxies{
		api:     toxiproxy.NewServer(toxiproxy.NewMetricsContainer(nil), zerolog.Nop()),
		proxies: map[string]*toxiproxy.Proxy{},
		addrs:   map[string]string{},
	}
	for name, up := range upstreams {
		// A fixed port (free a moment ago), so that it stays the same
		// across Stop and Start.
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		listen := ln.Addr().String()
		ln.Close()
		p := toxiproxy.NewProxy(bp.api, name, listen, up)
		if err := bp.api.Collection.Add(p, true); err != nil {
			t.Fatalf("toxiproxy %s: %v", name, err)
		}
		bp.proxies[name], bp.addrs[name] = p, listen
	}
	t.Cleanup(func() { bp.api.Collection.Clear() })
	return bp
}

func (bp *backendProxies) addr(name string) string { return bp.addrs[name] }

// toxic adds a toxic (toxiproxy's JSON form) to a proxy.
func (bp *backendProxies) toxic(t *testing.T, proxy, json string) {
	t.Helper()
	if _, err := bp.proxies[proxy].Toxics.AddToxicJson(strings.NewReader(json)); err != nil {
		t.Fatalf("toxic on %s: %v", proxy, err)
	}
}

func (bp *backendProxies) clear(proxy string) {
	bp.proxies[proxy].Toxics.ResetToxics(context.Background())
}

// startEmbeddedNATS starts an in-process JetStream server (nats-server from
// go.mod; the system's is too old for the mailbox).
func startEmbeddedNATS(t *testing.T) string {
	t.Helper()
	ns, err := natsserver.NewServer(&natsserver.Options{
		ServerName: "fault", Host: "127.0.0.1", Port: -1,
		JetStream: true, StoreDir: t.TempDir(), SyncAlways: true, NoLog: true, NoSigs: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	go ns.Start()
	if !ns.ReadyForConnections(20 * time.Second) {
		ns.Shutdown()
		t.Fatal("nats-server did not start")
	}
	t.Cleanup(func() { ns.Shutdown(); ns.WaitForShutdown() })
	return ns.Addr().String()
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// TestFaultBackendsUnderChecker runs a checker conversation against a
// courier node in cluster mode (all roles; the mailbox on NATS JetStream,
// the directory on Redis, accounts on PostgreSQL), each backend reached
// through a toxiproxy proxy. At points of the conversation one backend is
// made slow (latency), reset (connections reset by peer) or unreachable
// (proxy stopped: connections cut and refused) for a moment, then healed.
// While a backend is gone, a send gets an answer (accepted, or a clear
// refusal with a retry delay), never a hang; the conversation's clients
// retry, and at the end every accepted message must have been delivered
// exactly once, in order.
func TestFaultBackendsUnderChecker(t *testing.T) {
	if testing.Short() {
		t.Skip("fault test skipped in -short mode")
	}
	t.Parallel()
	redisAddr := testenv.RedisAddr(t)
	pgURL := testenv.PostgresURL(t)
	pg, err := url.Parse(pgURL)
	if err != nil || pg.Host == "" {
		t.Skipf("COURIER_TEST_POSTGRES %q is not a postgres:// URL with a host", pgURL)
	}
	natsAddr := startEmbeddedNATS(t)
	bp := newBackendProxies(t, map[string]string{"nats": natsAddr, "redis": redisAddr, "postgres": pg.Host})

	tag := randomHex(6)
	schema, prefix := "courier_fault_"+tag, "courier-fault:"+tag+":"
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if conn, err := pgx.Connect(ctx, pgURL); err != nil {
			t.Errorf("drop schema: %v", err)
		} else {
			if _, err := conn.Exec(ctx, "DROP SCHEMA IF EXISTS "+pgx.Identifier{schema}.Sanitize()+" CASCADE"); err != nil {
				t.Errorf("drop schema: %v", err)
			}
			conn.Close(ctx)
		}
		rdb := goredis.NewClient(&goredis.Options{Addr: redisAddr})
		defer rdb.Close()
		iter := rdb.Scan(ctx, 0, prefix+"*", 100).Iterator()
		for iter.Next(ctx) {
			rdb.Del(ctx, iter.Val())
		}
	})
	viaProxy := *pg
	viaProxy.Host = bp.addr("postgres")
	srv := servertest.Start(t, func(c *server.Config) {
		c.Cluster = server.ClusterConfig{
			NATS: "nats://" + bp.addr("nats"), Redis: "redis://" + bp.addr("redis") + "/0", Postgres: viaProxy.String(),
			Node: "fault-" + tag, RedisPrefix: prefix, PostgresSchema: schema,
			SessionTTL: 3 * time.Second, AckWait: 2 * time.Second,
		}
	})
	probe, target := register(t, srv.URL, "probe"+tag[:4]), register(t, srv.URL, "target"+tag[:4])

	// probeSend makes one HTTP send and reports what it got; it must be an
	// answer within the client's timeout, either 202 or a JSON refusal that
	// says to retry.
	hc := &http.Client{Timeout: 30 * time.Second}
	var outcomes []string
	probeSend := func(what string) {
		body := fmt.Sprintf(`{"client_msg_id":"probe-%s","to":%q,"payloads":[{"user":%q,"device":1,"payload":"eA=="}]}`,
			randomHex(8), target.User, target.User)
		req, _ := http.NewRequest("POST", srv.URL+"/v1/messages", strings.NewReader(body))
		req.Header.Set("Authorization", probe.basic())
		start := time.Now()
		resp, err := hc.Do(req)
		if err != nil {
			t.Errorf("send with %s: no answer: %v", what, err)
			return
		}
		defer resp.Body.Close()
		var e apiError
		jsonDecode(resp.Body, &e)
		took := time.Since(start).Round(time.Millisecond)
		outcome := fmt.Sprintf("%s: %d %s %q retry_after_ms=%d (%v)", what, resp.StatusCode, e.Error.Code, e.Error.Message, e.Error.RetryAfterMs, took)
		t.Log("probe send with " + outcome)
		outcomes = append(outcomes, outcome)
		switch {
		case resp.StatusCode == http.StatusAccepted:
		case resp.StatusCode >= 500 && e.Error.Code != "" && e.Error.Message != "":
		default:
			t.Errorf("send with %s: %d %+v; want 202 or a 5xx JSON refusal", what, resp.StatusCode, e)
		}
	}

	type fault struct {
		backend, kind string
	}
	var faults []fault
	for _, b := range []string{"nats", "redis", "postgres"} {
		for _, k := range []string{"slow", "reset", "down"} {
			faults = append(faults, fault{b, k})
		}
	}
	cfg := checker.Config{
		Server:         srv.URL,
		Users:          5,
		DevicesPerUser: 1,
		Messages:       450,
		Seed:           6,
		ReconnectRate:  0.05,
		ReadRate:       0.3,
		Duration:       3 * time.Minute,
		QuiesceTimeout: time.Minute,
		Faults:         len(faults),
		Fault: func(ctx context.Context, n int) error {
			f := faults[n]
			what := f.backend + " " + f.kind
			switch f.kind {
			case "slow":
				bp.toxic(t, f.backend, `{"name":"slow","type":"latency","stream":"downstream","toxicity":1,"attributes":{"latency":150,"jitter":50}}`)
				probeSend(what)
				time.Sleep(500 * time.Millisecond)
				bp.clear(f.backend)
			case "reset":
				bp.toxic(t, f.backend, `{"name":"reset","type":"reset_peer","stream":"downstream","toxicity":1,"attributes":{"timeout":0}}`)
				probeSend(what)
				time.Sleep(300 * time.Millisecond)
				bp.clear(f.backend)
			case "down":
				bp.proxies[f.backend].Stop()
				probeSend(what)
				time.Sleep(time.Second)
				if err := bp.proxies[f.backend].Start(); err != nil {
					return fmt.Errorf("restart proxy %s: %w", f.backend, err)
				}
			}
			return nil
		},
		Logf: t.Logf,
	}
	d, err := checker.NewDriver(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	res, err := d.Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Violations) > 0 {
		var buf bytes.Buffer
		checker.Report(&buf, res.Violations)
		t.Fatalf("seed %d:\n%s", cfg.Seed, buf.String())
	}
	if !res.Quiesced {
		t.Fatal("not every accepted message was delivered in time")
	}
	if st := res.Stats; st.Accepted != cfg.Messages || st.Duplicates != 0 {
		t.Errorf("stats %+v: want %d accepted and no duplicates", st, cfg.Messages)
	}
	t.Logf("stats %+v, %d reconnects, %v; probe sends:\n%s", res.Stats, res.Reconnects, res.Elapsed.Round(time.Millisecond), strings.Join(outcomes, "\n"))
}
