// Package gateway is courier's connection manager: it holds one WebSocket
// per connected device, authenticates it, streams the device's mailbox in
// order (pending entries first, then live ones), takes acks, read reports,
// presence subscriptions and typing, and closes connections with a reason.
//
// Each connection has a reader goroutine (frames from the device) and a
// writer goroutine (mailbox entries, replies and events to the device). The
// mailbox is the source of truth: the writer reads it from the last seq it
// sent whenever it is told there is something new, so live delivery and
// catch-up after a reconnect are the same code path, and order is mailbox
// order.
package gateway

import (
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/apierr"
	"github.com/courier-im/courier/internal/auth"
	"github.com/courier-im/courier/internal/delivery"
	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox"
	"github.com/courier-im/courier/internal/metrics"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

// ProtocolVersion is the wire protocol version this gateway speaks.
const ProtocolVersion = 1

// WebSocket close codes used besides the standard ones.
const (
	CloseSuperseded   websocket.StatusCode = 4001
	CloseSlowConsumer websocket.StatusCode = 4008
	CloseIdleTimeout  websocket.StatusCode = 4009
	CloseUnauthorized websocket.StatusCode = 4003
)

// Config configures a Gateway.
type Config struct {
	Accounts accounts.Store
	Mailbox  mailbox.Store
	Delivery *delivery.Service
	Auth     *auth.Authenticator
	Metrics  *metrics.Metrics
	Logger   *slog.Logger
	// MaxFrame is the largest client frame, in bytes.
	MaxFrame int
	// Window is how many delivered entries may wait unacked per connection.
	Window int
	// IdleTimeout closes a connection that sent nothing for this long.
	IdleTimeout time.Duration
	// WriteTimeout closes a connection whose writes block this long.
	WriteTimeout time.Duration
	// ShutdownRetryAfter is the base of the retry delay given to clients on
	// shutdown; each client gets a random delay in [base, 2*base).
	ShutdownRetryAfter time.Duration
	// MaxConnsPerAddr caps the connections open (or being opened) from one
	// source address (auth.SourceAddr: the IP, or an IPv6 /64); more are
	// refused with 429 rate_limited. Zero or negative means no cap.
	MaxConnsPerAddr int
}

// Defaults for Config fields left zero.
const (
	DefaultWindow       = 256
	DefaultIdleTimeout  = 90 * time.Second
	DefaultWriteTimeout = 15 * time.Second
)

// Gateway serves device connections. It implements delivery.Notifier.
type Gateway struct {
	cfg Config
	log *slog.Logger

	mu       sync.Mutex
	conns    map[ident.Device]*conn
	online   map[string]int                // user -> connected devices
	watchers map[string]map[*conn]struct{} // user -> subscribers of its presence
	addrs    map[string]int                // source address -> connections (with MaxConnsPerAddr)
	closing  bool
	wg       sync.WaitGroup

	stop chan struct{} // closed on Shutdown
}

// New returns a Gateway.
func New(cfg Config) *Gateway {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Window <= 0 {
		cfg.Window = DefaultWindow
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = DefaultIdleTimeout
	}
	if cfg.WriteTimeout <= 0 {
		cfg.WriteTimeout = DefaultWriteTimeout
	}
	if cfg.MaxFrame <= 0 {
		cfg.MaxFrame = cfg.Delivery.MaxPayload()*cfg.Delivery.MaxPayloads() + 16<<10
	}
	if cfg.ShutdownRetryAfter <= 0 {
		cfg.ShutdownRetryAfter = time.Second
	}
	g := &Gateway{
		cfg:      cfg,
		log:      cfg.Logger,
		conns:    map[ident.Device]*conn{},
		online:   map[string]int{},
		watchers: map[string]map[*conn]struct{}{},
		addrs:    map[string]int{},
		stop:     make(chan struct{}),
	}
	go g.idleSweeper()
	return g
}

// Notify tells the connection of dev, if any, that its mailbox has new
// entries. It never blocks.
func (g *Gateway) Notify(dev ident.Device) {
	g.mu.Lock()
	c := g.conns[dev]
	g.mu.Unlock()
	if c != nil {
		c.poke()
	}
}

// Connections returns the number of open device connections.
func (g *Gateway) Connections() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.conns)
}

// AddrRetryAfter is the retry delay given to a source address that has
// reached MaxConnsPerAddr.
const AddrRetryAfter = 5 * time.Second

