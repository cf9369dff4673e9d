// Package gateway is courier's connection manager: it holds one WebSocket
// per connected device, authenticates it, streams the device's mailbox in
// order (pending entries first, then live ones), takes acks, read reports,
// presence subscriptions and typing, and closes connections with a reason.
//
// On the goroutine transport each connection has a reader goroutine
// (frames from the device) and a writer goroutine (mailbox entries,
// replies and events to the device); on the epoll transport (epoll.go, the
// server's default) an idle connection has neither: event loops on epoll
// read the sockets and a worker pool runs the same frame handling. The mailbox is the source of truth: the writer (or
// the epoll transport's pump) reads it from the last seq it sent whenever
// it is told there is something new, so live delivery and catch-up after a
// reconnect are the same code path, and order is mailbox order.
package gateway

import (
	"context"
	"errors"
	"fmt"
	"iter"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"strconv"
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
	// MaxConns is the most connections this gateway holds: from
	// AdmitWatermark of it on, new ones are refused with 503 overloaded
	// (admission.go). Zero or negative means no cap.
	MaxConns int
	// MaxMemory is the process memory, in bytes, that admission measures
	// against: from AdmitWatermark of it on, connections are refused. Zero
	// means the Go memory limit (GOMEMLIMIT, debug.SetMemoryLimit) if one
	// is set; negative, or zero with no Go limit, turns the signal off.
	MaxMemory int64
	// AdmitWatermark is the fraction of MaxConns and MaxMemory from which
	// connections are refused, in (0, 1]; zero means
	// DefaultAdmitWatermark.
	AdmitWatermark float64
	// AdmitCPU, if positive (at most 1), refuses connections while the
	// process's CPU use, smoothed over a few seconds, is at least this
	// fraction of GOMAXPROCS cores. Zero: CPU is measured but never
	// refuses.
	AdmitCPU float64
	// Cluster, if set, links this gateway to the other nodes (see
	// cluster.go); nil means a single node.
	Cluster Cluster
	// Transport is how connections are served once upgraded:
	// TransportGoroutine (the default: a reader and a writer goroutine
	// each) or TransportEpoll (an event loop; see epoll.go).
	Transport string
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

	mu sync.Mutex
	// users holds the connections, by user: the first of each user's
	// connections, which chains the others (conn.next). One entry per
	// user, rather than one per device and a count of devices per user.
	users    map[string]*conn
	nconns   int                           // connections in users
	sessions map[*conn]string              // connection -> session id (with Cluster)
	watchers map[string]map[*conn]struct{} // user -> subscribers of its presence
	addrs    map[string]*addrSlot          // source address -> its connections (with MaxConnsPerAddr)
	closing  bool
	wg       sync.WaitGroup

	stop chan struct{} // closed on Shutdown

	ep *epoll // the epoll transport, if chosen

	spares *spares // goroutines for the connections' pipelines

	seen *seenWriter // last-seen times of users gone offline, written in batches

	ops opContexts // contexts for the connections' storage work (conn.go)

	load *admission // admission control (admission.go)
}

// New returns a Gateway. It panics if the gateway cannot start, which only
// the epoll transport can fail to do: Open reports that as an error.
func New(cfg Config) *Gateway {
	g, err := Open(cfg)
	if err != nil {
		panic(err)
	}
	return g
}

// Open returns a Gateway, with its transport started.
func Open(cfg Config) (*Gateway, error) {
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
	load, err := newAdmission(cfg)
	if err != nil {
		return nil, err
	}
	g := &Gateway{
		load:     load,
		cfg:      cfg,
		log:      cfg.Logger,
		users:    map[string]*conn{},
		sessions: map[*conn]string{},
		watchers: map[string]map[*conn]struct{}{},
		addrs:    map[string]*addrSlot{},
		stop:     make(chan struct{}),
	}
	g.seen = newSeenWriter(cfg.Accounts, g.log.Warn)
	g.spares = newSpares(g.stop)
	switch cfg.Transport {
	case "", TransportGoroutine:
	case TransportEpoll:
		ep, err := newEpoll(g)
		if err != nil {
			return nil, err
		}
		g.ep = ep
	default:
		return nil, fmt.Errorf("gateway: unknown transport %q (want %q or %q)", cfg.Transport, TransportGoroutine, TransportEpoll)
	}
	go g.idleSweeper()
	go g.admissionSampler()
	g.log.Info("admission control", "max_conns", load.maxConns, "max_memory", load.memLimit,
		"watermark", load.watermark, "cpu_watermark", load.cpuMark)
	return g, nil
}

