package gateway

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
	"github.com/gobwas/ws"
	"golang.org/x/sys/unix"

	"github.com/courier-im/courier/internal/delivery"
	"github.com/courier-im/courier/internal/evloop"
	"github.com/courier-im/courier/internal/ident"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

// Transports (Config.Transport).
const (
	// TransportGoroutine serves each connection with a reader and a writer
	// goroutine on coder/websocket: simple, and about 50 KiB per idle
	// connection (two stacks, net/http's buffers).
	TransportGoroutine = "goroutine"
	// TransportEpoll serves connections from event loops on epoll: an
	// idle connection has no goroutine, no buffer and no timer, only its
	// state. The HTTP request that opens it is still served by net/http
	// (on the same port), which hands the socket to an event loop once
	// the WebSocket handshake is done.
	TransportEpoll = "epoll"
)

// The epoll transport.
//
// The socket of an upgraded connection is taken from net/http (its
// descriptor duplicated, the net.Conn closed) and added to one of the
// event loops (one per CPU, each an epoll instance waited on by one
// goroutine). A loop reads a readable socket into a buffer of its own and
// parses WebSocket frames from it in place (wsread.go); a frame split
// across reads is carried in a buffer made for it. A complete message is
// copied and queued on its connection; one job at a time per connection,
// on the gateway's bounded pool of workers, runs the same frame handling
// as the goroutine transport (conn.go), so frames are handled in order and
// storage work may block there, never on a loop. A connection whose queue
// holds more than maxQueued bytes is not read until it has drained (TCP
// then pushes back on the device).
//
// Writes never block: a write takes the connection's write lock and
// writes to the socket what it takes; the rest waits in a buffer made for
// it, which the loop writes when the socket is writable. Bytes that wait
// longer than WriteTimeout (renewed by each write that progresses), or
// more than maxPending of them, cut the connection off as a slow consumer.
// Deadlines (that one, and the grace a closing connection gives the device
// to answer the close handshake) are kept in one table for the whole
// transport, checked by one ticker, not a timer each.
//
// Only its loop closes a socket's descriptor, with the write lock held:
// anyone else shuts the socket down, which the loop sees as the end of
// the stream. So a descriptor number is never used after it is closed,
// when the kernel may hand it to the next connection.
//
// The mailbox is streamed by a pump (pumpPoke) that runs on the same
// workers only while there is something to send: Notify and acks poke it;
// it reads the mailbox from the last seq sent, as the goroutine
// transport's writer does, until the window is full or the mailbox is
// drained, then returns.
//
// Idle connections are closed by the gateway's sweeper, as on the other
// transport.
//
// This replaced nbio (docs/dependencies.md): nbio kept ≈ 600 bytes
// per connection of its own (its connection, its WebSocket connection,
// copies of both socket addresses, closures, a map entry), more than
// courier's state, which no option of it would drop.
type epoll struct {
	g     *Gateway
	pool  *workers // runs frame handling and pumps
	loops []*evLoop
	// flushers write the batches pipelines and pumps leave for them, one
	// goroutine per core; a connection always goes to the same one
	// (flush.go).
	flushers []*flusher
	// socks maps a socket descriptor to its connection, for the loops
	// (epoll hands them the descriptor); nil where none is registered.
	socks sockTable
	up    ws.HTTPUpgrader

	maxPending int // bytes a connection may have written and not sent

	dmu       sync.Mutex
	deadlines map[*conn]evDeadline

	stop     chan struct{}
	stopOnce sync.Once
	wg       sync.WaitGroup
}

// evLoop is one event loop: an epoll instance, the goroutine waiting on
// it (parked on Go's poller: internal/evloop), and the buffer it reads
// into.
type evLoop struct {
	*evloop.Poller
	buf []byte
}

// sockTable maps socket descriptors to connections: chunks of
// sockChunk entries, each made when a descriptor in it is first used, so
// that a high open-file limit (a million is common in containers) costs
// nothing until that many sockets are open.
type sockTable struct {
	mu     sync.Mutex // serialises making chunks
	chunks []atomic.Pointer[[sockChunk]atomic.Pointer[conn]]
}

