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
	"github.com/courier-im/courier/internal/server"
)

func runServe(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: courier serve [flags]\n\nRuns a single courier node on embedded backends: a Pebble mailbox and a SQLite\naccount store in the data directory. No external service is needed.\n\nflags:\n")
		fs.PrintDefaults()
	}
	cfg := server.Config{}
	fs.StringVar(&cfg.Addr, "addr", envOr("COURIER_ADDR", server.DefaultAddr), "`host:port` of the HTTP port (API, WebSocket at /v1/ws, /metrics) ($COURIER_ADDR)")
	fs.StringVar(&cfg.DataDir, "data", envOr("COURIER_DATA", "./"+server.DefaultDataDir), "data `directory` ($COURIER_DATA)")
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
	level := fs.String("log-level", "info", "log level: debug, info, warn, error")
	jsonLogs := fs.Bool("log-json", false, "log JSON lines instead of text")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
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

	srv, err := server.New(cfg)
	if err != nil {
		return err
	}
	return srv.Run(ctx, func(addr net.Addr) {
		cfg.Logger.Info("courier serving", "addr", addr.String(), "data", cfg.DataDir,
			"api", "http://"+addr.String()+"/v1", "websocket", "ws://"+addr.String()+"/v1/ws")
	})
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}
