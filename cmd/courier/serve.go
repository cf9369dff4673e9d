package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"time"

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
	fs.DurationVar(&cfg.Retention, "retention", server.DefaultRetention, "how long an entry never acknowledged is kept")
	fs.DurationVar(&cfg.IdleTimeout, "idle-timeout", 90*time.Second, "close connections that send nothing for this long")
	fs.DurationVar(&cfg.ShutdownTimeout, "shutdown-timeout", server.DefaultShutdownTimeout, "how long a graceful shutdown may take")
	minFree := fs.Int64("min-free-bytes", server.DefaultMinFreeBytes, "refuse sends when the data directory's disk has less free space than this")
	authBurst := fs.Int("auth-fail-burst", auth.DefaultBurst, "failed authentications allowed per source address and per device before 429 rate_limited (0: no limit)")
	fs.DurationVar(&cfg.AuthFailures.Every, "auth-fail-every", auth.DefaultEvery, "once the burst is spent, one more failed authentication is allowed per this long")
	maxConns := fs.Int("max-conns-per-addr", server.DefaultMaxConnsPerAddr, "WebSocket connections allowed from one source address (an IPv6 /64 counts as one; 0: no cap)")
	fs.DurationVar(&cfg.ReadHeaderTimeout, "read-header-timeout", server.DefaultReadHeaderTimeout, "how long a client may take to send request headers")
	fs.DurationVar(&cfg.BodyTimeout, "body-timeout", api.DefaultBodyTimeout, "how long a client may take to send a request body")
	fs.StringVar(&cfg.Transport, "transport", gateway.TransportGoroutine, "how WebSocket connections are served: goroutine (two goroutines each) or epoll (event loops; least memory per connection)")
	fs.IntVar(&cfg.DeviceCacheSize, "device-cache-size", 100_000, "users whose device lists are kept in memory (negative: no cache)")
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

	if l, err := rlimit.Raise(); err != nil {
		cfg.Logger.Warn("open-file limit", "err", err, "soft", l.Soft, "hard", l.Hard, "connections", l.Conns())
	} else {
		cfg.Logger.Info("open-file limit", "soft", l.Soft, "hard", l.Hard, "raised", l.Raised, "connections", l.Conns())
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

func backend(url, cluster, embedded string) string {
	if url != "" {
		return cluster
	}
	return embedded
}