// ServeHTTP authenticates the request and upgrades it to a device connection.
func (g *Gateway) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	// The cap on connections per address is checked first: it costs no
	// lookup, and an address at its cap gets nothing more.
	addr := auth.SourceAddr(r.RemoteAddr)
	if !g.admit(addr) {
		g.cfg.Metrics.Connects.WithLabelValues("too_many_connections").Inc()
		apierr.Write(w, http.StatusTooManyRequests, apierr.Detail{Code: "rate_limited",
			Message: "too many connections from this address", RetryAfterMs: AddrRetryAfter.Milliseconds()})
		return
	}
	defer g.release(addr)
	dev, err := g.cfg.Auth.Authenticate(r.Context(), r)
	if err != nil {
		switch {
		case errors.Is(err, auth.ErrUnauthorized):
			g.cfg.Metrics.Connects.WithLabelValues("unauthorized").Inc()
		case errors.Is(err, auth.ErrRateLimited):
			g.cfg.Metrics.Connects.WithLabelValues("rate_limited").Inc()
		default:
			g.cfg.Metrics.Connects.WithLabelValues("unauthorized").Inc()
			g.log.Error("authenticate", "err", err)
		}
		auth.WriteError(w, err)
		return
	}
	g.mu.Lock()
	closing := g.closing
	g.mu.Unlock()
	if closing {
		g.cfg.Metrics.Connects.WithLabelValues("shutting_down").Inc()
		w.Header().Set("Retry-After", "1")
		apierr.Write(w, http.StatusServiceUnavailable, apierr.Detail{Code: "shutting_down", Message: "this server is shutting down; reconnect elsewhere"})
		return
	}
	ws, err := websocket.Accept(w, r, &websocket.AcceptOptions{CompressionMode: websocket.CompressionDisabled})
	if err != nil {
		g.cfg.Metrics.Connects.WithLabelValues("handshake_failed").Inc()
		return // Accept has written the HTTP error
	}
	// The reader enforces MaxFrame itself so that it can say why it closes.
	ws.SetReadLimit(-1)
	c := newConn(g, dev, ws)
	if !g.register(c) {
		g.cfg.Metrics.Connects.WithLabelValues("shutting_down").Inc()
		ws.Close(websocket.StatusGoingAway, "shutting down")
		return
	}
	g.cfg.Metrics.Connects.WithLabelValues("ok").Inc()
	g.cfg.Metrics.Connections.Inc()
	c.run()
	g.cfg.Metrics.Connections.Dec()
	g.unregister(c)
}

