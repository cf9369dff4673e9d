package gateway

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
	"github.com/lesismal/nbio"
	"github.com/lesismal/nbio/logging"
	"github.com/lesismal/nbio/nbhttp"
	nbws "github.com/lesismal/nbio/nbhttp/websocket"

	"github.com/courier-im/courier/internal/auth"
	"github.com/courier-im/courier/internal/delivery"
	"github.com/courier-im/courier/internal/ident"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

// Transports (Config.Transport).
const (
	// TransportGoroutine serves each connection with a reader and a writer
	// goroutine on coder/websocket: simple, and about 50 KiB per idle
	// connection (two stacks, net/http's buffers).
	TransportGoroutine = "goroutine"
	// TransportEpoll serves connections from nbio's event loops: an idle
	// connection has no goroutine, no buffer and no timer, only its
	// state. The HTTP request that opens it is still served by net/http
	// (on the same port), which hands the socket to the event loop once
	// the WebSocket handshake is done.
	TransportEpoll = "epoll"
)

// The epoll transport.
//
// The socket of an upgraded connection is taken from net/http and added to
// one of nbio's pollers (one per CPU), which reads it when it is readable,
// into a buffer shared by the poller, and parses WebSocket frames from it;
// a partial frame is kept in a pooled buffer until it is complete. A
// complete message is handed to nbio's bounded pool of workers, one job
// at a time per connection (so frames are handled in order), which runs
// the same frame handling as the goroutine transport (conn.go): storage
// work may block there, never on a poller. Writes never block: nbio
// writes what the socket takes and keeps the rest until it is writable,
// within a write deadline (WriteTimeout) after which the connection is cut
// off as a slow consumer.
//
// The mailbox is streamed by a pump (pumpPoke) that runs on the same
// worker pool only while there is something to send: Notify and acks poke
// it; it reads the mailbox from the last seq sent, as the goroutine
// transport's writer does, until the window is full or the mailbox is
// drained, then returns.
//
// Idle connections are closed by the gateway's sweeper, as on the other
// transport; nbio's keepalive timers are off.
type epoll struct {
	g      *Gateway
	engine *nbhttp.Engine
	up     *nbws.Upgrader
	pool   *workers // runs frame handling and pumps

	// locks publishes each connection to the pollers and workers: nbio
	// keeps it in a field it writes and reads without synchronisation,
	// so accept sets it, and everyone else reads it, under one of these
	// locks (chosen by socket descriptor).
	locks [64]sync.Mutex
}

// epollState is a connection's state on the epoll transport, held in its
// conn (ev). The source address admit counted is not kept: it is the
// socket's remote address, which nbio keeps anyway (see sourceAddr).
type epollState struct {
	scan    frameScan // frame headers seen by onData (pollers only)
	pending uint64    // entries sent before Synced (pump only)

	evBatch // frames waiting to be written (evwrite.go)

	// pump: 0 idle, 1 running, 2 running and poked again.
	pump   atomic.Int32
	flags  atomic.Uint32 // evReady, evDiscard, evEnded: each set once, never cleared
	synced bool          // Synced has been sent (pump only)
}

// Flags of epollState.
const (
	evReady   = 1 << iota // Hello sent and registered: frames are handled
	evDiscard             // closing: input is no longer parsed
	evEnded               // evEnd has run
)

// has reports whether flag f is set.
func (s *epollState) has(f uint32) bool { return s.flags.Load()&f != 0 }

// set sets flag f and reports whether it was set already.
func (s *epollState) set(f uint32) (was bool) { return s.flags.Or(f)&f != 0 }

