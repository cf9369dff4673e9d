package gateway

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/delivery"
	"github.com/courier-im/courier/internal/ident"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

const (
	// outQueue bounds replies and events waiting for the writer.
	outQueue = 64
	// readBatch is the most entries read from the mailbox at once.
	readBatch = 64
	// maxWatching bounds the presence subscriptions of one connection.
	maxWatching = 1024
	// opTimeout bounds storage work done for one frame.
	opTimeout = 30 * time.Second
	// closeGrace bounds how long a closing connection waits for the
	// device to answer the close handshake; a device that does not (it is
	// gone, or is trickling a frame to hold the connection) is cut off.
	closeGrace = time.Second
	// maxPipelined bounds the Send and Ack frames of one connection whose
	// storage work is under way at once (see pipeline.go); the reader
	// stops reading while that many are.
	maxPipelined = 64
)

// conn is one device connection. It holds what both transports use; an
// idle connection on the epoll transport (the default) is this struct
// alone, so what only one transport needs lives elsewhere: the goroutine
// transport's in a goConn made with the connection, the epoll
// transport's state inline (ev), and state that only a busy connection
// needs (the pipeline's queue, the storage contexts, the ack window) is
// made on first use or shared by the gateway's connections.
type conn struct {
	g   *Gateway
	dev ident.Device
	id  uint32 // names the connection in logs (see logger)
	// lastRead is the unix second of the last frame received (the idle
	// sweeper's granularity is far coarser).
	lastRead atomic.Uint32
	lastSent atomic.Uint64

	hand handoff // entries handed with their notifications (handoff.go)

	// closing is set once, by the closeWith that closes the connection,
	// before it sets closeCode and closeErr: they are read by that
	// closeWith (epoll) or after gr.closed is closed (goroutine).
	closing   atomic.Bool
	closeCode uint16    // a websocket.StatusCode
	closeErr  *pb.Error // nil: the peer went away

	mu sync.Mutex
	// inflight holds the entries delivered and not yet acked (payloads
	// dropped). It is made by the first delivery and dropped when the
	// last is acked, so that an idle connection holds no map (a map never
	// shrinks: one that held a window would keep its size).
	inflight map[uint64]*pb.Envelope

	// watching lists the users whose presence the connection subscribed
	// to, made by its first subscription; next is the next connection of
	// the same user in g.users. Both are guarded by g.mu.
	watching *[]string
	next     *conn

	pipe pipeline

	// gr is the goroutine transport's state; nil on the epoll transport.
	gr *goConn

	// The epoll transport's state (epoll.go); unused on the goroutine
	// transport.
	ev epollState
}

// goConn is what a connection on the goroutine transport needs besides
// conn: its socket, the channels between its reader and its writer, and
// the writer's timer.
type goConn struct {
	ws *websocket.Conn

	ctx    context.Context // cancelled when the connection ends
	cancel context.CancelFunc

	wake   chan struct{}        // the mailbox has new entries, or acks opened the window
	out    chan *pb.ServerFrame // replies and events for the writer
	closed chan struct{}        // closed by closeWith

	// wtimer bounds each write (see writeRaw); wexpired records that it
	// fired.
	wtimer   *time.Timer
	wexpired atomic.Bool

	// cc is the socket, corked while the writer writes several frames
	// (cork.go); nil if it could not be wrapped.
	cc *corkConn
}

// newConn returns a connection of dev, on the gateway's transport: ws is
// the goroutine transport's socket (nil in tests that drive frames
// without one); the epoll transport's caller attaches its own.
func newConn(g *Gateway, dev ident.Device, ws *websocket.Conn) *conn {
	c := &conn{
		g:   g,
		dev: dev,
		id:  connSeq.Add(1),
	}
	if g.ep == nil {
		// On the epoll transport nothing waits on a context, a channel
		// or a timer of the connection's own (the pump makes a context
		// for its mailbox reads, and nbio keeps the write deadline).
		ctx, cancel := context.WithCancel(context.Background())
		c.gr = &goConn{
			ws:     ws,
			ctx:    ctx,
			cancel: cancel,
			wake:   make(chan struct{}, 1),
			out:    make(chan *pb.ServerFrame, outQueue),
			closed: make(chan struct{}),
		}
	}
	c.touch()
	return c
}

// cancel cancels the goroutine transport's context, which ends its reader
// (no-op on the epoll transport).
func (c *conn) cancel() {
	if c.gr != nil {
		c.gr.cancel()
	}
}

