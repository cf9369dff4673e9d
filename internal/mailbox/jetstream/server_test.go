package jetstream

import (
	"context"
	"io"
	"io/fs"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nuid"
)

// serverConfig describes one in-process nats-server.
type serverConfig struct {
	name      string
	dir       string // JetStream store directory
	port      int    // client port; -1 picks a free one
	syncAlwy  bool   // sync_interval: always
	cluster   string // cluster name, empty for a standalone server
	routePort int
	routes    []string // route URLs of the other nodes
}

// startServer starts an in-process nats-server with JetStream on a file
// store and waits until it takes connections.
func startServer(tb testing.TB, cfg serverConfig) *server.Server {
	tb.Helper()
	opts := &server.Options{
		ServerName: cfg.name,
		Host:       "127.0.0.1",
		Port:       cfg.port,
		JetStream:  true,
		StoreDir:   cfg.dir,
		SyncAlways: cfg.syncAlwy,
		NoLog:      true,
		NoSigs:     true,
	}
	if cfg.cluster != "" {
		opts.Cluster = server.ClusterOpts{Name: cfg.cluster, Host: "127.0.0.1", Port: cfg.routePort}
		for _, r := range cfg.routes {
			u, err := url.Parse(r)
			if err != nil {
				tb.Fatal(err)
			}
			opts.Routes = append(opts.Routes, u)
		}
	}
	s, err := server.NewServer(opts)
	if err != nil {
		tb.Fatalf("nats-server: %v", err)
	}
	go s.Start()
	if !s.ReadyForConnections(20 * time.Second) {
		s.Shutdown()
		tb.Fatalf("nats-server %s did not start", cfg.name)
	}
	return s
}

func connect(tb testing.TB, urls ...string) *nats.Conn {
	tb.Helper()
	nc, err := nats.Connect(strings.Join(urls, ","), nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond))
	if err != nil {
		tb.Fatalf("connect %v: %v", urls, err)
	}
	return nc
}

// freePort returns a TCP port that was free a moment ago.
func freePort(tb testing.TB) int {
	tb.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// uniqueNames returns a fresh stream name and subject prefix.
func uniqueNames() (stream, prefix string) {
	id := nuid.Next()
	return "MB_" + id, "mbt." + strings.ToLower(id)
}

// copyDir copies a directory tree as it is at this moment: taken from a
// running server, it is the image a kill -9 would leave (every write the
// server made, nothing of its shutdown).
func copyDir(src, dst string) error {
	return filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if os.IsNotExist(err) {
				return nil // removed while we walked
			}
			return err
		}
		rel, err := filepath.Rel(src, path)
		if err != nil {
			return err
		}
		target := filepath.Join(dst, rel)
		if d.IsDir() {
			return os.MkdirAll(target, 0o755)
		}
		in, err := os.Open(path)
		if err != nil {
			if os.IsNotExist(err) {
				return nil
			}
			return err
		}
		defer in.Close()
		out, err := os.Create(target)
		if err != nil {
			return err
		}
		if _, err := io.Copy(out, in); err != nil {
			out.Close()
			return err
		}
		return out.Close()
	})
}

func withTestTimeout(tb testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	tb.Cleanup(cancel)
	return ctx
}

func mustOpen(tb testing.TB, nc *nats.Conn, opts Options) *Store {
	tb.Helper()
	st, err := Open(withTestTimeout(tb), nc, opts)
	if err != nil {
		tb.Fatalf("Open: %v", err)
	}
	return st
}