func newEpoll(g *Gateway) (*epoll, error) {
	// nbio logs to stdout at Info by default; courier logs with slog.
	logging.SetLevel(logging.LevelError)
	n := runtime.GOMAXPROCS(0)
	// The most a connection may have written and not yet taken by its
	// socket: a full window of the largest entries, and room for replies.
	// The write deadline is renewed by each write, so a device that keeps
	// sending but never reads would otherwise grow its backlog forever;
	// past this it is cut off as a slow consumer.
	maxPending := g.cfg.Window*(g.cfg.Delivery.MaxPayload()+4<<10) + g.cfg.MaxFrame
	// Frame handling and mailbox reads: a bounded pool of workers that
	// live on between jobs.
	pool := newWorkers(256*n, g.log)
	engine := nbhttp.NewEngine(nbhttp.Config{
		MaxWriteBufferSize: maxPending,
		Name:               "courier-gateway",
		NPoller:            n,
		// One read buffer per poller, shared by all its connections.
		ReadBufferSize:          16 << 10,
		ReleaseWebsocketPayload: true,
		MaxLoad:                 1 << 22,
		ServerExecutor:          pool.Go,
		SupportServerOnly:       true,
	})
	e := &epoll{g: g, engine: engine, pool: pool}
	up := nbws.NewUpgrader()
	e.up = up
	up.Engine = engine
	// The gateway's idle sweeper closes idle connections; no timer each.
	up.KeepaliveTime = 0
	up.MessageLengthLimit = g.cfg.MaxFrame
	up.OnMessage(func(wsc *nbws.Conn, typ nbws.MessageType, data []byte) {
		c := e.sessionConn(wsc)
		if c == nil || !c.ev.awaitReady() || c.ev.has(evDiscard) {
			return
		}
		c.lastRead.Store(time.Now().UnixNano())
		mt := websocket.MessageBinary
		if typ != nbws.BinaryMessage {
			mt = websocket.MessageText
		}
		// data is nbio's pooled buffer, released on return: decoding
		// copies what it keeps.
		c.startFrame(mt, data)
	})
	up.OnClose(func(wsc *nbws.Conn, err error) {
		// Before it is ready, accept ends the connection itself.
		if c := e.connOf(wsc); c != nil && c.ev.has(evReady) {
			c.evEnd(err)
		}
	})
	// Every read of an upgraded connection comes here first (rather than
	// to the handler nbio sets for each connection, which accept could
	// only replace once the connection is already being read): see onData.
	engine.Engine.OnData(func(nbc *nbio.Conn, data []byte) {
		wsc, _ := nbc.Session().(*nbws.Conn)
		if wsc == nil {
			nbc.Close()
			return
		}
		if c := e.sessionConn(wsc); c != nil {
			c.onData(data)
		} else {
			nbc.Close()
		}
	})
	if err := engine.Start(); err != nil {
		pool.Stop()
		return nil, err
	}
	return e, nil
}

// lockOf returns the lock that guards the session of wsc.
func (e *epoll) lockOf(wsc *nbws.Conn) *sync.Mutex {
	fd := 0
	if nbc, ok := wsc.Conn.(*nbio.Conn); ok {
		fd = nbc.Hash()
	}
	return &e.locks[fd&(len(e.locks)-1)]
}

// setConn attaches c to wsc, for connOf.
func (e *epoll) setConn(wsc *nbws.Conn, c *conn) {
	l := e.lockOf(wsc)
	l.Lock()
	wsc.SetSession(c)
	l.Unlock()
}

// connOf returns the connection attached to wsc, nil if none is yet.
func (e *epoll) connOf(wsc *nbws.Conn) *conn {
	l := e.lockOf(wsc)
	l.Lock()
	c, _ := wsc.Session().(*conn)
	l.Unlock()
	return c
}

