package jetstream

import (
	"context"
	"errors"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/courier-im/courier/internal/mailbox"
	"github.com/courier-im/courier/internal/mailbox/mailboxtest"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// TestConformance runs the suite with every backend on its own freshly
// named stream of one shared in-process server. Crashes need a server of
// their own: TestConformanceCrash.
func TestConformance(t *testing.T) {
	srv := startServer(t, serverConfig{name: "conformance", dir: t.TempDir(), port: -1, syncAlwy: true})
	t.Cleanup(srv.Shutdown)
	mailboxtest.Run(t, func(t *testing.T) mailboxtest.Backend {
		nc := connect(t, srv.ClientURL())
		t.Cleanup(nc.Close)
		stream, prefix := uniqueNames()
		opts := Options{Stream: stream, SubjectPrefix: prefix}
		t.Cleanup(func() {
			js, err := jetstream.New(nc)
			if err == nil {
				err = js.DeleteStream(context.Background(), stream)
			}
			if err != nil && !errors.Is(err, jetstream.ErrStreamNotFound) {
				t.Errorf("delete stream %s: %v", stream, err)
			}
		})
		return mailboxtest.Backend{Open: func(t *testing.T) mailbox.Store { return mustOpen(t, nc, opts) }}
	})
}

// crashBackend is one in-process server of its own, which Crash kills.
type crashBackend struct {
	mu   sync.Mutex
	dir  string
	srv  *server.Server
	nc   *nats.Conn
	opts Options
}

func (b *crashBackend) open(t *testing.T) mailbox.Store {
	b.mu.Lock()
	defer b.mu.Unlock()
	return mustOpen(t, b.nc, b.opts)
}

// crash takes the image a kill -9 would leave of the server's store
// directory (the server runs with sync_interval: always, so that image is
// also what survives a power cut), shuts the old server down, and starts a
// new one on the image.
func (b *crashBackend) crash(t *testing.T) mailbox.Store {
	b.mu.Lock()
	defer b.mu.Unlock()
	image := filepath.Join(t.TempDir(), "image")
	if err := copyDir(b.dir, image); err != nil {
		t.Fatalf("crash image: %v", err)
	}
	b.nc.Close()
	b.srv.Shutdown()
	b.srv.WaitForShutdown()
	b.dir = image
	b.srv = startServer(t, serverConfig{name: "crash", dir: image, port: -1, syncAlwy: true})
	b.nc = connect(t, b.srv.ClientURL())
	// The stream is recovered in the background: wait until it answers.
	js, err := jetstream.New(b.nc)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := js.Stream(ctx, b.opts.Stream)
		cancel()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("stream not recovered after crash: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return mustOpen(t, b.nc, b.opts)
}

// TestConformanceCrash runs the suite with a server per backend, so that
// Crash can kill it.
func TestConformanceCrash(t *testing.T) {
	mailboxtest.Run(t, func(t *testing.T) mailboxtest.Backend {
		dir := t.TempDir()
		b := &crashBackend{dir: dir}
		b.srv = startServer(t, serverConfig{name: "crash", dir: dir, port: -1, syncAlwy: true})
		b.nc = connect(t, b.srv.ClientURL())
		stream, prefix := uniqueNames()
		b.opts = Options{Stream: stream, SubjectPrefix: prefix}
		t.Cleanup(func() {
			b.mu.Lock()
			defer b.mu.Unlock()
			js, err := jetstream.New(b.nc)
			if err == nil {
				err = js.DeleteStream(context.Background(), stream)
			}
			if err != nil && !errors.Is(err, jetstream.ErrStreamNotFound) {
				t.Errorf("delete stream %s: %v", stream, err)
			}
			b.nc.Close()
			b.srv.Shutdown()
		})
		return mailboxtest.Backend{Open: b.open, Crash: b.crash}
	})
}