const sockChunk = 4096

func newSockTable(n int) sockTable {
	return sockTable{chunks: make([]atomic.Pointer[[sockChunk]atomic.Pointer[conn]], (n+sockChunk-1)/sockChunk)}
}

// fits reports whether fd has a place in the table.
func (t *sockTable) fits(fd int32) bool { return fd >= 0 && int(fd)/sockChunk < len(t.chunks) }

// get returns the connection of fd, nil if none.
func (t *sockTable) get(fd int32) *conn {
	if !t.fits(fd) {
		return nil
	}
	ch := t.chunks[fd/sockChunk].Load()
	if ch == nil {
		return nil
	}
	return ch[fd%sockChunk].Load()
}

// set makes c the connection of fd (nil: none). fd fits.
func (t *sockTable) set(fd int32, c *conn) {
	slot := &t.chunks[fd/sockChunk]
	ch := slot.Load()
	if ch == nil {
		if c == nil {
			return
		}
		t.mu.Lock()
		if ch = slot.Load(); ch == nil {
			ch = new([sockChunk]atomic.Pointer[conn])
			slot.Store(ch)
		}
		t.mu.Unlock()
	}
	ch[fd%sockChunk].Store(c)
}

// evDeadline is a connection's deadline: at (unix nanos), and whether it
// bounds a write (else the close handshake).
type evDeadline struct {
	at    int64
	write bool
}

// epollState is a connection's state on the epoll transport, held in its
// conn (ev).
type epollState struct {
	evBatch // frames waiting to be written, and the write lock (evwrite.go)

	// Guarded by wmu.
	fd     int32   // the socket; -1 once its loop has closed it
	events uint32  // the epoll interest registered for it
	out    *[]byte // bytes the socket did not take yet; nil: none

	rd *wsPartial // a frame or message split across reads (loop only)

	// jobs holds the messages and actions waiting for the connection's
	// worker, nil when none is (guarded by conn.mu).
	jobs *evJobs

	pending uint64 // entries sent before Synced (pump only)
	// addr is the source address admit counted, released when the
	// connection ends; nil when no cap per address is set.
	addr *addrSlot

	// pump: 0 idle, 1 running, 2 running and poked again.
	pump   atomic.Int32
	flags  atomic.Uint32 // evReady, evDiscard, evEnded, evBroken: each set once, never cleared; evQueued and evWindowFull
	synced bool          // Synced has been sent (pump only)
	linger bool          // shut down once out is written (wmu)
	// paused: not read, its queue of messages is full (changed with wmu
	// held, read by the loop without).
	paused atomic.Bool
}

// Flags of epollState.
const (
	evReady   = 1 << iota // Hello sent and registered: frames are handled
	evDiscard             // closing: data messages are no longer handled
	evEnded               // evEnd has run
	evBroken              // the input cannot be parsed further: it is dropped
	evQueued              // on its flusher's queue (flush.go); cleared when taken off
	// evWindowFull: the pump stopped with the window full, so an ack
	// must poke it (set and taken with mu held; see windowStillFull).
	evWindowFull
)

// has reports whether flag f is set.
func (s *epollState) has(f uint32) bool { return s.flags.Load()&f != 0 }

// set sets flag f and reports whether it was set already.
func (s *epollState) set(f uint32) (was bool) { return s.flags.Or(f)&f != 0 }

// clear clears flag f (evQueued and evWindowFull only: the others are
// never cleared).
func (s *epollState) clear(f uint32) { s.flags.And(^f) }

// take clears flag f and reports whether it was set.
func (s *epollState) take(f uint32) bool { return s.flags.And(^f)&f != 0 }

const (
	// evReadBuffer is the size of each loop's read buffer.
	evReadBuffer = 64 << 10
	// maxQueued is the most bytes of messages a connection may have
	// waiting for its worker before its socket is no longer read.
	maxQueued = 1 << 20
	// evTick is how often deadlines are checked.
	evTick = 100 * time.Millisecond
)