// accept upgrades the request of dev (authenticated, registered in the
// cluster's directory as session, admitted from its source address) and
// hands the connection to the event loop. It reports whether it did: if
// so, the connection releases its address when it ends (see sourceAddr).
func (e *epoll) accept(w http.ResponseWriter, r *http.Request, dev ident.Device, session string) bool {
	g := e.g
	wsc, err := e.up.UpgradeAndTransferConnToPoller(w, r, nil)
	if err != nil {
		g.cfg.Metrics.Connects.WithLabelValues("handshake_failed").Inc()
		g.clusterUnregister(dev, session)
		return false // Upgrade has written the HTTP error
	}
	nbc, ok := wsc.Conn.(*nbio.Conn)
	if !ok {
		// Only a plain TCP connection can be moved to the event loop.
		g.log.Error("epoll transport: connection is not TCP; closing it", "type", fmt.Sprintf("%T", wsc.Conn))
		g.cfg.Metrics.Connects.WithLabelValues("handshake_failed").Inc()
		g.clusterUnregister(dev, session)
		wsc.Conn.Close()
		return false
	}
	// The user name is a piece of the decoded Authorization header; a
	// copy of it alone is kept for the connection's lifetime.
	dev.User = strings.Clone(dev.User)
	c := newConn(g, dev, nil)
	c.nb = wsc
	// From here on the pollers parse its input (onData); frames wait for
	// ready.
	e.setConn(wsc, c)
	if !c.write(&pb.ServerFrame{Body: &pb.ServerFrame_Hello{Hello: &pb.Hello{
		ProtocolVersion: ProtocolVersion,
		Device:          &pb.DeviceAddress{User: c.dev.User, Device: c.dev.ID},
		ServerTimeMs:    time.Now().UnixMilli(),
		MaxPayloadBytes: uint32(g.cfg.Delivery.MaxPayload()),
		MaxFrameBytes:   uint32(g.cfg.MaxFrame),
	}}}) {
		c.ev.set(evDiscard)
		g.cfg.Metrics.Connects.WithLabelValues("handshake_failed").Inc()
		g.clusterUnregister(dev, session)
		nbc.Close()
		return false
	}
	if !g.registerSession(c, session) {
		c.ev.set(evDiscard)
		g.cfg.Metrics.Connects.WithLabelValues("shutting_down").Inc()
		g.clusterUnregister(dev, session)
		wsc.WriteClose(int(websocket.StatusGoingAway), "shutting down")
		nbc.Close()
		return false
	}
	g.cfg.Metrics.Connects.WithLabelValues("ok").Inc()
	g.cfg.Metrics.Connections.Inc()
	c.logger().Debug("connected", "transport", TransportEpoll)
	// From here on frames are handled and OnClose ends the connection; if
	// it closed before, end it here (evEnd runs once).
	c.ev.set(evReady)
	if closed, _ := nbc.IsClosed(); closed {
		c.evEnd(nil)
		return true
	}
	c.poke() // pending entries first
	return true
}

// sessionConn returns the connection of wsc, waiting for accept to attach
// it if bytes came in before it did (accept does so as soon as the
// handshake's Upgrade returns; a client should wait for the 101 answer
// anyway). nil: it never came.
func (e *epoll) sessionConn(wsc *nbws.Conn) *conn {
	for i := 0; ; i++ {
		if c := e.connOf(wsc); c != nil {
			return c
		}
		if i == 10000 {
			return nil
		}
		time.Sleep(100 * time.Microsecond)
	}
}

// awaitReady waits for accept to have sent Hello and registered the
// connection, and reports whether it did.
func (s *epollState) awaitReady() bool {
	for i := 0; !s.has(evReady); i++ {
		if i == 1000 || s.has(evDiscard) {
			return false
		}
		time.Sleep(time.Millisecond)
	}
	return true
}

// onData parses bytes read from the socket (on a poller). It sees every
// byte after the handshake, so frameScan follows the frames from the
// first.
func (c *conn) onData(data []byte) {
	if c.ev.has(evDiscard) {
		return
	}
	// nbio would refuse a message over the limit itself, but with its own
	// close frame and no reason: the frame headers are read here first,
	// and the bytes before such a message are parsed as usual.
	cut := c.ev.scan.scan(data, int64(c.g.cfg.MaxFrame))
	var err error
	if cut < 0 {
		err = c.nb.Parse(data)
	} else {
		if cut > 0 {
			err = c.nb.Parse(data[:cut])
		}
		if err == nil {
			err = nbws.ErrMessageTooLarge
		}
	}
	if err == nil {
		return
	}
	if errors.Is(err, nbws.ErrMessageTooLarge) {
		// Stop parsing now, and close after the frames before this one
		// (the same job queue keeps them in order).
		c.ev.set(evDiscard)
		c.g.cfg.Metrics.FrameErrors.WithLabelValues(pb.ErrorCode_ERROR_CODE_FRAME_TOO_LARGE.String()).Inc()
		if !c.nb.Execute(func() {
			c.closeWith(pb.ErrorCode_ERROR_CODE_FRAME_TOO_LARGE, "frame larger than the limit", websocket.StatusMessageTooBig, 0)
		}) {
			c.nb.Conn.Close()
		}
		return
	}
	c.nb.Conn.(*nbio.Conn).CloseWithError(err)
}

