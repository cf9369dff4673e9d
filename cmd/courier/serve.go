package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/accounts/cache"
	"github.com/courier-im/courier/internal/api"
	"github.com/courier-im/courier/internal/auth"
	"github.com/courier-im/courier/internal/gateway"
	"github.com/courier-im/courier/internal/rlimit"
	"github.com/courier-im/courier/internal/server"
)

func runServe(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), serveUsage)
		fs.PrintDefaults()
	}
	cfg := server.Config{}
	fs.StringVar(&cfg.Addr, "addr", server.DefaultAddr, "`host:port` of the HTTP port (API, WebSocket at /v1/ws, /metrics)")
	fs.StringVar(&cfg.DataDir, "data", "./"+server.DefaultDataDir, "data `directory` (embedded mailbox and account store)")
	fs.IntVar(&cfg.MaxPayload, "max-payload", 64<<10, "largest payload for one device, in `bytes`")
	fs.IntVar(&cfg.MaxPayloads, "max-payloads", 32, "most devices one send may address")
	fs.IntVar(&cfg.MaxGroupMembers, "max-group-members", accounts.DefaultMaxGroupMembers, "most members a group may have")
	fs.DurationVar(&cfg.Retention, "retention", server.DefaultRetention, "how long an entry never acknowledged is kept")
	fs.DurationVar(&cfg.IdleTimeout, "idle-timeout", 90*time.Second, "close connections that send nothing for this long")
	fs.DurationVar(&cfg.ShutdownTimeout, "shutdown-timeout", server.DefaultShutdownTimeout, "how long a graceful shutdown may take")
	minFree := fs.Int64("min-free-bytes", server.DefaultMinFreeBytes, "refuse sends when the data directory's disk has less free space than this")
	authBurst := fs.Int("auth-fail-burst", auth.DefaultBurst, "failed authentications allowed per source address and per device before 429 rate_limited (0: no limit)")
	fs.DurationVar(&cfg.AuthFailures.Every, "auth-fail-every", auth.DefaultEvery, "once the burst is spent, one more failed authentication is allowed per this long")
	maxConns := fs.Int("max-conns-per-addr", server.DefaultMaxConnsPerAddr, "WebSocket connections allowed from one source address (an IPv6 /64 counts as one; 0: no cap)")
	maxConnsTotal := fs.Int("max-conns", 0, "most WebSocket connections this process holds; from --admit-watermark of it on, new ones are refused with 503 overloaded (0: what the open-file limit leaves after "+strconv.Itoa(rlimit.Reserved)+" kept for files and sockets; negative: no cap)")
	fs.Float64Var(&cfg.AdmitWatermark, "admit-watermark", gateway.DefaultAdmitWatermark, "`fraction` (more than 0, at most 1) of --max-conns and --max-memory from which new connections are refused")
	fs.Float64Var(&cfg.AdmitCPU, "admit-cpu", 0, "also refuse new connections while the process uses this `fraction` of its cores, averaged over a few seconds (0: off, the default; see docs/operations.md)")
	var maxMemory byteSize
	fs.Var(&maxMemory, "max-memory", "process memory (`size`: bytes, or with KiB, MiB, GiB, TiB) from --admit-watermark of which new connections are refused (0: the Go memory limit, GOMEMLIMIT, if set; else no memory watermark)")
	fs.DurationVar(&cfg.ReadHeaderTimeout, "read-header-timeout", server.DefaultReadHeaderTimeout, "how long a client may take to send request headers")
	fs.DurationVar(&cfg.BodyTimeout, "body-timeout", api.DefaultBodyTimeout, "how long a client may take to send a request body")
	fs.StringVar(&cfg.Transport, "transport", server.DefaultTransport, "how WebSocket connections are served: "+gateway.TransportEpoll+" (event loops; least memory per connection) or "+gateway.TransportGoroutine+" (two goroutines each)")
	fs.IntVar(&cfg.DeviceCacheSize, "device-cache-size", 100_000, "users whose device lists are kept in memory (negative: no cache)")
	fs.IntVar(&cfg.GroupCacheSize, "group-cache-size", cache.DefaultGroups, "groups whose members are kept in memory, checked against the group's version on every use (negative: no cache)")
	fs.DurationVar(&cfg.DeviceCacheTTL, "device-cache-ttl", 30*time.Second, "longest a cached device list is used; in a cluster, changes reach other nodes over NATS sooner")
	level := fs.String("log-level", "info", "log level: debug, info, warn, error")
	jsonLogs := fs.Bool("log-json", false, "log JSON lines instead of text")
	cl := &cfg.Cluster
	roles := fs.String("role", "gateway,api,worker", "the `roles` of this process, comma-separated: gateway, api, worker (a subset needs --nats)")
	fs.StringVar(&cl.NATS, "nats", "", "NATS server `URLs`, comma-separated (nats://host:4222): the mailbox on JetStream, node-to-node routing")
	fs.StringVar(&cl.Redis, "redis", "", "Redis `URL` (redis://host:6379/0) of the shared session directory")
	fs.StringVar(&cl.Postgres, "postgres", "", "PostgreSQL `URL` (postgres://user@host:5432/db) of the shared account store")
	fs.StringVar(&cl.Node, "node", "", "this process's node `id` in the cluster (default: hostname-pid)")
	fs.IntVar(&cl.Replicas, "replicas", 1, "JetStream mailbox stream replicas (1 to 5; 3 in production)")
	fs.StringVar(&cl.PushWebhook, "push-webhook", "", "`URL` the workers POST offline wake-ups to, as JSON {\"user\",\"device\"} (default: log them)")
	fs.DurationVar(&cl.SessionTTL, "session-ttl", 30*time.Second, "a gateway's device registrations expire this long after its last heartbeat")
	fs.StringVar(&cl.RedisPrefix, "redis-prefix", "courier:dir:", "prefix of the session directory's Redis keys")
	fs.StringVar(&cl.PostgresSchema, "postgres-schema", "", "PostgreSQL schema of the account tables, created if absent (default: the URL's search_path)")
	pprofAddr := fs.String("pprof", "", "serve Go's profiles (net/http/pprof, /debug/pprof/) on this loopback `host:port`, apart from the main port (default: off)")
	configFile := fs.String("config", "", "YAML `file` of settings; its keys are these flags' names")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if err := applySettings(fs, *configFile); err != nil {
		return err
	}
	r, err := server.ParseRoles(*roles)
	if err != nil {
		return fmt.Errorf("--role: %w", err)
	}
	cl.Roles = r
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(*level)); err != nil {
		return fmt.Errorf("log level: %w", err)
	}
	opts := &slog.HandlerOptions{Level: lv}
	var h slog.Handler = slog.NewTextHandler(os.Stderr, opts)
	if *jsonLogs {
		h = slog.NewJSONHandler(os.Stderr, opts)
	}
	cfg.Logger = slog.New(h)
	cfg.MinFreeBytes = *minFree
	cfg.AuthFailures.Burst = *authBurst
	if *authBurst == 0 {
		cfg.AuthFailures.Burst = -1
	}
	cfg.MaxConnsPerAddr = *maxConns
	if *maxConns == 0 {
		cfg.MaxConnsPerAddr = -1
	}

	if !(cfg.AdmitWatermark > 0 && cfg.AdmitWatermark <= 1) {
		return fmt.Errorf("--admit-watermark %v: want more than 0, at most 1", cfg.AdmitWatermark)
	}
	cfg.MaxMemory = int64(maxMemory)

	l, err := rlimit.Raise()
	if err != nil {
		cfg.Logger.Warn("open-file limit", "err", err, "soft", l.Soft, "hard", l.Hard, "connections", l.Conns())
	} else {
		cfg.Logger.Info("open-file limit", "soft", l.Soft, "hard", l.Hard, "raised", l.Raised, "connections", l.Conns())
	}
	// The connection cap defaults to what the open-file limit allows: past
	// it, accept fails with EMFILE for everyone, files and sockets alike.
	switch {
	case *maxConnsTotal > 0:
		cfg.MaxConns = *maxConnsTotal
	case *maxConnsTotal == 0:
		cfg.MaxConns = int(min(l.Conns(), math.MaxInt32))
	}
	if *pprofAddr != "" {
		_, stop, err := servePprof(*pprofAddr, cfg.Logger)
		if err != nil {
			return fmt.Errorf("--pprof: %w", err)
		}
		defer stop()
	}
	srv, err := server.New(cfg)
	if err != nil {
		return err
	}
	return srv.Run(ctx, func(addr net.Addr) {
		attrs := []any{"addr", addr.String(), "roles", cl.Roles.String(), "node", cl.Node,
			"mailbox", backend(cl.NATS, "jetstream", "pebble")}
		if cl.Roles.Gateway || cl.Roles.API {
			attrs = append(attrs, "accounts", backend(cl.Postgres, "postgres", "sqlite"))
		}
		if cl.NATS != "" {
			attrs = append(attrs, "directory", backend(cl.Redis, "redis", "memory"), "replicas", cl.Replicas)
		}
		if cl.NATS == "" || (cl.Postgres == "" && (cl.Roles.Gateway || cl.Roles.API)) {
			attrs = append(attrs, "data", cfg.DataDir)
		}
		if cl.Roles.API {
			attrs = append(attrs, "api", "http://"+addr.String()+"/v1")
		}
		if cl.Roles.Gateway {
			attrs = append(attrs, "websocket", "ws://"+addr.String()+"/v1/ws")
		}
		cfg.Logger.Info("courier serving", attrs...)
	})
}