// setInflight records env, delivered as seq, as waiting for its ack.
// c.mu must be held.
//
// The map is made small (one group of 8 slots) and grows if a read or a
// burst fills it: most connections have one to a few entries in flight,
// and the map is dropped whenever the last is acked, so at a steady
// message rate it is made once per message; made for a whole read batch
// it cost ≈ 2 % of the server's CPU at 4,000 msg/s.
func (c *conn) setInflight(seq uint64, env *pb.Envelope) {
	if c.inflight == nil {
		c.inflight = make(map[uint64]*pb.Envelope)
	}
	c.inflight[seq] = env
}

// touch records that a frame was received now.
func (c *conn) touch() { c.lastRead.Store(uint32(time.Now().Unix())) }

// logger returns the connection's logger. It is made when needed rather
// than kept: an idle connection would otherwise hold its attributes.
func (c *conn) logger() *slog.Logger {
	return c.g.log.With("device", c.dev.String(), "conn", c.id)
}

func (c *conn) poke() {
	if c.gr == nil {
		c.pumpPoke()
		return
	}
	select {
	case c.gr.wake <- struct{}{}:
	default:
	}
}

// closeWith ends the connection, telling the device why (code 0: say
// nothing, the peer has gone).
func (c *conn) closeWith(code pb.ErrorCode, msg string, ws websocket.StatusCode, retryAfter time.Duration) {
	if !c.closing.CompareAndSwap(false, true) {
		return
	}
	if code != pb.ErrorCode_ERROR_CODE_UNSPECIFIED {
		c.closeErr = &pb.Error{Code: code, Message: msg, RetryAfterMs: retryAfter.Milliseconds()}
	}
	c.closeCode = uint16(ws)
	if c.gr != nil {
		close(c.gr.closed)
	}
	c.pipe.close()
	if c.gr == nil {
		// The epoll transport has no writer to notice: say why and close
		// here (nothing in it blocks).
		c.evFinish()
	}
}

// closeNow cuts the connection off without a close handshake.
func (c *conn) closeNow() {
	if c.gr == nil {
		c.evShutdown()
		return
	}
	c.gr.ws.CloseNow()
}

// run serves the connection until it ends.
func (c *conn) run() {
	c.logger().Debug("connected")
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.writer()
	}()
	c.reader()
	c.closeWith(0, "", websocket.StatusNormalClosure, 0)
	<-done
	// Storage work the device started finishes before the connection is
	// gone (its replies are dropped), as it did when the reader did it.
	c.pipe.wait()
	c.cancel()
	c.logger().Debug("disconnected")
}

// reply queues a frame that answers a client frame. Replies are never
// dropped: if the writer cannot keep up for WriteTimeout, the device is not
// reading and the connection is closed.
func (c *conn) reply(f *pb.ServerFrame) {
	if c.gr == nil {
		// Written without blocking (nbio buffers what the socket does not
		// take; a device that does not read is cut off by the write
		// deadline). While the pipeline has more frames to finish in its
		// run, the reply waits in the batch for theirs (evwrite.go).
		c.evWriteFrame(f, false)
		c.flushReplies()
		return
	}
	select {
	case c.gr.out <- f:
		return
	default:
	}
	t := time.NewTimer(c.g.cfg.WriteTimeout)
	defer t.Stop()
	select {
	case c.gr.out <- f:
	case <-c.gr.closed:
	case <-t.C:
		c.closeWith(pb.ErrorCode_ERROR_CODE_SLOW_CONSUMER, "not reading replies", CloseSlowConsumer, 0)
	}
}

// flushReplies has the batch of an epoll connection written (by its
// flusher, with what else the connection has waiting) after a reply was
// added to it, unless the pipeline's run has more tails to answer. It is
// checked after the frame is in the batch, so a reply added just after the
// run's last flush (one from the reader, racing the pipeline) is not left
// waiting for the next.
func (c *conn) flushReplies() {
	if !c.pipe.more.Load() {
		c.evFlushSoon()
	}
}

// event queues an ephemeral frame (presence, typing); it is dropped if the
// device is not keeping up, since such events are never stored anyway.
func (c *conn) event(f *pb.ServerFrame) {
	if c.gr == nil {
		c.evWriteFrame(f, true)
		return
	}
	select {
	case c.gr.out <- f:
	default:
		c.logger().Debug("event dropped: connection not keeping up")
	}
}