// evFinish closes the connection, first telling the device why if there
// is a reason to give (closeWith calls it once). The device has
// closeGrace to answer the close handshake by closing its end; after that
// the read deadline (the event loop's timer) cuts it off.
func (c *conn) evFinish() {
	nbc := c.nb.Conn
	if c.closeCode == CloseSlowConsumer {
		nbc.Close()
		return
	}
	if c.closeErr != nil {
		// Best effort: the device may not be reading.
		c.write(&pb.ServerFrame{Body: &pb.ServerFrame_Error{Error: c.closeErr}})
		c.g.cfg.Metrics.FrameErrors.WithLabelValues(c.closeErr.Code.String()).Inc()
		c.nb.WriteClose(int(c.closeCode), c.closeErr.Code.String())
	} else {
		// Frames still waiting in the batch go before the close frame.
		c.evFlush()
		c.nb.WriteClose(int(c.closeCode), "")
	}
	c.ev.set(evDiscard)
	nbc.SetReadDeadline(time.Now().Add(closeGrace))
}

// evEnd forgets a connection that has closed (once): what the goroutine
// transport does when run returns.
func (c *conn) evEnd(err error) {
	if c.ev.set(evEnded) {
		return
	}
	switch {
	case errors.Is(err, nbio.ErrWriteTimeout):
		c.logger().Info("slow consumer: write timed out; closed", "timeout", c.g.cfg.WriteTimeout)
	case errors.Is(err, nbio.ErrOverflow):
		c.logger().Info("slow consumer: too much written and not read; closed")
	}
	c.closeWith(0, "", websocket.StatusNormalClosure, 0)
	// Storage work the device started finishes before the connection is
	// gone (its replies are dropped).
	c.pipe.wait()
	c.cancel()
	c.logger().Debug("disconnected")
	g := c.g
	g.cfg.Metrics.Connections.Dec()
	g.unregister(c)
	g.release(c.sourceAddr())
}

// readContext is a context for mailbox reads made on first use.
type readContext struct {
	ctx    context.Context
	cancel context.CancelFunc
}

func (r *readContext) get() context.Context {
	if r.ctx == nil {
		r.ctx, r.cancel = context.WithTimeout(context.Background(), opTimeout)
	}
	return r.ctx
}

func (r *readContext) release() {
	if r.cancel != nil {
		r.cancel()
	}
}

// sourceAddr returns the source address the connection was admitted from
// (auth.SourceAddr of the request's RemoteAddr), for release: the
// request's RemoteAddr is the socket's remote address, which nbio keeps
// (forwarding headers are not trusted, and only a plain TCP socket is
// moved to the event loop), so the connection need not keep a copy. With
// no cap per address, release does not look at it.
func (c *conn) sourceAddr() string {
	if c.g.cfg.MaxConnsPerAddr <= 0 {
		return ""
	}
	return auth.SourceAddr(c.nb.Conn.RemoteAddr().String())
}

// pumpPoke makes the pump run (again) soon.
func (c *conn) pumpPoke() {
	for {
		switch c.ev.pump.Load() {
		case 2:
			return
		case 1:
			if c.ev.pump.CompareAndSwap(1, 2) {
				return
			}
		default:
			if c.ev.pump.CompareAndSwap(0, 1) {
				c.g.ep.engine.Execute(c.pump)
				return
			}
		}
	}
}

// pump sends mailbox entries until the window is full or the mailbox has
// no more, then returns; a poke while it runs makes it go round again.
func (c *conn) pump() {
	for {
		if c.closing.Load() {
			c.ev.pump.Store(0)
			return
		}
		more := c.sendPending()
		if !more {
			c.ev.pump.Store(0)
			return
		}
		if c.ev.pump.CompareAndSwap(1, 0) {
			return
		}
		c.ev.pump.Store(1)
	}
}