func newEpoll(g *Gateway) (*epoll, error) {
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		return nil, fmt.Errorf("epoll transport: %w", err)
	}
	// Descriptors are below the soft limit (raised to the hard one at
	// start-up, internal/rlimit).
	nfd := min(lim.Cur, 1<<26)
	n := runtime.GOMAXPROCS(0)
	e := &epoll{
		g: g,
		// Frame handling and mailbox reads: a bounded pool of workers
		// that live on between jobs.
		pool:  newWorkers(256*n, g.log),
		socks: newSockTable(int(nfd)),
		// The most a connection may have written and not yet taken by
		// its socket: a full window of the largest entries, and room for
		// replies. The write deadline is renewed by each write that
		// progresses, so a device that keeps sending but reads slowly
		// would otherwise grow its backlog forever; past this it is cut
		// off as a slow consumer.
		maxPending: g.cfg.Window*(g.cfg.Delivery.MaxPayload()+4<<10) + g.cfg.MaxFrame,
		deadlines:  map[*conn]evDeadline{},
		stop:       make(chan struct{}),
	}
	for range n {
		l, err := newEvLoop()
		if err != nil {
			e.closeLoops()
			e.pool.Stop()
			return nil, err
		}
		e.loops = append(e.loops, l)
	}
	for _, l := range e.loops {
		e.wg.Add(1)
		go e.run(l)
	}
	for range n {
		f := newFlusher()
		e.flushers = append(e.flushers, f)
		e.wg.Add(1)
		go e.flush(f)
	}
	e.wg.Add(1)
	go e.ticker()
	return e, nil
}

func newEvLoop() (*evLoop, error) {
	p, err := evloop.New()
	if err != nil {
		return nil, fmt.Errorf("epoll transport: %w", err)
	}
	return &evLoop{Poller: p, buf: make([]byte, evReadBuffer)}, nil
}

// loopOf returns the loop of socket fd.
func (e *epoll) loopOf(fd int32) *evLoop { return e.loops[int(fd)%len(e.loops)] }

// run is an event loop: it reads readable sockets and writes what waits
// for writable ones, until stopped.
func (e *epoll) run(l *evLoop) {
	defer e.wg.Done()
	err := l.Run(func(ev *unix.EpollEvent) {
		c := e.socks.get(ev.Fd)
		if c == nil {
			return
		}
		// An event may be for an earlier socket that had the same
		// number: reads and writes tell, never the event alone.
		if ev.Events&(unix.EPOLLOUT|unix.EPOLLERR|unix.EPOLLHUP) != 0 {
			c.evWritable()
		}
		if ev.Events&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLERR|unix.EPOLLHUP) != 0 {
			c.evReadable(l.buf, ev.Events&(unix.EPOLLERR|unix.EPOLLHUP) != 0)
		}
	})
	if err != nil {
		e.g.log.Error("epoll transport: waiting for events; the loop stops", "err", err)
	}
}

// ticker acts on the connections whose deadline has passed.
func (e *epoll) ticker() {
	defer e.wg.Done()
	t := time.NewTicker(evTick)
	defer t.Stop()
	var due []*conn
	var writes []bool
	for {
		select {
		case <-e.stop:
			return
		case now := <-t.C:
			at := now.UnixNano()
			due, writes = due[:0], writes[:0]
			e.dmu.Lock()
			for c, d := range e.deadlines {
				if d.at <= at {
					due = append(due, c)
					writes = append(writes, d.write)
					delete(e.deadlines, c)
				}
			}
			e.dmu.Unlock()
			for i, c := range due {
				if writes[i] {
					c.logger().Info("slow consumer: write timed out; closed", "timeout", e.g.cfg.WriteTimeout)
				}
				c.evShutdown()
			}
			clear(due)
		}
	}
}