// connLocked returns the connection of dev, nil if none. g.mu must be
// held.
func (g *Gateway) connLocked(dev ident.Device) *conn {
	for c := g.users[dev.User]; c != nil; c = c.next {
		if c.dev.ID == dev.ID {
			return c
		}
	}
	return nil
}

// connsLocked yields every connection. g.mu must be held.
func (g *Gateway) connsLocked() iter.Seq[*conn] {
	return func(yield func(*conn) bool) {
		for _, c := range g.users {
			for ; c != nil; c = c.next {
				if !yield(c) {
					return
				}
			}
		}
	}
}

// Notify tells the connection of dev, if any, that its mailbox has new
// entries. It never blocks.
func (g *Gateway) Notify(dev ident.Device) {
	g.mu.Lock()
	c := g.connLocked(dev)
	g.mu.Unlock()
	if c != nil {
		c.hand.markStale()
		c.poke()
	}
}

// Connections returns the number of open device connections.
func (g *Gateway) Connections() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.nconns
}

// AddrRetryAfter is the retry delay given to a source address that has
// reached MaxConnsPerAddr.
const AddrRetryAfter = 5 * time.Second

// ServeHTTP authenticates the request and upgrades it to a device connection.
func (g *Gateway) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	// The cap on connections per address is checked first: it costs no
	// lookup, and an address at its cap gets nothing more.
	addr, ok := g.admit(auth.SourceAddr(r.RemoteAddr))
	if !ok {
		g.cfg.Metrics.Connects.WithLabelValues("too_many_connections").Inc()
		apierr.Write(w, http.StatusTooManyRequests, apierr.Detail{Code: "rate_limited",
			Message: "too many connections from this address", RetryAfterMs: AddrRetryAfter.Milliseconds()})
		return
	}
	// The address is released when the connection ends: here, or, for a
	// connection handed to the epoll transport, when that one ends.
	handedOver := false
	defer func() {
		if !handedOver {
			g.release(addr)
		}
	}()
	// Then the load: over a watermark, the attempt is refused before any
	// work is spent on it (admission.go).
	if retry, refuse := g.load.enter(); refuse {
		g.refuseOverloaded(w, retry)
		return
	}
	// A server going down refuses before authenticating: during a
	// shutdown under load, devices told to come back try again while it
	// drains, and each answer should cost it as little as possible.
	if g.Draining() {
		g.refuseDraining(w)
		return
	}
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
		g.refuseDraining(w)
		return
	}
	// In a cluster the device is registered in the session directory
	// before it is accepted, so that the workers find it from its first
	// frame on, and a directory that cannot be reached refuses it with a
	// retry rather than leaving it unreachable.
	session := ""
	if g.cfg.Cluster != nil {
		session = newSessionID()
		ctx, cancel := context.WithTimeout(r.Context(), clusterTimeout)
		err := g.cfg.Cluster.Register(ctx, dev, session)
		cancel()
		if err != nil {
			g.log.Error("register the session in the directory", "device", dev, "err", err)
			g.cfg.Metrics.Connects.WithLabelValues("directory_unavailable").Inc()
			w.Header().Set("Retry-After", "5")
			apierr.Write(w, http.StatusServiceUnavailable, apierr.Detail{Code: "unavailable",
				Message: "the session directory is unavailable; retry", RetryAfterMs: 5000})
			return
		}
	}
	if g.ep != nil {
		handedOver = g.ep.accept(w, r, dev, session, addr)
		return
	}
	// The socket is wrapped so that the writer can write several frames
	// with one write (cork.go).
	cw := &corkWriter{ResponseWriter: w, cc: &corkConn{}}
	ws, err := websocket.Accept(cw, r, &websocket.AcceptOptions{CompressionMode: websocket.CompressionDisabled})
	if err != nil {
		g.cfg.Metrics.Connects.WithLabelValues("handshake_failed").Inc()
		g.clusterUnregister(dev, session)
		return // Accept has written the HTTP error
	}
	// The reader enforces MaxFrame itself so that it can say why it closes.
	ws.SetReadLimit(-1)
	c := newConn(g, dev, ws)
	if cw.cc.Conn != nil {
		c.gr.cc = cw.cc
	}
	if !g.registerSession(c, session) {
		g.cfg.Metrics.Connects.WithLabelValues("shutting_down").Inc()
		g.clusterUnregister(dev, session)
		ws.Close(websocket.StatusGoingAway, "shutting down")
		return
	}
	g.cfg.Metrics.Connects.WithLabelValues("ok").Inc()
	g.cfg.Metrics.Connections.Inc()
	c.run()
	g.cfg.Metrics.Connections.Dec()
	g.unregister(c)
}