// sendPending sends what the window allows of the entries handed over
// by their appends (handoff.go) and of the mailbox past lastSent, and
// Synced once the pending entries are out. It returns false if the
// connection is closing.
func (c *conn) sendPending() bool {
	cfg := &c.g.cfg
	// The context bounding the mailbox reads of one window's worth (at
	// most Window/readBatch reads) is made on the first read only: most
	// runs send handed entries and read nothing, and a context with a
	// deadline costs three allocations and a timer.
	var rctx readContext
	defer rctx.release()
	for {
		c.mu.Lock()
		room := cfg.Window - len(c.inflight)
		c.mu.Unlock()
		handed, read := c.hand.next(c.lastSent.Load(), room)
		for _, e := range handed {
			env := c.track(e.Seq, e.Data)
			if env == nil {
				continue
			}
			// Batched with the entries and replies around it.
			if !c.evAppendDeliver(e.Seq, e.Data) {
				c.hand.done()
				return false
			}
			c.delivered(env, true)
		}
		room -= len(handed)
		c.hand.done()
		if !read || room <= 0 {
			// Caught up, or the window is full (acks poke the pump).
			return c.evFlush()
		}
		want := min(room, readBatch)
		c.hand.reading()
		cfg.Metrics.MailboxReads.Inc()
		entries, err := cfg.Mailbox.Read(rctx.get(), c.dev, c.lastSent.Load(), want)
		if err != nil {
			if !c.closing.Load() {
				c.logger().Error("mailbox read", "err", err)
				c.closeWith(pb.ErrorCode_ERROR_CODE_INTERNAL, "mailbox unavailable; reconnect later", websocket.StatusInternalError, delivery.StorageRetryAfter)
			}
			return false
		}
		for _, e := range entries {
			// In flight before it is written: the device may ack it at
			// once.
			env := c.track(e.Seq, e.Data)
			if env == nil {
				continue
			}
			// Batched: the entries of one read go out with one write.
			if !c.evAppendDeliver(e.Seq, e.Data) {
				return false
			}
			c.delivered(env, false)
		}
		c.ev.pending += uint64(len(entries))
		c.hand.readDone(len(entries) < want, c.lastSent.Load())
		if len(entries) < want {
			if !c.ev.synced {
				c.ev.synced = true
				return c.evWriteFrame(&pb.ServerFrame{Body: &pb.ServerFrame_Synced{Synced: &pb.Synced{Pending: c.ev.pending}}}, true)
			}
			return c.evFlush()
		}
		if !c.evFlush() {
			return false
		}
	}
}

// frameScan follows the WebSocket frames of a byte stream, reading their
// headers only, to find the first data message longer than a limit.
type frameScan struct {
	hdr  [14]byte // the header being read
	nh   uint8    // bytes of it held
	left uint64   // payload bytes of the current frame still to come
	msg  uint64   // payload bytes of the current data message so far
}

// scan reads data, the next bytes of the stream. It returns the offset in
// data of the header of the first frame that takes its message over limit
// bytes (0 if that header began in earlier data), or -1 if there is none.
func (s *frameScan) scan(data []byte, limit int64) int {
	off := 0
	for off < len(data) {
		if s.left > 0 {
			n := min(uint64(len(data)-off), s.left)
			s.left -= n
			off += int(n)
			continue
		}
		start := off - int(s.nh)
		need := 2
		for {
			if s.nh >= 2 {
				need = 2
				if s.hdr[1]&0x80 != 0 {
					need += 4 // mask key
				}
				switch s.hdr[1] & 0x7f {
				case 126:
					need += 2
				case 127:
					need += 8
				}
			}
			if int(s.nh) >= need || off == len(data) {
				break
			}
			s.hdr[s.nh] = data[off]
			s.nh++
			off++
		}
		if int(s.nh) < need {
			return -1 // the rest of the header comes later
		}
		var n uint64
		switch l := s.hdr[1] & 0x7f; l {
		case 126:
			n = uint64(s.hdr[2])<<8 | uint64(s.hdr[3])
		case 127:
			for _, b := range s.hdr[2:10] {
				n = n<<8 | uint64(b)
			}
		default:
			n = uint64(l)
		}
		s.nh, s.left = 0, n
		if op := s.hdr[0] & 0x0f; op < 8 { // continuation, text, binary
			if op != 0 {
				s.msg = 0
			}
			if n > uint64(limit) || s.msg+n > uint64(limit) {
				return max(start, 0)
			}
			s.msg += n
			if s.hdr[0]&0x80 != 0 { // fin
				s.msg = 0
			}
		}
	}
	return -1
}