// answer queues the reply to a client frame. A frame with id 0 asks for
// no reply (docs/protocol.md), so none is sent for it except an
// Error{MALFORMED}, which tells the device that a frame was not understood.
func (c *conn) answer(f *pb.ServerFrame) {
	if f.Id == 0 && f.GetError().GetCode() != pb.ErrorCode_ERROR_CODE_MALFORMED {
		return
	}
	c.reply(f)
}

func (c *conn) replyError(id uint64, code pb.ErrorCode, msg string) {
	c.g.cfg.Metrics.FrameErrors.WithLabelValues(code.String()).Inc()
	c.answer(&pb.ServerFrame{Id: id, Body: &pb.ServerFrame_Error{Error: &pb.Error{Code: code, Message: msg}}})
}

func (c *conn) replyOk(id uint64) {
	if id == 0 { // no reply asked for: not even built (most acks)
		return
	}
	c.answer(&pb.ServerFrame{Id: id, Body: &pb.ServerFrame_Ok{Ok: &pb.Ok{}}})
}

// reader reads and handles client frames until the connection fails or is
// closed.
func (c *conn) reader() {
	max := int64(c.g.cfg.MaxFrame)
	var buf bytes.Buffer
	for {
		typ, r, err := c.gr.ws.Reader(c.gr.ctx)
		if err != nil {
			return
		}
		c.touch()
		buf.Reset()
		n, err := buf.ReadFrom(io.LimitReader(r, max+1))
		if err != nil {
			return
		}
		if n > max {
			c.g.cfg.Metrics.FrameErrors.WithLabelValues(pb.ErrorCode_ERROR_CODE_FRAME_TOO_LARGE.String()).Inc()
			c.closeWith(pb.ErrorCode_ERROR_CODE_FRAME_TOO_LARGE, "frame larger than the limit", websocket.StatusMessageTooBig, 0)
			return
		}
		c.startFrame(typ, buf.Bytes())
		if buf.Cap() > 64<<10 {
			buf = bytes.Buffer{} // do not keep a large buffer for an idle connection
		}
	}
}

// frame decodes and handles one message from the device, of at most
// MaxFrame bytes: everything the connection does with a frame once it is
// read, including the storage work the reader leaves to the pipeline (the
// fuzz tests drive this without a socket).
func (c *conn) frame(typ websocket.MessageType, data []byte) {
	c.startFrame(typ, data)
	c.pipe.wait()
}

// startFrame is frame without waiting for the pipeline: what the reader
// does, so that it can read the next frame while this one's storage work
// is under way.
func (c *conn) startFrame(typ websocket.MessageType, data []byte) {
	if typ != websocket.MessageBinary {
		c.replyError(0, pb.ErrorCode_ERROR_CODE_MALFORMED, "frames are binary protobuf ClientFrame messages")
		return
	}
	f, err := decodeClientFrame(data)
	if err != nil {
		// Answer with the frame's id if it can be read, so that a device
		// waiting for that reply gets it.
		c.replyError(frameID(data), pb.ErrorCode_ERROR_CODE_MALFORMED, "cannot decode ClientFrame: "+err.Error())
		return
	}
	c.handle(f)
}

// frameID returns the id of an undecodable ClientFrame, if its top-level
// fields can be walked far enough to find one (as proto.Unmarshal would:
// the last occurrence wins), else 0.
func frameID(b []byte) uint64 {
	var id uint64
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			break
		}
		b = b[n:]
		if num == 1 && typ == protowire.VarintType {
			v, m := protowire.ConsumeVarint(b)
			if m < 0 {
				break
			}
			id, b = v, b[m:]
			continue
		}
		m := protowire.ConsumeFieldValue(num, typ, b)
		if m < 0 {
			break
		}
		b = b[m:]
	}
	return id
}