// servePprof serves net/http/pprof's handlers on addr, which must be a
// loopback address: profiles show the server's internals and cost CPU to
// take, so they are never exposed beyond the host. It returns a function
// that stops serving, and the address it listens on.
func servePprof(addr string, log *slog.Logger) (string, func(), error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return "", nil, err
	}
	if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
		return "", nil, fmt.Errorf("%q is not a loopback address (want 127.0.0.1:PORT, [::1]:PORT or localhost:PORT)", addr)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return "", nil, err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	hs := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go hs.Serve(ln)
	log.Info("profiles served", "pprof", "http://"+ln.Addr().String()+"/debug/pprof/")
	return ln.Addr().String(), func() { hs.Close() }, nil
}

func backend(url, cluster, embedded string) string {
	if url != "" {
		return cluster
	}
	return embedded
}

// byteSize is a flag.Value for an amount of memory: a number of bytes,
// optionally with a binary unit (KiB, MiB, GiB, TiB; K, M, G, T are read
// the same).
type byteSize int64

func (b *byteSize) String() string { return strconv.FormatInt(int64(*b), 10) }

func (b *byteSize) Set(s string) error {
	num := strings.TrimSpace(s)
	mult := int64(1)
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40}, {"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}, {"T", 1 << 40}, {"B", 1}} {
		if strings.HasSuffix(num, u.suffix) {
			num, mult = strings.TrimSpace(strings.TrimSuffix(num, u.suffix)), u.mult
			break
		}
	}
	n, err := strconv.ParseFloat(num, 64)
	if err != nil || n < 0 || math.IsInf(n, 0) || n*float64(mult) >= math.MaxInt64 {
		return fmt.Errorf("%q is not a size (want bytes, or a number with KiB, MiB, GiB or TiB)", s)
	}
	*b = byteSize(n * float64(mult))
	return nil
}
