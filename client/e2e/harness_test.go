package e2e_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/courier-im/courier/client"
	"github.com/courier-im/courier/client/e2e"
	"github.com/courier-im/courier/client/localstore"
	"github.com/courier-im/courier/internal/servertest"
)

// party is one device with end-to-end encryption: its local store, Engine
// and Client, which can be stopped and started again on the same store.
type party struct {
	t     testing.TB
	creds client.Credentials
	dir   string

	// wrap, if set, wraps the Engine as the Client's Cipher.
	wrap func(*e2e.Engine) client.Cipher
	// plain runs the Client without encryption (benchmarks' baseline).
	plain bool

	mu      sync.Mutex
	events  []client.Event
	notices []e2e.Notice
	changed chan struct{}

	store  *localstore.Store
	eng    *e2e.Engine
	c      *client.Client
	cancel context.CancelFunc
	done   chan error
}

func register(t testing.TB, srv *servertest.Server, name string) client.Credentials {
	t.Helper()
	creds, err := client.Register(context.Background(), srv.URL, name, name+"-phone")
	if err != nil {
		t.Fatalf("register %s: %v", name, err)
	}
	return creds
}

// newParty opens the device's store and Engine and publishes its keys;
// start connects it.
func newParty(t testing.TB, creds client.Credentials) *party {
	p := &party{t: t, creds: creds, dir: t.TempDir(), changed: make(chan struct{})}
	p.open()
	if err := p.eng.Publish(context.Background()); err != nil {
		t.Fatalf("%s: publish: %v", p.name(), err)
	}
	t.Cleanup(p.stop)
	return p
}

func (p *party) name() string { return client.Device{User: p.creds.User, ID: p.creds.Device}.String() }

func (p *party) open() {
	st, err := localstore.Open(filepath.Join(p.dir, "local.db"))
	if err != nil {
		p.t.Fatal(err)
	}
	eng, err := e2e.Open(e2e.Config{Store: st, Credentials: p.creds, Notify: p.notice})
	if err != nil {
		p.t.Fatal(err)
	}
	p.store, p.eng = st, eng
}

func (p *party) notice(n e2e.Notice) {
	p.mu.Lock()
	p.notices = append(p.notices, n)
	p.mu.Unlock()
	p.poke()
}

func (p *party) handle(ev client.Event) {
	if m, ok := ev.(*client.MessageEvent); ok && m.Err == nil {
		if _, err := p.store.RecordReceived(m); err != nil {
			p.t.Errorf("%s: record: %v", p.name(), err)
		}
	}
	p.mu.Lock()
	p.events = append(p.events, ev)
	p.mu.Unlock()
	p.poke()
}

func (p *party) poke() {
	p.mu.Lock()
	close(p.changed)
	p.changed = make(chan struct{})
	p.mu.Unlock()
}

// start makes the Client and runs it until it has synced.
func (p *party) start() {
	p.t.Helper()
	if p.store == nil {
		p.open()
	}
	var cipher client.Cipher = p.eng
	if p.wrap != nil {
		cipher = p.wrap(p.eng)
	}
	if p.plain {
		cipher = nil
	}
	c, err := client.New(client.Config{Credentials: p.creds, Handler: p.handle, Cipher: cipher,
		Seen: p.store, Outbox: p.store.Outbox(), MinBackoff: 10 * time.Millisecond, MaxBackoff: 200 * time.Millisecond})
	if err != nil {
		p.t.Fatal(err)
	}
	if !p.plain {
		p.eng.Bind(c)
	}
	ctx, cancel := context.WithCancel(context.Background())
	p.c, p.cancel, p.done = c, cancel, make(chan error, 1)
	n := p.count(func(ev client.Event) bool { _, ok := ev.(*client.SyncedEvent); return ok })
	go func() { p.done <- c.Run(ctx) }()
	p.waitFor("synced", func() bool {
		return p.count(func(ev client.Event) bool { _, ok := ev.(*client.SyncedEvent); return ok }) > n
	})
}

// stop closes the Client, the Engine and the store.
func (p *party) stop() {
	if p.c != nil {
		p.cancel()
		<-p.done
		p.c.Close()
		p.c = nil
	}
	if p.store != nil {
		p.eng.Close()
		p.store.Close()
		p.store, p.eng = nil, nil
	}
}

func (p *party) count(match func(client.Event) bool) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, ev := range p.events {
		if match(ev) {
			n++
		}
	}
	return n
}

func (p *party) waitFor(what string, cond func() bool) {
	p.t.Helper()
	deadline := time.After(20 * time.Second)
	for {
		p.mu.Lock()
		ch := p.changed
		p.mu.Unlock()
		if cond() {
			return
		}
		select {
		case <-ch:
		case <-time.After(50 * time.Millisecond):
		case <-deadline:
			p.t.Fatalf("%s: timed out waiting for %s; events: %s", p.name(), what, p.describe())
		}
	}
}

func (p *party) describe() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var b strings.Builder
	for _, ev := range p.events {
		switch ev := ev.(type) {
		case *client.MessageEvent:
			fmt.Fprintf(&b, "[msg from %s.%d %q err=%v] ", ev.From, ev.FromDevice, ev.Body, ev.Err)
		default:
			fmt.Fprintf(&b, "[%T] ", ev)
		}
	}
	for _, n := range p.notices {
		fmt.Fprintf(&b, "[notice %d %s] ", n.Kind, n.Text)
	}
	return b.String()
}

// messages returns the bodies of the messages received (not sync copies)
// from user.
func (p *party) messages(from string) []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []string
	for _, ev := range p.events {
		if m, ok := ev.(*client.MessageEvent); ok && m.From == from && m.Err == nil && !m.Sync {
			out = append(out, string(m.Body))
		}
	}
	return out
}

func (p *party) waitMessage(from, body string) {
	p.t.Helper()
	p.waitFor(fmt.Sprintf("%q from %s", body, from), func() bool {
		for _, m := range p.messages(from) {
			if m == body {
				return true
			}
		}
		return false
	})
}

func (p *party) send(to, body string) client.Sent {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	sent, err := p.c.Send(ctx, to, []byte(body))
	if err != nil {
		p.t.Fatalf("%s: send to %s: %v", p.name(), to, err)
	}
	return sent
}

func (p *party) noticesOf(kind e2e.NoticeKind) []e2e.Notice {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []e2e.Notice
	for _, n := range p.notices {
		if n.Kind == kind {
			out = append(out, n)
		}
	}
	return out
}

func (p *party) decryptErrors() []*e2e.DecryptError {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []*e2e.DecryptError
	for _, ev := range p.events {
		var de *e2e.DecryptError
		if m, ok := ev.(*client.MessageEvent); ok && errors.As(m.Err, &de) {
			out = append(out, de)
		}
	}
	return out
}

// count of message events from user with this body (exactly-once checks).
func (p *party) countBody(from, body string) int {
	n := 0
	for _, m := range p.messages(from) {
		if m == body {
			n++
		}
	}
	return n
}