func (c *conn) handle(f *pb.ClientFrame) {
	switch b := f.Body.(type) {
	case *pb.ClientFrame_Send:
		c.handleSend(f.Id, b.Send)
	case *pb.ClientFrame_Ack:
		c.handleAck(f.Id, b.Ack)
	case *pb.ClientFrame_Read:
		c.handleRead(f.Id, b.Read)
	case *pb.ClientFrame_Subscribe:
		c.handleSubscribe(f.Id, b.Subscribe)
	case *pb.ClientFrame_Typing:
		if !ident.ValidUser(b.Typing.GetTo()) {
			c.replyError(f.Id, pb.ErrorCode_ERROR_CODE_MALFORMED, "typing: bad user name")
			return
		}
		c.g.typing(c.dev, b.Typing.To, b.Typing.Typing)
		c.replyOk(f.Id)
	case *pb.ClientFrame_Ping:
		c.answer(&pb.ServerFrame{Id: f.Id, Body: &pb.ServerFrame_Pong{Pong: &pb.Pong{
			ClientTimeMs: b.Ping.GetClientTimeMs(), ServerTimeMs: time.Now().UnixMilli()}}})
	default:
		c.replyError(f.Id, pb.ErrorCode_ERROR_CODE_MALFORMED, "frame has no known body")
	}
}

// opContext returns the context for the storage work of one frame, and a
// function to call when the work is done (see opContexts).
func (c *conn) opContext() (context.Context, context.CancelFunc) {
	return c.g.ops.get(time.Now()), func() {}
}

// opContexts hands out the contexts for storage work. Storage work for a
// frame is not cut short when the connection drops: an append half-way to
// durable should finish and be found by the retry. It is bounded by
// opTimeout: by between two thirds of it and all of it, since a context
// (and its timer) is shared by the frames of up to opTimeout/3, of every
// connection of the gateway, rather than made for each frame or kept by
// each connection (an idle connection would hold its last ones, timers
// included, until it closed).
type opContexts struct {
	cur atomic.Pointer[opContext] // the context handed out now

	mu      sync.Mutex            // held to replace cur
	cancels [3]context.CancelFunc // of the newest contexts, newest first
}

// opContext is a context for storage work, handed out until renew.
type opContext struct {
	ctx   context.Context
	renew time.Time
}

