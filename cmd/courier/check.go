package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/accounts/sqlite"
	"github.com/courier-im/courier/internal/checker"
	"github.com/courier-im/courier/internal/server"
)

// runCheck is "courier check": a soak run of the delivery history checker
// against a server (by default one started in-process on a temporary data
// directory), exiting non-zero on any violation.
func runCheck(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("check", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: courier check [flags]\n\nRuns a randomised conversation of real clients against a server, records every\nsend, acceptance, delivery and receipt, and checks that every accepted message\nreached every addressed device exactly once, in order, with receipts only\nmoving forward. Exits non-zero on any violation, printing the events concerned.\n\nflags:\n")
		fs.PrintDefaults()
	}
	url := fs.String("server", "", "base `URL` of the server to check (default: start one in-process in a temporary directory)")
	users := fs.Int("users", 6, "how many users converse")
	messages := fs.Int("messages", 300, "how many messages to send in all")
	duration := fs.Duration("duration", 2*time.Minute, "cap on the sending phase")
	seed := fs.Uint64("seed", uint64(time.Now().UnixNano()), "seed of the conversation's random choices")
	restarts := fs.Int("restarts", 0, "restart the in-process server this many times during the run (not with --server)")
	reconnect := fs.Float64("reconnect-rate", 0.05, "chance that a device reconnects (as a new client) before each of its sends")
	read := fs.Float64("read-rate", 0.2, "chance that a device marks what it got read after each of its sends")
	verbose := fs.Bool("v", false, "print progress")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	cfg := checker.Config{Server: *url, Users: *users, DevicesPerUser: 1, Messages: *messages, Seed: *seed, Duration: *duration,
		ReconnectRate: rateFlag(*reconnect), ReadRate: rateFlag(*read)}
	if *verbose {
		cfg.Logf = func(format string, a ...any) { fmt.Fprintf(os.Stderr, format+"\n", a...) }
	}
	if *url == "" {
		srv, err := startCheckServer()
		if err != nil {
			return err
		}
		defer srv.stop()
		cfg.Server = srv.url
		cfg.DevicesPerUser = 2
		cfg.AddDevice = srv.addDevice
		if *restarts > 0 {
			cfg.Faults = *restarts
			cfg.Fault = func(context.Context, int) error { return srv.restart() }
		}
	} else if *restarts > 0 {
		return errors.New("--restarts needs the in-process server (no --server)")
	}
	fmt.Printf("checking %s: %d users, %d messages, seed %d\n", cfg.Server, cfg.Users, cfg.Messages, cfg.Seed)
	d, err := checker.NewDriver(cfg)
	if err != nil {
		return err
	}
	res, err := d.Run(ctx)
	if err != nil {
		return err
	}
	st := res.Stats
	fmt.Printf("sends %d, accepted %d, delivered %d, duplicates shown %d, receipts %d, reconnects %d, in %v\n",
		st.Sends, st.Accepted, st.Deliveries, st.Duplicates, st.Receipts, res.Reconnects, res.Elapsed.Round(time.Millisecond))
	fmt.Printf("violations %d\n", len(res.Violations))
	if len(res.Violations) > 0 {
		checker.Report(os.Stdout, res.Violations)
		return fmt.Errorf("%d violations (seed %d)", len(res.Violations), cfg.Seed)
	}
	if !res.Quiesced {
		return errors.New("not every accepted message was delivered in time")
	}
	return nil
}

// checkServer is an in-process server on a temporary data directory, able
// to restart on the same data and port.
type checkServer struct {
	dir, addr, url string
	srv            *server.Server
	done           chan error
}

func startCheckServer() (*checkServer, error) {
	dir, err := os.MkdirTemp("", "courier-check-")
	if err != nil {
		return nil, err
	}
	s := &checkServer{dir: dir, addr: "127.0.0.1:0"}
	if err := s.start(); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	s.url = "http://" + s.addr
	return s, nil
}

func (s *checkServer) start() error {
	ln, err := net.Listen("tcp", s.addr)
	if err != nil {
		return err
	}
	s.addr = ln.Addr().String()
	srv, err := server.New(server.Config{DataDir: s.dir, Logger: slog.New(slog.DiscardHandler), MinFreeBytes: 1})
	if err != nil {
		ln.Close()
		return err
	}
	s.srv, s.done = srv, make(chan error, 1)
	go func() { s.done <- srv.Serve(ln) }()
	return nil
}

func (s *checkServer) shutdown() error {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	err := s.srv.Shutdown(ctx)
	return errors.Join(err, <-s.done)
}

func (s *checkServer) restart() error {
	if err := s.shutdown(); err != nil {
		return err
	}
	return s.start()
}

func (s *checkServer) stop() {
	s.shutdown()
	os.RemoveAll(s.dir)
}

// addDevice adds a device to user directly in the account store, next to
// the running server.
func (s *checkServer) addDevice(ctx context.Context, user string) (uint32, string, error) {
	st, err := sqlite.Open(filepath.Join(s.dir, "accounts.db"), sqlite.Options{})
	if err != nil {
		return 0, "", err
	}
	defer st.Close()
	cred, hash := accounts.NewCredential()
	d, err := st.AddDevice(ctx, user, "checker", hash)
	if err != nil {
		return 0, "", err
	}
	return d.ID, cred, nil
}

// rateFlag maps a rate flag to a checker.Config rate, where 0 means the
// default and a negative rate never.
func rateFlag(r float64) float64 {
	if r <= 0 {
		return -1
	}
	return r
}