// setDeadline sets c's deadline; clearDeadline removes it. A write
// deadline does not replace the deadline of a close under way.
func (e *epoll) setDeadline(c *conn, d time.Duration, write bool) {
	e.dmu.Lock()
	if old, ok := e.deadlines[c]; !ok || !write || old.write {
		e.deadlines[c] = evDeadline{at: time.Now().Add(d).UnixNano(), write: write}
	}
	e.dmu.Unlock()
}

func (e *epoll) clearDeadline(c *conn, write bool) {
	e.dmu.Lock()
	if d, ok := e.deadlines[c]; ok && (d.write || !write) {
		delete(e.deadlines, c)
	}
	e.dmu.Unlock()
}

// shutdown stops the event loops and the workers, waiting at most wait
// for the loops.
func (e *epoll) shutdown(wait time.Duration) bool {
	stopped := true
	e.stopOnce.Do(func() {
		close(e.stop)
		for _, l := range e.loops {
			l.Stop()
		}
		done := make(chan struct{})
		go func() { e.wg.Wait(); close(done) }()
		select {
		case <-done:
			e.closeLoops()
		case <-time.After(wait):
			stopped = false
		}
		e.pool.Stop()
	})
	return stopped
}

func (e *epoll) closeLoops() {
	for _, l := range e.loops {
		l.Close()
	}
}

// accept upgrades the request of dev (authenticated, registered in the
// cluster's directory as session, admitted from source address addr) and
// hands the connection to an event loop. It reports whether it did: if so,
// the connection releases addr when it ends.
func (e *epoll) accept(w http.ResponseWriter, r *http.Request, dev ident.Device, session string, addr *addrSlot) bool {
	g := e.g
	fail := func(nc net.Conn, reason string) bool {
		g.cfg.Metrics.Connects.WithLabelValues(reason).Inc()
		g.clusterUnregister(dev, session)
		if nc != nil {
			nc.Close()
		}
		return false
	}
	nc, rw, _, err := e.up.Upgrade(r, w)
	if err != nil {
		return fail(nc, "handshake_failed") // Upgrade has written the HTTP error
	}
	dfd, err := evloop.DupSocket(nc)
	fd := int32(dfd)
	if err != nil || !e.socks.fits(fd) {
		g.log.Error("epoll transport: cannot take the socket; closing it", "type", fmt.Sprintf("%T", nc), "err", err)
		if err == nil {
			unix.Close(int(fd))
		}
		return fail(nc, "handshake_failed")
	}
	// Bytes the device sent after its request, read with it.
	var early []byte
	if n := rw.Reader.Buffered(); n > 0 {
		b, _ := rw.Reader.Peek(n)
		early = append([]byte(nil), b...)
	}
	nc.Close() // the duplicate is the connection's now
	// The user name is a piece of the decoded Authorization header; a
	// copy of it alone is kept for the connection's lifetime.
	dev.User = strings.Clone(dev.User)
	c := newConn(g, dev, nil)
	c.ev.fd = fd
	c.ev.addr = addr
	drop := func(reason string) bool {
		c.ev.set(evDiscard)
		g.cfg.Metrics.Connects.WithLabelValues(reason).Inc()
		g.clusterUnregister(dev, session)
		c.ev.wmu.Lock()
		c.ev.fd = -1
		c.ev.wmu.Unlock()
		unix.Close(int(fd))
		return false
	}
	if !c.write(&pb.ServerFrame{Body: &pb.ServerFrame_Hello{Hello: &pb.Hello{
		ProtocolVersion: ProtocolVersion,
		Device:          &pb.DeviceAddress{User: c.dev.User, Device: c.dev.ID},
		ServerTimeMs:    time.Now().UnixMilli(),
		MaxPayloadBytes: uint32(g.cfg.Delivery.MaxPayload()),
		MaxFrameBytes:   uint32(g.cfg.MaxFrame),
	}}}) {
		return drop("handshake_failed")
	}
	if !g.registerSession(c, session) {
		c.evWriteClose(websocket.StatusGoingAway, "shutting down")
		return drop("shutting_down")
	}
	g.cfg.Metrics.Connects.WithLabelValues("ok").Inc()
	g.cfg.Metrics.Connections.Inc()
	c.logger().Debug("connected", "transport", TransportEpoll)
	c.ev.set(evReady)
	if len(early) > 0 {
		c.evInput(early)
	}
	// From here on its loop reads it and ends it.
	l := e.loopOf(fd)
	e.socks.set(fd, c)
	c.ev.wmu.Lock()
	c.ev.events = c.evWantLocked()
	err = unix.EpollCtl(l.FD, unix.EPOLL_CTL_ADD, int(fd), &unix.EpollEvent{Events: c.ev.events, Fd: fd})
	c.ev.wmu.Unlock()
	if err != nil {
		e.socks.set(fd, nil)
		g.log.Error("epoll transport: epoll_ctl add", "err", err)
		c.ev.wmu.Lock()
		c.ev.fd = -1
		c.ev.wmu.Unlock()
		unix.Close(int(fd))
		c.evEnd(err)
		return true
	}
	c.poke() // pending entries first
	return true
}