// get returns the context for storage work begun at now.
func (o *opContexts) get(now time.Time) context.Context {
	if cur := o.cur.Load(); cur != nil && !now.After(cur.renew) {
		return cur.ctx
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if cur := o.cur.Load(); cur != nil && !now.After(cur.renew) {
		return cur.ctx // replaced meanwhile
	}
	// A context handed out until renew may be in use until it expires,
	// opTimeout after it was made: by the time a third one replaces this
	// one, the one it pushes out has expired, and cancelling it only
	// releases what is left of it.
	ctx, cancel := context.WithDeadline(context.Background(), now.Add(opTimeout))
	if old := o.cancels[len(o.cancels)-1]; old != nil {
		old()
	}
	copy(o.cancels[1:], o.cancels[:len(o.cancels)-1])
	o.cancels[0] = cancel
	o.cur.Store(&opContext{ctx: ctx, renew: now.Add(opTimeout / 3)})
	return ctx
}

func (c *conn) handleSend(id uint64, s *pb.Send) {
	req := delivery.SendRequest{From: c.dev, ClientMsgID: s.ClientMsgId, To: s.To,
		Group: s.Group, GroupVersion: s.GroupVersion, Payload: s.Payload, FirstAttempt: s.GetFirstAttempt()}
	if len(s.Payloads) > 0 {
		req.Payloads = make([]delivery.Payload, 0, len(s.Payloads))
	}
	for _, p := range s.Payloads {
		d := p.GetDevice()
		if d == nil || !ident.ValidUser(d.User) || d.Device == 0 {
			c.refuse(id, &delivery.Refusal{Code: pb.RefusalCode_REFUSAL_CODE_INVALID, Message: "every payload needs a device address"})
			return
		}
		req.Payloads = append(req.Payloads, delivery.Payload{Device: ident.Device{User: d.User, ID: d.Device}, Data: p.Payload})
	}
	// The send is ordered here, on the reader, so that the device's sends
	// reach each mailbox in the order it sent them; waiting for it to be
	// durable and answering is left to the pipeline, so that the next send
	// can be ordered meanwhile and share the fsync.
	if !c.pipe.acquire() {
		return
	}
	ctx, cancel := c.opContext()
	p, err := c.g.cfg.Delivery.StartSend(ctx, req)
	c.then(func() {
		defer cancel()
		var acc delivery.Accepted
		if err == nil {
			acc, err = p.Wait(ctx)
		}
		if err != nil {
			var r *delivery.Refusal
			if !errors.As(err, &r) {
				c.logger().Error("send failed", "err", err)
				r = &delivery.Refusal{Code: pb.RefusalCode_REFUSAL_CODE_STORAGE_UNAVAILABLE, Message: "could not store the message; retry", RetryAfter: delivery.StorageRetryAfter}
			}
			c.refuse(id, r)
			return
		}
		c.answerAccepted(id, acc)
	})
}

// answerAccepted answers a Send with its Accepted: on the epoll transport
// encoded straight into the batch without reflection (one per message).
func (c *conn) answerAccepted(id uint64, acc delivery.Accepted) {
	if id == 0 {
		return
	}
	if c.gr != nil {
		c.answer(&pb.ServerFrame{Id: id, Body: &pb.ServerFrame_Accepted{Accepted: &pb.Accepted{
			ServerId: acc.ServerID, ServerTimeMs: acc.Time.UnixMilli(), Duplicate: acc.Duplicate}}})
		return
	}
	ms := acc.Time.UnixMilli()
	b := c.lockBatch()
	*b = appendAcceptedFrame(appendFrameHeader(*b, acceptedFrameSize(id, acc.ServerID, ms, acc.Duplicate)), id, acc.ServerID, ms, acc.Duplicate)
	c.unlockBatch(false)
	c.flushReplies()
}

func (c *conn) refuse(id uint64, r *delivery.Refusal) {
	c.answer(&pb.ServerFrame{Id: id, Body: &pb.ServerFrame_Refused{Refused: &pb.Refused{
		Code: r.Code, Message: r.Message, Devices: r.Devices, RetryAfterMs: r.RetryAfter.Milliseconds(), GroupVersion: r.GroupVersion}}})
}

func (c *conn) handleAck(id uint64, a *pb.Ack) {
	if len(a.Seqs) == 0 || len(a.Seqs) > 4*c.g.cfg.Window {
		c.replyError(id, pb.ErrorCode_ERROR_CODE_MALFORMED, "ack names 1 to 4×window seqs")
		return
	}
	// Only entries delivered on this connection and not yet acked can be
	// acked: a device cannot delete what it has not received.
	acked := make([]delivery.Delivered, 0, len(a.Seqs))
	c.mu.Lock()
	for _, seq := range a.Seqs {
		if env, ok := c.inflight[seq]; ok {
			acked = append(acked, delivery.Delivered{Seq: seq, Envelope: env})
			delete(c.inflight, seq)
		}
	}
	if len(c.inflight) == 0 {
		c.inflight = nil
	}
	// The pump waits for this ack only if it stopped on a full window
	// (windowStillFull); the goroutine transport's writer is always woken.
	poke := c.gr != nil || (len(acked) > 0 && c.ev.take(evWindowFull))
	c.mu.Unlock()
	// Ordered here (the receipts of successive acks keep their order),
	// finished by the pipeline, like a send, so that replies to sends and
	// acks come in frame order.
	if !c.pipe.acquire() {
		return
	}
	if len(acked) == 0 {
		c.then(func() { c.replyOk(id) })
		return
	}
	ctx, cancel := c.opContext()
	p, err := c.g.cfg.Delivery.StartAck(ctx, c.dev, acked)
	c.then(func() {
		defer cancel()
		if err == nil {
			err = p.Wait(ctx)
		}
		if poke {
			c.poke()
		}
		if err != nil {
			// The entries stay in the mailbox and come again on the next
			// connection.
			c.logger().Error("ack failed", "err", err)
			c.replyError(id, pb.ErrorCode_ERROR_CODE_INTERNAL, "ack not recorded; the entries will be delivered again")
			return
		}
		c.replyOk(id)
	})
}

func (c *conn) handleRead(id uint64, r *pb.Read) {
	ctx, cancel := c.opContext()
	err := c.g.cfg.Delivery.Read(ctx, c.dev, r.Sender, r.Messages)
	cancel()
	if err != nil {
		var ref *delivery.Refusal
		switch {
		case !errors.As(err, &ref):
			c.logger().Error("read report failed", "err", err)
			c.replyError(id, pb.ErrorCode_ERROR_CODE_INTERNAL, "read report not recorded; retry")
		case ref.Code == pb.RefusalCode_REFUSAL_CODE_UNKNOWN_RECIPIENT:
			c.replyError(id, pb.ErrorCode_ERROR_CODE_UNKNOWN_USER, ref.Message)
		case ref.Code == pb.RefusalCode_REFUSAL_CODE_INVALID:
			c.replyError(id, pb.ErrorCode_ERROR_CODE_MALFORMED, ref.Message)
		default:
			c.answer(&pb.ServerFrame{Id: id, Body: &pb.ServerFrame_Error{Error: &pb.Error{
				Code: pb.ErrorCode_ERROR_CODE_INTERNAL, Message: ref.Message, RetryAfterMs: ref.RetryAfter.Milliseconds()}}})
		}
		return
	}
	c.replyOk(id)
}

func (c *conn) handleSubscribe(id uint64, s *pb.Subscribe) {
	// Both lists are bounded: unsubscribing scans the connection's
	// subscriptions for each name.
	if len(s.Users)+len(s.Unsubscribe) == 0 || len(s.Users) > maxWatching || len(s.Unsubscribe) > maxWatching {
		c.replyError(id, pb.ErrorCode_ERROR_CODE_MALFORMED, "subscribe names 1 to 1024 users")
		return
	}
	ctx, cancel := c.opContext()
	defer cancel()
	states := make([]*pb.Presence, 0, len(s.Users))
	for _, u := range s.Users {
		if !ident.ValidUser(u) {
			c.replyError(id, pb.ErrorCode_ERROR_CODE_MALFORMED, "subscribe: bad user name "+u)
			return
		}
		p, err := c.g.presenceOf(ctx, u)
		if errors.Is(err, accounts.ErrNotFound) {
			c.replyError(id, pb.ErrorCode_ERROR_CODE_UNKNOWN_USER, "no user "+u)
			return
		}
		if err != nil {
			c.logger().Error("presence lookup", "err", err)
			c.replyError(id, pb.ErrorCode_ERROR_CODE_INTERNAL, "presence unavailable; retry")
			return
		}
		states = append(states, p)
	}
	g := c.g
	g.mu.Lock()
	watching := c.watching
	if watching == nil && len(s.Users) > 0 {
		watching = new([]string)
		c.watching = watching
	}
	for _, u := range s.Unsubscribe {
		if watching == nil {
			break // nothing to unsubscribe from
		}
		if set := g.watchers[u]; set != nil {
			delete(set, c)
			if len(set) == 0 {
				delete(g.watchers, u)
			}
		}
		for i, w := range *watching {
			if w == u {
				*watching = append((*watching)[:i], (*watching)[i+1:]...)
				break
			}
		}
	}
	full := false
	for _, u := range s.Users {
		set := g.watchers[u]
		if set == nil {
			set = map[*conn]struct{}{}
			g.watchers[u] = set
		}
		if _, ok := set[c]; ok {
			continue
		}
		if len(*watching) >= maxWatching {
			full = true
			break
		}
		set[c] = struct{}{}
		*watching = append(*watching, u)
	}
	g.mu.Unlock()
	if full {
		c.replyError(id, pb.ErrorCode_ERROR_CODE_MALFORMED, "at most 1024 presence subscriptions per connection")
		return
	}
	for _, p := range states {
		c.reply(&pb.ServerFrame{Body: &pb.ServerFrame_Presence{Presence: p}})
	}
	c.replyOk(id)
}

// writer sends Hello, then mailbox entries (pending first, then live ones)
// interleaved with replies and events, until the connection closes.
func (c *conn) writer() {
	defer c.finish()
	cfg := &c.g.cfg
	if !c.write(&pb.ServerFrame{Body: &pb.ServerFrame_Hello{Hello: &pb.Hello{
		ProtocolVersion: ProtocolVersion,
		Device:          &pb.DeviceAddress{User: c.dev.User, Device: c.dev.ID},
		ServerTimeMs:    time.Now().UnixMilli(),
		MaxPayloadBytes: uint32(cfg.Delivery.MaxPayload()),
		MaxFrameBytes:   uint32(cfg.MaxFrame),
	}}}) {
		return
	}
	synced := false
	var pending uint64
	var frame []byte
	for {
		select {
		case f := <-c.gr.out:
			if !c.writeQueued(f) {
				return
			}
			continue
		case <-c.gr.closed:
			return
		default:
		}
		c.mu.Lock()
		room := cfg.Window - len(c.inflight)
		c.mu.Unlock()
		// Entries handed over by the appends that made them durable go
		// out without a mailbox read, if they are the next ones
		// (handoff.go); the mailbox is read for anything else.
		handed, read := c.hand.next(c.lastSent.Load(), room)
		if len(handed) > 0 {
			c.corkStart()
			for _, e := range handed {
				env := c.track(e.Seq, e.Data, e.Head)
				if env == nil {
					continue
				}
				frame = appendDeliver(frame[:0], e.Seq, e.Data)
				if !c.writeRaw(frame) {
					c.hand.done()
					return
				}
				c.delivered(env, true)
			}
			room -= len(handed)
			c.hand.done()
			if !c.corkFlush() {
				return
			}
		}
		if read && room > 0 {
			want := min(room, readBatch)
			c.hand.reading()
			cfg.Metrics.MailboxReads.Inc()
			entries, err := cfg.Mailbox.Read(c.gr.ctx, c.dev, c.lastSent.Load(), want)
			if err != nil {
				if c.gr.ctx.Err() == nil {
					c.logger().Error("mailbox read", "err", err)
					c.closeWith(pb.ErrorCode_ERROR_CODE_INTERNAL, "mailbox unavailable; reconnect later", websocket.StatusInternalError, delivery.StorageRetryAfter)
				}
				return
			}
			// The entries of one read (and Synced) go out with one
			// write.
			c.corkStart()
			for _, e := range entries {
				env := c.track(e.Seq, e.Data, nil)
				if env == nil {
					continue
				}
				frame = appendDeliver(frame[:0], e.Seq, e.Data)
				if !c.writeRaw(frame) {
					return
				}
				c.delivered(env, false)
			}
			pending += uint64(len(entries))
			c.hand.readDone(len(entries) < want, c.lastSent.Load())
			if len(entries) < want && !synced {
				synced = true
				if !c.write(&pb.ServerFrame{Body: &pb.ServerFrame_Synced{Synced: &pb.Synced{Pending: pending}}}) {
					return
				}
			}
			if !c.corkFlush() {
				return
			}
			if cap(frame) > 64<<10 {
				frame = nil
			}
			continue
		}
		if cap(frame) > 64<<10 {
			frame = nil
		}
		// Nothing to send, or the window is full: wait for a
		// notification, or for acks (they poke wake).
		select {
		case f := <-c.gr.out:
			if !c.writeQueued(f) {
				return
			}
		case <-c.gr.wake:
		case <-c.gr.closed:
			return
		}
	}
}

// track records the entry seq, whose encoded envelope is data, as sent
// and in flight, before it is written (the device may ack it at once),
// and returns its envelope (payload dropped): head, if the append handed
// it over (shared, read-only), else data decoded. An entry that cannot be
// decoded (the store would have to be corrupt) is skipped rather than
// wedge the mailbox, and said so: track returns nil.
func (c *conn) track(seq uint64, data []byte, head *pb.Envelope) *pb.Envelope {
	env := head
	if env == nil {
		env = new(pb.Envelope)
		if err := proto.Unmarshal(data, env); err != nil {
			c.logger().Error("undecodable mailbox entry skipped", "seq", seq, "err", err)
			c.lastSent.Store(seq)
			return nil
		}
		env.Payload = nil
	}
	c.mu.Lock()
	c.setInflight(seq, env)
	c.mu.Unlock()
	c.lastSent.Store(seq)
	return env
}

// delivered counts an entry written to the device, handed over by its
// append (handed) or read from the mailbox.
func (c *conn) delivered(env *pb.Envelope, handed bool) {
	m := c.g.cfg.Metrics
	m.Delivered.Inc()
	if handed {
		m.Handed.Inc()
	}
	if env.Kind == pb.EnvelopeKind_ENVELOPE_KIND_MESSAGE {
		m.DeliverLatency.Observe(time.Since(time.UnixMilli(env.ServerTimeMs)).Seconds())
	}
}

// finish closes the WebSocket, first telling the device why if there is a
// reason to give.
func (c *conn) finish() {
	c.closeWith(0, "", websocket.StatusNormalClosure, 0)
	gr := c.gr
	// If another closeWith won, its code and reason are set once it has
	// closed the channel.
	<-gr.closed
	if gr.cc != nil {
		// Frames held by a writer that stopped half-way go first (best
		// effort: the connection may be broken).
		gr.cc.flush()
	}
	// A device that does not answer the close handshake within closeGrace
	// is cut off: cancelling the reader's context closes the socket, which
	// ends the handshake too (it would otherwise wait 5 s for a reader
	// stuck in the middle of a frame).
	cut := time.AfterFunc(closeGrace, gr.cancel)
	defer cut.Stop()
	if c.closeErr != nil {
		// Best effort: the device may not be reading.
		c.write(&pb.ServerFrame{Body: &pb.ServerFrame_Error{Error: c.closeErr}})
		c.g.cfg.Metrics.FrameErrors.WithLabelValues(c.closeErr.Code.String()).Inc()
		gr.ws.Close(websocket.StatusCode(c.closeCode), c.closeErr.Code.String())
	} else if c.closeCode == uint16(CloseSlowConsumer) {
		gr.ws.CloseNow()
	} else {
		gr.ws.Close(websocket.StatusCode(c.closeCode), "")
	}
	gr.cancel() // unblocks the reader
}

// writeExpired ends a connection whose write took longer than WriteTimeout.
// Cancelling the reader's context closes the socket (the WebSocket library
// does that for a context that ends during a read), and CloseNow does when
// the reader is not reading; either way the write fails.
func (c *conn) writeExpired() {
	c.gr.wexpired.Store(true)
	c.gr.cancel()
	c.gr.ws.CloseNow()
}

func (c *conn) write(f *pb.ServerFrame) bool {
	if c.gr == nil {
		return c.evWriteFrame(f, true)
	}
	b, err := proto.Marshal(f)
	if err != nil {
		c.logger().Error("encode frame", "err", err)
		return false
	}
	return c.writeRaw(b)
}

// writeRaw writes one frame, within WriteTimeout (see timedWrite).
func (c *conn) writeRaw(b []byte) bool {
	if c.gr == nil {
		return c.evWrite(b, true)
	}
	return c.timedWrite(func() error { return c.gr.ws.Write(context.Background(), websocket.MessageBinary, b) })
}

// writeQueued writes f and the frames queued after it for the writer (up
// to outQueue), with one write.
func (c *conn) writeQueued(f *pb.ServerFrame) bool {
	c.corkStart()
	for n := 1; ; n++ {
		if !c.write(f) {
			return false
		}
		if n == outQueue {
			break
		}
		select {
		case f = <-c.gr.out:
			continue
		default:
		}
		break
	}
	return c.corkFlush()
}

// corkStart holds the writes that follow, until corkFlush (goroutine
// transport; see cork.go).
func (c *conn) corkStart() {
	if c.gr.cc != nil {
		c.gr.cc.cork()
	}
}

// corkFlush writes what corkStart held, within WriteTimeout.
func (c *conn) corkFlush() bool {
	if c.gr.cc == nil {
		return true
	}
	return c.timedWrite(c.gr.cc.flush)
}

// timedWrite runs write (one write of the WebSocket) within WriteTimeout.
// The timeout is one timer per connection, reset for each write, rather
// than a context with a timer for each: when it fires it does what the
// WebSocket library does when a write's context expires, close the
// connection, which fails the write.
func (c *conn) timedWrite(write func() error) bool {
	gr := c.gr
	if gr.wtimer == nil {
		gr.wtimer = time.AfterFunc(c.g.cfg.WriteTimeout, c.writeExpired)
	} else {
		gr.wtimer.Reset(c.g.cfg.WriteTimeout)
	}
	err := write()
	if !gr.wtimer.Stop() && err == nil {
		// Fired as the write completed; the connection is being closed.
		err = errors.New("write timed out")
	}
	if err != nil {
		if gr.wexpired.Load() {
			c.closeWith(0, "", CloseSlowConsumer, 0)
			c.logger().Info("slow consumer: write timed out; closing", "timeout", c.g.cfg.WriteTimeout)
		} else {
			c.closeWith(0, "", websocket.StatusNormalClosure, 0)
		}
		return false
	}
	return true
}

// appendDeliver encodes ServerFrame{deliver: Deliver{seq, envelope}} around
// an envelope that is already encoded, so that a mailbox entry goes out
// without being decoded and re-encoded. The bytes are exactly what
// proto.Marshal would produce for the same message.
func appendDeliver(b []byte, seq uint64, envelope []byte) []byte {
	inner := protowire.SizeTag(1) + protowire.SizeVarint(seq) + protowire.SizeTag(2) + protowire.SizeBytes(len(envelope))
	b = protowire.AppendTag(b, 5, protowire.BytesType)
	b = protowire.AppendVarint(b, uint64(inner))
	b = protowire.AppendTag(b, 1, protowire.VarintType)
	b = protowire.AppendVarint(b, seq)
	b = protowire.AppendTag(b, 2, protowire.BytesType)
	b = protowire.AppendBytes(b, envelope)
	return b
}