// admit counts a connection from addr, unless addr has MaxConnsPerAddr.
func (g *Gateway) admit(addr string) bool {
	if g.cfg.MaxConnsPerAddr <= 0 {
		return true
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.addrs[addr] >= g.cfg.MaxConnsPerAddr {
		return false
	}
	g.addrs[addr]++
	return true
}

// release forgets a connection admitted from addr.
func (g *Gateway) release(addr string) {
	if g.cfg.MaxConnsPerAddr <= 0 {
		return
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.addrs[addr]--; g.addrs[addr] <= 0 {
		delete(g.addrs, addr)
	}
}

// register makes c the connection of its device, superseding an older one.
func (g *Gateway) register(c *conn) bool {
	g.mu.Lock()
	if g.closing {
		g.mu.Unlock()
		return false
	}
	g.wg.Add(1)
	old := g.conns[c.dev]
	g.conns[c.dev] = c
	if old == nil {
		g.online[c.dev.User]++
	}
	cameOnline := old == nil && g.online[c.dev.User] == 1
	g.mu.Unlock()
	if old != nil {
		g.log.Info("device connected again; closing the older connection", "device", c.dev)
		old.closeWith(pb.ErrorCode_ERROR_CODE_SUPERSEDED, "this device connected again elsewhere", CloseSuperseded, 0)
	}
	if cameOnline {
		g.publishPresence(&pb.Presence{User: c.dev.User, Online: true})
	}
	return true
}

func (g *Gateway) unregister(c *conn) {
	defer g.wg.Done()
	g.mu.Lock()
	for _, users := range c.watching {
		if set := g.watchers[users]; set != nil {
			delete(set, c)
			if len(set) == 0 {
				delete(g.watchers, users)
			}
		}
	}
	wentOffline := false
	if g.conns[c.dev] == c {
		delete(g.conns, c.dev)
		g.online[c.dev.User]--
		if g.online[c.dev.User] == 0 {
			delete(g.online, c.dev.User)
			wentOffline = true
		}
	}
	g.mu.Unlock()
	if wentOffline {
		now := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if err := g.cfg.Accounts.SetLastSeen(ctx, c.dev.User, now); err != nil {
			g.log.Warn("record last seen", "user", c.dev.User, "err", err)
		}
		cancel()
		g.publishPresence(&pb.Presence{User: c.dev.User, Online: false, LastSeenMs: now.UnixMilli()})
	}
}

func (g *Gateway) publishPresence(p *pb.Presence) {
	g.mu.Lock()
	subs := make([]*conn, 0, len(g.watchers[p.User]))
	for c := range g.watchers[p.User] {
		subs = append(subs, c)
	}
	g.mu.Unlock()
	for _, c := range subs {
		c.event(&pb.ServerFrame{Body: &pb.ServerFrame_Presence{Presence: p}})
	}
}

// presenceOf returns the current presence of user (who must exist).
func (g *Gateway) presenceOf(ctx context.Context, user string) (*pb.Presence, error) {
	g.mu.Lock()
	online := g.online[user] > 0
	g.mu.Unlock()
	if online {
		return &pb.Presence{User: user, Online: true}, nil
	}
	u, err := g.cfg.Accounts.User(ctx, user)
	if err != nil {
		return nil, err
	}
	p := &pb.Presence{User: user}
	if !u.LastSeen.IsZero() {
		p.LastSeenMs = u.LastSeen.UnixMilli()
	}
	return p, nil
}

// typing relays a typing indicator to the connected devices of to.
func (g *Gateway) typing(from ident.Device, to string, typing bool) {
	ev := &pb.ServerFrame{Body: &pb.ServerFrame_Typing{Typing: &pb.TypingEvent{From: from.User, FromDevice: from.ID, Typing: typing}}}
	g.mu.Lock()
	var targets []*conn
	for dev, c := range g.conns {
		if dev.User == to {
			targets = append(targets, c)
		}
	}
	g.mu.Unlock()
	for _, c := range targets {
		c.event(ev)
	}
}

// idleSweeper closes connections that have sent nothing for IdleTimeout.
// One ticker for all connections instead of a timer each.
func (g *Gateway) idleSweeper() {
	t := time.NewTicker(g.cfg.IdleTimeout / 4)
	defer t.Stop()
	for {
		select {
		case <-g.stop:
			return
		case now := <-t.C:
			limit := now.Add(-g.cfg.IdleTimeout).UnixNano()
			g.mu.Lock()
			var idle []*conn
			for _, c := range g.conns {
				if c.lastRead.Load() < limit {
					idle = append(idle, c)
				}
			}
			g.mu.Unlock()
			for _, c := range idle {
				c.closeWith(pb.ErrorCode_ERROR_CODE_IDLE_TIMEOUT, "nothing received for "+g.cfg.IdleTimeout.String(), CloseIdleTimeout, 0)
			}
		}
	}
}

// Shutdown stops accepting connections, tells every connected device to
// reconnect (each after its own random delay, so that they do not all come
// back at once), and waits for the connections to close or ctx to end.
// Nothing is lost either way: unacked entries stay in the mailboxes.
func (g *Gateway) Shutdown(ctx context.Context) error {
	g.mu.Lock()
	if !g.closing {
		g.closing = true
		close(g.stop)
	}
	conns := make([]*conn, 0, len(g.conns))
	for _, c := range g.conns {
		conns = append(conns, c)
	}
	g.mu.Unlock()
	base := g.cfg.ShutdownRetryAfter
	for _, c := range conns {
		retry := base + time.Duration(rand.Int64N(int64(base)))
		c.closeWith(pb.ErrorCode_ERROR_CODE_SHUTTING_DOWN, "server shutting down; reconnect", websocket.StatusGoingAway, retry)
	}
	done := make(chan struct{})
	go func() { g.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		g.mu.Lock()
		for _, c := range g.conns {
			c.ws.CloseNow()
		}
		g.mu.Unlock()
		return ctx.Err()
	}
}

// Draining reports whether Shutdown has begun.
func (g *Gateway) Draining() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.closing
}

var _ delivery.Notifier = (*Gateway)(nil)

// counter for connection ids in logs.
var connSeq atomic.Uint64