// evWantLocked returns the epoll interest the connection needs now.
func (c *conn) evWantLocked() uint32 {
	// Paused, not even the peer's half close is asked for: it would be
	// reported again and again while the socket is not read. (A failed
	// or closed socket is reported whatever the interest.)
	var want uint32
	if !c.ev.paused.Load() {
		want = unix.EPOLLIN | unix.EPOLLRDHUP
	}
	if c.ev.out != nil {
		want |= unix.EPOLLOUT
	}
	return want
}

// evInterestLocked registers the interest the connection needs now, if it
// changed. wmu is held.
func (c *conn) evInterestLocked() {
	s := &c.ev
	want := c.evWantLocked()
	if want == s.events || s.fd < 0 || !s.has(evReady) {
		return
	}
	if err := unix.EpollCtl(c.g.ep.loopOf(s.fd).FD, unix.EPOLL_CTL_MOD, int(s.fd), &unix.EpollEvent{Events: want, Fd: s.fd}); err != nil {
		c.logger().Error("epoll transport: epoll_ctl mod", "err", err)
		return
	}
	s.events = want
}

// evReadable reads the socket (on its loop). hup: the event said the
// socket is closed or failed.
func (c *conn) evReadable(buf []byte, hup bool) {
	s := &c.ev
	if s.paused.Load() && !hup {
		return // read when the queue has drained
	}
	fd := int(s.fd) // only this loop changes it
	if fd < 0 {
		return
	}
	for range 4 {
		n, err := unix.Read(fd, buf)
		switch {
		case n > 0:
			if !s.has(evBroken) {
				c.evInput(buf[:n])
			}
			if n < len(buf) || s.paused.Load() {
				return
			}
			continue
		case errors.Is(err, unix.EAGAIN):
			return
		case errors.Is(err, unix.EINTR):
			continue
		}
		// n == 0: the device closed its end (or we shut it down); or the
		// socket failed.
		c.evCloseSocket(err)
		return
	}
}

// evCloseSocket closes the socket (on its loop) and ends the connection
// once the jobs queued before are done.
func (c *conn) evCloseSocket(cause error) {
	e := c.g.ep
	s := &c.ev
	s.wmu.Lock()
	fd := s.fd
	if fd < 0 {
		s.wmu.Unlock()
		return
	}
	_ = unix.EpollCtl(e.loopOf(fd).FD, unix.EPOLL_CTL_DEL, int(fd), nil)
	e.socks.set(fd, nil)
	unix.Close(int(fd))
	s.fd = -1
	if s.out != nil {
		putBuffer(s.out)
		s.out = nil
	}
	if s.buf != nil {
		putBuffer(s.buf)
		s.buf = nil
	}
	s.wmu.Unlock()
	e.clearDeadline(c, false)
	if s.rd != nil {
		s.rd.release()
		s.rd = nil
	}
	c.evQueue(evJob{fn: func() { c.evEnd(cause) }})
}