// refuseDraining answers a connection attempt made while the server shuts
// down: 503 with a jittered retry-after (the same spread as the one given
// to the connections it closes), in whole seconds in the header and in
// milliseconds in the body.
func (g *Gateway) refuseDraining(w http.ResponseWriter) {
	g.cfg.Metrics.Connects.WithLabelValues("shutting_down").Inc()
	retry := g.drainRetryAfter()
	w.Header().Set("Retry-After", strconv.FormatInt(int64((retry+time.Second-1)/time.Second), 10))
	apierr.Write(w, http.StatusServiceUnavailable, apierr.Detail{Code: "shutting_down",
		Message: "this server is shutting down; reconnect elsewhere", RetryAfterMs: retry.Milliseconds()})
}

// addrSlot counts the connections from one source address (with
// MaxConnsPerAddr); a connection keeps a pointer to its address's, so
// that it holds no copy of the address.
type addrSlot struct {
	addr string
	n    int
}

// admit counts a connection from addr, unless addr has MaxConnsPerAddr.
// The slot returned is released by release (nil without a cap).
func (g *Gateway) admit(addr string) (*addrSlot, bool) {
	if g.cfg.MaxConnsPerAddr <= 0 {
		return nil, true
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	s := g.addrs[addr]
	if s == nil {
		s = &addrSlot{addr: addr}
		g.addrs[addr] = s
	}
	if s.n >= g.cfg.MaxConnsPerAddr {
		return nil, false
	}
	s.n++
	return s, true
}

// release forgets a connection admitted with slot s, and the admission
// count it holds.
func (g *Gateway) release(s *addrSlot) {
	g.load.leave()
	if s == nil {
		return
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if s.n--; s.n <= 0 {
		delete(g.addrs, s.addr)
	}
}

// register makes c the connection of its device, superseding an older one.
func (g *Gateway) register(c *conn) bool { return g.registerSession(c, "") }

// registerSession is register for a connection registered in the cluster's
// directory as session (empty without a cluster).
func (g *Gateway) registerSession(c *conn, session string) bool {
	g.mu.Lock()
	if g.closing {
		g.mu.Unlock()
		return false
	}
	g.wg.Add(1)
	head := g.users[c.dev.User]
	old := g.connLocked(c.dev)
	if old == nil {
		c.next = head
		g.users[c.dev.User] = c
		g.nconns++
	} else {
		g.replaceLocked(old, c)
	}
	if session != "" {
		g.sessions[c] = session
	}
	cameOnline := head == nil
	g.mu.Unlock()
	if old != nil {
		g.log.Info("device connected again; closing the older connection", "device", c.dev)
		old.closeWith(pb.ErrorCode_ERROR_CODE_SUPERSEDED, "this device connected again elsewhere", CloseSuperseded, 0)
	}
	// In a cluster, presence changes come from the directory (for every
	// node's devices, this one's included).
	if cameOnline && g.cfg.Cluster == nil {
		g.publishPresence(&pb.Presence{User: c.dev.User, Online: true})
	}
	return true
}

// clusterUnregister removes a session from the directory (no-op without a
// cluster) and reports whether that took the user offline.
func (g *Gateway) clusterUnregister(dev ident.Device, session string) bool {
	if g.cfg.Cluster == nil || session == "" {
		return false
	}
	ctx, cancel := context.WithTimeout(context.Background(), clusterTimeout)
	defer cancel()
	off, err := g.cfg.Cluster.Unregister(ctx, dev, session)
	if err != nil {
		// The registration expires after its TTL instead.
		g.log.Warn("unregister the session from the directory", "device", dev, "err", err)
	}
	return off
}

// replaceLocked puts c in the place of old, a connection of the same
// device, in g.users. g.mu must be held.
func (g *Gateway) replaceLocked(old, c *conn) {
	c.next, old.next = old.next, nil
	head := g.users[c.dev.User]
	if head == old {
		g.users[c.dev.User] = c
		return
	}
	for p := head; p != nil; p = p.next {
		if p.next == old {
			p.next = c
			return
		}
	}
}

// removeLocked takes c out of g.users, if it is there, and reports
// whether it was, and whether it was the user's last connection. g.mu
// must be held.
func (g *Gateway) removeLocked(c *conn) (removed, last bool) {
	head := g.users[c.dev.User]
	if head == c {
		if c.next == nil {
			delete(g.users, c.dev.User)
		} else {
			g.users[c.dev.User] = c.next
		}
		c.next = nil
		g.nconns--
		return true, g.users[c.dev.User] == nil
	}
	for p := head; p != nil; p = p.next {
		if p.next == c {
			p.next, c.next = c.next, nil
			g.nconns--
			return true, false
		}
	}
	return false, false
}

func (g *Gateway) unregister(c *conn) {
	defer g.wg.Done()
	g.mu.Lock()
	if c.watching != nil {
		for _, users := range *c.watching {
			if set := g.watchers[users]; set != nil {
				delete(set, c)
				if len(set) == 0 {
					delete(g.watchers, users)
				}
			}
		}
	}
	session := g.sessions[c]
	delete(g.sessions, c)
	_, wentOffline := g.removeLocked(c)
	g.mu.Unlock()
	if g.cfg.Cluster != nil {
		// The directory knows whether the user is still connected through
		// another node; it publishes the offline event itself.
		wentOffline = g.clusterUnregister(c.dev, session)
	}
	if wentOffline {
		// Queued and written in a batch with others (lastseen.go):
		// presence serves it from the queue until then.
		now := time.Now()
		g.seen.add(c.dev.User, now)
		if g.cfg.Cluster == nil {
			g.publishPresence(&pb.Presence{User: c.dev.User, Online: false, LastSeenMs: now.UnixMilli()})
		}
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
	if g.cfg.Cluster != nil {
		return g.clusterPresence(ctx, user)
	}
	g.mu.Lock()
	online := g.users[user] != nil
	g.mu.Unlock()
	if online {
		return &pb.Presence{User: user, Online: true}, nil
	}
	u, err := g.cfg.Accounts.User(ctx, user)
	if err != nil {
		return nil, err
	}
	seen := u.LastSeen
	if t, ok := g.seen.lastSeen(user); ok && t.After(seen) {
		seen = t
	}
	p := &pb.Presence{User: user}
	if !seen.IsZero() {
		p.LastSeenMs = seen.UnixMilli()
	}
	return p, nil
}

// clusterPresence is presenceOf from the directory: online anywhere in
// the cluster, and the later of the directory's and the account's last
// seen.
func (g *Gateway) clusterPresence(ctx context.Context, user string) (*pb.Presence, error) {
	u, err := g.cfg.Accounts.User(ctx, user) // the user must exist
	if err != nil {
		return nil, err
	}
	online, seen, err := g.cfg.Cluster.Presence(ctx, user)
	if err != nil {
		return nil, err
	}
	if online {
		return &pb.Presence{User: user, Online: true}, nil
	}
	if u.LastSeen.After(seen) {
		seen = u.LastSeen
	}
	if t, ok := g.seen.lastSeen(user); ok && t.After(seen) {
		seen = t
	}
	p := &pb.Presence{User: user}
	if !seen.IsZero() {
		p.LastSeenMs = seen.UnixMilli()
	}
	return p, nil
}

// typing relays a typing indicator to the connected devices of to, here
// and, in a cluster, on the other nodes.
func (g *Gateway) typing(from ident.Device, to string, typing bool) {
	g.localTyping(from, to, typing)
	if g.cfg.Cluster != nil {
		g.cfg.Cluster.Typing(from, to, typing)
	}
}

// localTyping relays a typing indicator to the devices of to connected to
// this gateway.
func (g *Gateway) localTyping(from ident.Device, to string, typing bool) {
	ev := &pb.ServerFrame{Body: &pb.ServerFrame_Typing{Typing: &pb.TypingEvent{From: from.User, FromDevice: from.ID, Typing: typing}}}
	g.mu.Lock()
	var targets []*conn
	for c := g.users[to]; c != nil; c = c.next {
		targets = append(targets, c)
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
			// Seconds: a connection is idle once the second of its
			// last frame is before the second IdleTimeout ago, so never
			// early, and at most a second late.
			limit := uint32(now.Add(-g.cfg.IdleTimeout).Unix())
			g.mu.Lock()
			var idle []*conn
			for c := range g.connsLocked() {
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
	start := time.Now()
	g.mu.Lock()
	if !g.closing {
		g.closing = true
		close(g.stop)
	}
	conns := make([]*conn, 0, g.nconns)
	for c := range g.connsLocked() {
		conns = append(conns, c)
	}
	g.mu.Unlock()
	for _, c := range conns {
		c.closeWith(pb.ErrorCode_ERROR_CODE_SHUTTING_DOWN, "server shutting down; reconnect", websocket.StatusGoingAway, g.drainRetryAfter())
	}
	done := make(chan struct{})
	go func() { g.wg.Wait(); close(done) }()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		err = ctx.Err()
		g.mu.Lock()
		for c := range g.connsLocked() {
			c.closeNow()
		}
		g.mu.Unlock()
	}
	// The last-seen times of everyone who went offline are written before
	// the account store closes: in one batch, not one commit each.
	sctx := ctx
	if err != nil {
		var cancel context.CancelFunc
		sctx, cancel = context.WithTimeout(context.Background(), seenTimeout)
		defer cancel()
	}
	closed := time.Now()
	if serr := g.seen.close(sctx); serr != nil && err == nil {
		err = fmt.Errorf("gateway: recording last-seen times: %w", serr)
	}
	g.stopTransport()
	g.log.Info("connections closed", "connections", len(conns), "closing", closed.Sub(start).Round(time.Millisecond),
		"last_seen", time.Since(closed).Round(time.Millisecond), "err", err)
	return err
}

// drainRetryAfter returns a retry delay for a device told to come back
// later because this server is going down: random in [base, 2*base), so
// that the devices spread their returns.
func (g *Gateway) drainRetryAfter() time.Duration {
	base := g.cfg.ShutdownRetryAfter
	return base + time.Duration(rand.Int64N(int64(base)))
}

// transportStopTimeout bounds how long Shutdown waits for the epoll
// transport's event loops to stop once every connection has ended.
const transportStopTimeout = 3 * time.Second

// stopTransport stops the epoll transport's event loops and workers, if
// any, once every connection has ended; the wait for the loops is bounded
// (they are left to the process's exit, with a warning, past it).
func (g *Gateway) stopTransport() {
	if g.ep == nil {
		return
	}
	if !g.ep.shutdown(transportStopTimeout) {
		g.log.Warn("epoll transport: event loops did not stop in time; left to the process exit", "waited", transportStopTimeout)
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
var connSeq atomic.Uint32
