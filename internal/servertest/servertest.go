// Package servertest runs a real courier server in-process for tests: on a
// loopback port picked at run time, with its data in a temporary directory,
// and able to stop and start again on the same data and port.
//
// Set COURIER_TEST_LOG=1 to see the server's logs on stderr.
package servertest

import (
	"context"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/accounts/sqlite"
	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/server"
)

// Server is a running (or stopped) in-process courier server.
type Server struct {
	// URL is the base URL, http://127.0.0.1:PORT; it stays the same across
	// Stop and Start.
	URL string
	// Dir is the data directory.
	Dir string

	addr string
	cfg  server.Config
	srv  *server.Server
	done chan error
}

// Option changes the server's configuration.
type Option func(*server.Config)

// Start starts a server on a fresh data directory. It is shut down when the
// test ends.
func Start(t testing.TB, opts ...Option) *Server {
	t.Helper()
	dir := t.TempDir()
	cfg := server.Config{DataDir: filepath.Join(dir, "data"), Logger: Logger(), MinFreeBytes: 1,
		// COURIER_TEST_TRANSPORT runs a suite on another gateway transport.
		Transport: os.Getenv("COURIER_TEST_TRANSPORT")}
	for _, o := range opts {
		o(&cfg)
	}
	s := &Server{Dir: cfg.DataDir, cfg: cfg, addr: "127.0.0.1:0"}
	s.Start(t)
	s.URL = "http://" + s.addr
	t.Cleanup(func() { s.Stop(t) })
	return s
}

// Logger is the logger servertest gives servers: silent unless
// COURIER_TEST_LOG is set.
func Logger() *slog.Logger {
	if os.Getenv("COURIER_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// Start starts a stopped server again, on the same data and port.
func (s *Server) Start(t testing.TB) {
	t.Helper()
	if s.srv != nil {
		t.Fatal("servertest: Start of a running server")
	}
	var ln net.Listener
	var err error
	// The port was ours a moment ago; another process may grab it in
	// between, which would be reported rather than hidden.
	for i := 0; i < 50; i++ {
		ln, err = net.Listen("tcp", s.addr)
		if err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("servertest: listen on %s: %v", s.addr, err)
	}
	s.addr = ln.Addr().String()
	srv, err := server.New(s.cfg)
	if err != nil {
		ln.Close()
		t.Fatalf("servertest: %v", err)
	}
	s.srv = srv
	s.done = make(chan error, 1)
	go func() { s.done <- srv.Serve(ln) }()
}

// Stop shuts the server down gracefully (a no-op if it is stopped).
func (s *Server) Stop(t testing.TB) {
	t.Helper()
	if s.srv == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := s.srv.Shutdown(ctx); err != nil {
		t.Errorf("servertest: shutdown: %v", err)
	}
	if err := <-s.done; err != nil {
		t.Errorf("servertest: serve: %v", err)
	}
	s.srv = nil
}

// Restart stops the server and starts it again on the same data and port.
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	s.Stop(t)
	s.Start(t)
}

// Server returns the running server.
func (s *Server) Server() *server.Server { return s.srv }

// AddDevice adds a device to an existing user directly in the account
// store and returns its id and credential: through a running server's own
// store (so that its device-list cache sees the change), or in the
// account database of a stopped one.
func (s *Server) AddDevice(t testing.TB, user string) (uint32, string) {
	t.Helper()
	st := s.accountStore(t)
	defer st.Close()
	cred, hash := accounts.NewCredential()
	d, err := st.AddDevice(context.Background(), user, "test device", hash)
	if err != nil {
		t.Fatalf("servertest: add device to %s: %v", user, err)
	}
	return d.ID, cred
}

// RemoveDevice removes a device directly in the account store, as
// AddDevice adds one.
func (s *Server) RemoveDevice(t testing.TB, user string, id uint32) {
	t.Helper()
	st := s.accountStore(t)
	defer st.Close()
	if err := st.RemoveDevice(context.Background(), ident.Device{User: user, ID: id}); err != nil {
		t.Fatalf("servertest: remove device %s.%d: %v", user, id, err)
	}
}

// accountStore is the running server's account store (whose Close, here, does
// nothing), or the stopped server's account database.
func (s *Server) accountStore(t testing.TB) accounts.Store {
	t.Helper()
	if s.srv != nil {
		return unclosed{s.srv.Accounts()}
	}
	st, err := sqlite.Open(filepath.Join(s.Dir, "accounts.db"), sqlite.Options{})
	if err != nil {
		t.Fatalf("servertest: open accounts: %v", err)
	}
	return st
}

// unclosed is a store whose Close leaves the store open: the server's.
type unclosed struct{ accounts.Store }

func (unclosed) Close() error { return nil }

// SetConfig changes the configuration used by the next Start and returns a
// function that restores the previous one.
func (s *Server) SetConfig(change func(*server.Config)) (restore func()) {
	old := s.cfg
	change(&s.cfg)
	return func() { s.cfg = old }
}