// evShutdown shuts the socket down: its loop then sees the end of the
// stream and closes it.
func (c *conn) evShutdown() {
	s := &c.ev
	s.wmu.Lock()
	if s.fd >= 0 {
		_ = unix.Shutdown(int(s.fd), unix.SHUT_RDWR)
	}
	s.wmu.Unlock()
}

// evShutdownAfterWrites shuts the socket down once what waits to be
// written is (or at the close deadline).
func (c *conn) evShutdownAfterWrites() {
	s := &c.ev
	s.wmu.Lock()
	if s.fd >= 0 {
		if s.out == nil {
			_ = unix.Shutdown(int(s.fd), unix.SHUT_RDWR)
		} else {
			s.linger = true
		}
	}
	s.wmu.Unlock()
}

// evSendLocked writes p to the socket, keeping what it does not take for
// the loop. wmu is held.
func (c *conn) evSendLocked(p []byte) error {
	s := &c.ev
	if s.fd < 0 {
		return net.ErrClosed
	}
	if s.out != nil {
		if len(*s.out)+len(p) > c.g.ep.maxPending {
			return errOverflow
		}
		*s.out = append(*s.out, p...)
		return nil
	}
	for len(p) > 0 {
		n, err := unix.Write(int(s.fd), p)
		if n > 0 {
			p = p[n:]
		}
		if err == nil {
			continue
		}
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if errors.Is(err, unix.EAGAIN) {
			break
		}
		return err
	}
	if len(p) == 0 {
		return nil
	}
	if len(p) > c.g.ep.maxPending {
		return errOverflow
	}
	s.out = getBuffer(len(p))
	*s.out = append(*s.out, p...)
	c.evInterestLocked()
	c.g.ep.setDeadline(c, c.g.cfg.WriteTimeout, true)
	return nil
}

// errOverflow: more written than the device reads, past maxPending.
var errOverflow = errors.New("slow consumer: too much written and not read")

// evWritable writes what waits for the socket (on its loop).
func (c *conn) evWritable() {
	s := &c.ev
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if s.fd < 0 || s.out == nil {
		return
	}
	b := *s.out
	wrote := 0
	for wrote < len(b) {
		n, err := unix.Write(int(s.fd), b[wrote:])
		if n > 0 {
			wrote += n
		}
		if err == nil || errors.Is(err, unix.EINTR) {
			continue
		}
		if errors.Is(err, unix.EAGAIN) {
			break
		}
		// The read side sees the failure too, and closes the socket.
		_ = unix.Shutdown(int(s.fd), unix.SHUT_RDWR)
		return
	}
	if wrote < len(b) {
		n := copy(b, b[wrote:])
		*s.out = b[:n]
		if wrote > 0 {
			c.g.ep.setDeadline(c, c.g.cfg.WriteTimeout, true)
		}
		return
	}
	putBuffer(s.out)
	s.out = nil
	c.g.ep.clearDeadline(c, true)
	if s.linger {
		_ = unix.Shutdown(int(s.fd), unix.SHUT_RDWR)
		return
	}
	c.evInterestLocked()
}

// evJobs is a connection's queue of work for its worker.
type evJobs struct {
	q     []evJob
	bytes int // of messages in q
}

// evJob is a message to handle (data) or an action (fn).
type evJob struct {
	data *[]byte
	text bool
	fn   func()
}

// evQueue adds a job for the connection's worker, starting one if none is
// running.
func (c *conn) evQueue(j evJob) {
	c.mu.Lock()
	q := c.ev.jobs
	start := q == nil
	if start {
		q = &evJobs{}
		c.ev.jobs = q
	}
	q.q = append(q.q, j)
	full := false
	if j.data != nil {
		q.bytes += len(*j.data)
		full = q.bytes > maxQueued
	}
	c.mu.Unlock()
	if full {
		// Called on the loop (evInput): stop reading until it drains.
		s := &c.ev
		s.wmu.Lock()
		s.paused.Store(true)
		c.evInterestLocked()
		s.wmu.Unlock()
	}
	if start {
		c.g.ep.pool.Go(c.evWork)
	}
}

