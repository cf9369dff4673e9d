package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
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
	url := fs.String("server", "", "base `URL` of the server to check, or of a cluster's api (with --gateways) (default: start one in-process in a temporary directory)")
	gateways := fs.String("gateways", "", "with --server: comma-separated base `URLs` of a cluster's gateways (as deploy/local-cluster.sh prints); the checker fronts them, WebSockets to the gateways in turn, the rest to --server")
	users := fs.Int("users", 6, "how many users converse")
	messages := fs.Int("messages", 300, "how many messages to send in all")
	duration := fs.Duration("duration", 2*time.Minute, "cap on the sending phase")
	seed := fs.Uint64("seed", uint64(time.Now().UnixNano()), "seed of the conversation's random choices")
	restarts := fs.Int("restarts", 0, "restart the in-process server this many times during the run (not with --server)")
	kills := fs.Int("kill", 0, "run the server as a child process (courier serve) and kill it with SIGKILL this many times at random moments of the run, restarting it on the same data and port (not with --server)")
	killDelay := fs.Duration("kill-delay", 100*time.Millisecond, "with --kill: each kill comes at a random moment up to this long after its point in the conversation")
	stalled := fs.Int("stalled", 0, "devices that never ack (their handler blocks) until the conversation is over, then reconnect and ack; without --server, the server runs as a child process and its heap and goroutines are printed at the stalled peak")
	slow := fs.Int("slow", 0, "devices that take --slow-delay over each message they read")
	slowDelay := fs.Duration("slow-delay", 5*time.Millisecond, "with --slow: time a slow device takes over each message")
	bodySize := fs.Int("body-size", 0, "pad message bodies to this many bytes")
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
		ReconnectRate: rateFlag(*reconnect), ReadRate: rateFlag(*read),
		Stalled: *stalled, SlowReaders: *slow, SlowDelay: *slowDelay, BodySize: *bodySize}
	if *verbose {
		cfg.Logf = func(format string, a ...any) { fmt.Fprintf(os.Stderr, format+"\n", a...) }
	}
	if *gateways != "" {
		if *url == "" {
			return errors.New("--gateways needs --server (the api's URL)")
		}
		f, err := checker.StartFront(*url, strings.Split(*gateways, ","))
		if err != nil {
			return err
		}
		defer f.Close()
		cfg.Server = f.URL
		fmt.Printf("fronting api %s and gateways %s at %s\n", *url, *gateways, f.URL)
	}
	if *kills > 0 && (*url != "" || *restarts > 0) {
		return errors.New("--kill runs its own child server: not with --server or --restarts")
	}
	if *stalled > 0 && *url == "" && *restarts > 0 {
		return errors.New("--stalled runs the server as a child process: use --kill rather than --restarts")
	}
	var proc *checker.Process
	var driver *checker.Driver // set before the run; StalledPeak reads its History
	if *kills > 0 || (*stalled > 0 && *url == "") {
		p, err := startKillServer(ctx, *verbose)
		if err != nil {
			return err
		}
		defer func() {
			p.Stop()
			os.RemoveAll(p.Dir)
		}()
		proc = p
		cfg.Server = p.URL()
		cfg.DevicesPerUser = 2
		cfg.AddDevice = addDeviceIn(p.Dir)
		cfg.Faults = *kills
		cfg.Fault = p.KillFault(*seed, *killDelay)
		if *stalled > 0 {
			names := []string{"go_memstats_heap_inuse_bytes", "go_goroutines"}
			before, err := p.Metrics(ctx, names...)
			if err != nil {
				return err
			}
			fmt.Printf("server before the run: heap in use %.1f MiB, %d goroutines\n",
				before[names[0]]/(1<<20), int(before[names[1]]))
			cfg.StalledPeak = func(ctx context.Context) error {
				m, err := p.Metrics(ctx, names...)
				if err == nil {
					fmt.Printf("server with %d devices stalled and %d deliveries owed: heap in use %.1f MiB, %d goroutines\n",
						*stalled, driver.History().Outstanding(), m[names[0]]/(1<<20), int(m[names[1]]))
				}
				return err
			}
		}
	} else if *url == "" {
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
	driver = d
	res, err := d.Run(ctx)
	if err != nil {
		return err
	}
	st := res.Stats
	fmt.Printf("sends %d, accepted %d, delivered %d, duplicates shown %d, receipts %d, reconnects %d, in %v\n",
		st.Sends, st.Accepted, st.Deliveries, st.Duplicates, st.Receipts, res.Reconnects, res.Elapsed.Round(time.Millisecond))
	if proc != nil {
		fmt.Printf("SIGKILLs survived %d\n", proc.Kills())
	}
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
	return addDeviceIn(s.dir)(ctx, user)
}

// startKillServer starts "courier serve" (this executable) as a child
// process on a temporary data directory, for --kill.
func startKillServer(ctx context.Context, verbose bool) (*checker.Process, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "courier-check-")
	if err != nil {
		return nil, err
	}
	var out io.Writer
	if verbose {
		out = os.Stderr
	}
	p, err := checker.StartProcess(ctx, dir, func(dir, addr string) *exec.Cmd {
		return exec.Command(exe, "serve", "--addr", addr, "--data", dir, "--min-free-bytes", "1", "--log-level", "warn")
	}, out)
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	return p, nil
}

// addDeviceIn returns an AddDevice hook that adds a device to a user
// directly in the account store in dir, next to the running server.
func addDeviceIn(dir string) func(ctx context.Context, user string) (uint32, string, error) {
	return func(ctx context.Context, user string) (uint32, string, error) {
		return addDeviceAt(ctx, dir, user)
	}
}

func addDeviceAt(ctx context.Context, dir, user string) (uint32, string, error) {
	st, err := sqlite.Open(filepath.Join(dir, "accounts.db"), sqlite.Options{})
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