// evWork runs the connection's jobs in order until none is left.
func (c *conn) evWork() {
	for {
		c.mu.Lock()
		q := c.ev.jobs
		if len(q.q) == 0 {
			c.ev.jobs = nil
			c.mu.Unlock()
			c.evResume()
			return
		}
		j := q.q[0]
		q.q[0] = evJob{}
		q.q = q.q[1:]
		left := -1
		if j.data != nil {
			q.bytes -= len(*j.data)
			left = q.bytes
		}
		c.mu.Unlock()
		if left >= 0 && left <= maxQueued/2 {
			c.evResume()
		}
		if j.fn != nil {
			j.fn()
			continue
		}
		if !c.ev.has(evDiscard) {
			c.touch()
			mt := websocket.MessageBinary
			if j.text {
				mt = websocket.MessageText
			}
			// Decoding copies what it keeps.
			c.startFrame(mt, *j.data)
		}
		putBuffer(j.data)
	}
}

// evResume reads the socket again if it was paused.
func (c *conn) evResume() {
	s := &c.ev
	s.wmu.Lock()
	if s.paused.Load() {
		s.paused.Store(false)
		c.evInterestLocked()
	}
	s.wmu.Unlock()
}

// evFinish closes the connection, first telling the device why if there
// is a reason to give (closeWith calls it once). The device has
// closeGrace to answer the close handshake by closing its end; after that
// the socket is shut down.
func (c *conn) evFinish() {
	if c.closeCode == uint16(CloseSlowConsumer) {
		c.evShutdown()
		return
	}
	if c.closeErr != nil {
		// Best effort: the device may not be reading.
		c.write(&pb.ServerFrame{Body: &pb.ServerFrame_Error{Error: c.closeErr}})
		c.g.cfg.Metrics.FrameErrors.WithLabelValues(c.closeErr.Code.String()).Inc()
		c.evWriteClose(websocket.StatusCode(c.closeCode), c.closeErr.Code.String())
	} else {
		// Frames still waiting in the batch go before the close frame.
		c.evWriteClose(websocket.StatusCode(c.closeCode), "")
	}
	c.ev.set(evDiscard)
	c.g.ep.setDeadline(c, closeGrace, false)
}

// evEnd forgets a connection that has closed (once): what the goroutine
// transport does when run returns.
func (c *conn) evEnd(err error) {
	if c.ev.set(evEnded) {
		return
	}
	if errors.Is(err, errOverflow) {
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
	g.release(c.ev.addr)
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
				c.g.ep.pool.Go(c.pump)
				return
			}
		}
	}
}

// pumpHere runs the pump on the calling goroutine if it is idle (else
// pokes it): for an entry just handed over, when its append stored few
// entries (delivery.StoredEntry.Few), a job for a worker would cost more
// than the delivery itself, and a wait in the worker's queue besides.
func (c *conn) pumpHere() {
	if c.ev.pump.CompareAndSwap(0, 1) {
		c.pump()
		return
	}
	c.pumpPoke()
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

// windowStillFull is called by a pump that found the window full: it
// reports whether it still is, and if so marks it, so that the next ack
// pokes the pump. Marked and checked under mu, as acks take the mark
// (handleAck) where they remove entries from the window: an ack
// either made room before this look, or finds the mark after it, so the
// pump never stops on a window an ack has emptied unseen. An ack that
// finds no mark pokes nothing: every entry waiting then comes with a
// poke of its own (the append that stored it).
func (c *conn) windowStillFull() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.inflight) < c.g.cfg.Window {
		return false
	}
	c.ev.set(evWindowFull)
	return true
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
			env := c.track(e.Seq, e.Data, e.Head)
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
		if room <= 0 && !c.windowStillFull() {
			continue // acks made room meanwhile
		}
		if !read || room <= 0 {
			// Caught up, or the window is full (an ack then pokes the
			// pump).
			return c.evFlushSoon()
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
			env := c.track(e.Seq, e.Data, nil)
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
			return c.evFlushSoon()
		}
		if !c.evFlush() {
			return false
		}
	}
}
