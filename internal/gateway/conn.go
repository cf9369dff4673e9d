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
)

// conn is one device connection.
type conn struct {
	g   *Gateway
	dev ident.Device
	ws  *websocket.Conn
	log *slog.Logger

	ctx    context.Context // cancelled when the connection ends
	cancel context.CancelFunc

	lastRead atomic.Int64 // unix nanos of the last frame received
	lastSent atomic.Uint64

	wake chan struct{}        // the mailbox has new entries, or acks opened the window
	out  chan *pb.ServerFrame // replies and events for the writer

	closeOnce sync.Once
	closed    chan struct{}
	closeErr  *pb.Error // nil: the peer went away
	closeCode websocket.StatusCode

	mu       sync.Mutex
	inflight map[uint64]*pb.Envelope // delivered, not yet acked (payloads dropped)

	watching []string // guarded by g.mu
}

func newConn(g *Gateway, dev ident.Device, ws *websocket.Conn) *conn {
	ctx, cancel := context.WithCancel(context.Background())
	c := &conn{
		g:        g,
		dev:      dev,
		ws:       ws,
		log:      g.log.With("device", dev.String(), "conn", connSeq.Add(1)),
		ctx:      ctx,
		cancel:   cancel,
		wake:     make(chan struct{}, 1),
		out:      make(chan *pb.ServerFrame, outQueue),
		closed:   make(chan struct{}),
		inflight: map[uint64]*pb.Envelope{},
	}
	c.lastRead.Store(time.Now().UnixNano())
	return c
}

func (c *conn) poke() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// closeWith ends the connection, telling the device why (code 0: say
// nothing, the peer has gone).
func (c *conn) closeWith(code pb.ErrorCode, msg string, ws websocket.StatusCode, retryAfter time.Duration) {
	c.closeOnce.Do(func() {
		if code != pb.ErrorCode_ERROR_CODE_UNSPECIFIED {
			c.closeErr = &pb.Error{Code: code, Message: msg, RetryAfterMs: retryAfter.Milliseconds()}
		}
		c.closeCode = ws
		close(c.closed)
	})
}

// run serves the connection until it ends.
func (c *conn) run() {
	c.log.Debug("connected")
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.writer()
	}()
	c.reader()
	c.closeWith(0, "", websocket.StatusNormalClosure, 0)
	<-done
	c.cancel()
	c.log.Debug("disconnected")
}

// reply queues a frame that answers a client frame. Replies are never
// dropped: if the writer cannot keep up for WriteTimeout, the device is not
// reading and the connection is closed.
func (c *conn) reply(f *pb.ServerFrame) {
	select {
	case c.out <- f:
		return
	default:
	}
	t := time.NewTimer(c.g.cfg.WriteTimeout)
	defer t.Stop()
	select {
	case c.out <- f:
	case <-c.closed:
	case <-t.C:
		c.closeWith(pb.ErrorCode_ERROR_CODE_SLOW_CONSUMER, "not reading replies", CloseSlowConsumer, 0)
	}
}

// event queues an ephemeral frame (presence, typing); it is dropped if the
// device is not keeping up, since such events are never stored anyway.
func (c *conn) event(f *pb.ServerFrame) {
	select {
	case c.out <- f:
	default:
		c.log.Debug("event dropped: connection not keeping up")
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
	c.answer(&pb.ServerFrame{Id: id, Body: &pb.ServerFrame_Ok{Ok: &pb.Ok{}}})
}

// reader reads and handles client frames until the connection fails or is
// closed.
func (c *conn) reader() {
	max := int64(c.g.cfg.MaxFrame)
	var buf bytes.Buffer
	for {
		typ, r, err := c.ws.Reader(c.ctx)
		if err != nil {
			return
		}
		c.lastRead.Store(time.Now().UnixNano())
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
		c.frame(typ, buf.Bytes())
		if buf.Cap() > 64<<10 {
			buf = bytes.Buffer{} // do not keep a large buffer for an idle connection
		}
	}
}

// frame decodes and handles one message from the device, of at most
// MaxFrame bytes: everything the connection does with a frame once it is
// read (the fuzz tests drive this without a socket).
func (c *conn) frame(typ websocket.MessageType, data []byte) {
	if typ != websocket.MessageBinary {
		c.replyError(0, pb.ErrorCode_ERROR_CODE_MALFORMED, "frames are binary protobuf ClientFrame messages")
		return
	}
	var f pb.ClientFrame
	if err := proto.Unmarshal(data, &f); err != nil {
		// Answer with the frame's id if it can be read, so that a device
		// waiting for that reply gets it.
		c.replyError(frameID(data), pb.ErrorCode_ERROR_CODE_MALFORMED, "cannot decode ClientFrame: "+err.Error())
		return
	}
	c.handle(&f)
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

func (c *conn) opContext() (context.Context, context.CancelFunc) {
	// Storage work for a frame is not cut short when the connection drops:
	// an append half-way to durable should finish and be found by the retry.
	return context.WithTimeout(context.WithoutCancel(c.ctx), opTimeout)
}

func (c *conn) handleSend(id uint64, s *pb.Send) {
	req := delivery.SendRequest{From: c.dev, ClientMsgID: s.ClientMsgId, To: s.To, Payloads: make([]delivery.Payload, 0, len(s.Payloads))}
	for _, p := range s.Payloads {
		d := p.GetDevice()
		if d == nil || !ident.ValidUser(d.User) || d.Device == 0 {
			c.refuse(id, &delivery.Refusal{Code: pb.RefusalCode_REFUSAL_CODE_INVALID, Message: "every payload needs a device address"})
			return
		}
		req.Payloads = append(req.Payloads, delivery.Payload{Device: ident.Device{User: d.User, ID: d.Device}, Data: p.Payload})
	}
	ctx, cancel := c.opContext()
	acc, err := c.g.cfg.Delivery.Send(ctx, req)
	cancel()
	if err != nil {
		var r *delivery.Refusal
		if !errors.As(err, &r) {
			c.log.Error("send failed", "err", err)
			r = &delivery.Refusal{Code: pb.RefusalCode_REFUSAL_CODE_STORAGE_UNAVAILABLE, Message: "could not store the message; retry", RetryAfter: delivery.StorageRetryAfter}
		}
		c.refuse(id, r)
		return
	}
	c.answer(&pb.ServerFrame{Id: id, Body: &pb.ServerFrame_Accepted{Accepted: &pb.Accepted{
		ServerId: acc.ServerID, ServerTimeMs: acc.Time.UnixMilli(), Duplicate: acc.Duplicate}}})
}

func (c *conn) refuse(id uint64, r *delivery.Refusal) {
	c.answer(&pb.ServerFrame{Id: id, Body: &pb.ServerFrame_Refused{Refused: &pb.Refused{
		Code: r.Code, Message: r.Message, Devices: r.Devices, RetryAfterMs: r.RetryAfter.Milliseconds()}}})
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
	c.mu.Unlock()
	if len(acked) > 0 {
		ctx, cancel := c.opContext()
		err := c.g.cfg.Delivery.Ack(ctx, c.dev, acked)
		cancel()
		if err != nil {
			// The entries stay in the mailbox and come again on the next
			// connection.
			c.log.Error("ack failed", "err", err)
			c.replyError(id, pb.ErrorCode_ERROR_CODE_INTERNAL, "ack not recorded; the entries will be delivered again")
			c.poke()
			return
		}
		c.poke()
	}
	c.replyOk(id)
}

func (c *conn) handleRead(id uint64, r *pb.Read) {
	ctx, cancel := c.opContext()
	err := c.g.cfg.Delivery.Read(ctx, c.dev, r.Sender, r.Messages)
	cancel()
	if err != nil {
		var ref *delivery.Refusal
		switch {
		case !errors.As(err, &ref):
			c.log.Error("read report failed", "err", err)
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
			c.log.Error("presence lookup", "err", err)
			c.replyError(id, pb.ErrorCode_ERROR_CODE_INTERNAL, "presence unavailable; retry")
			return
		}
		states = append(states, p)
	}
	g := c.g
	g.mu.Lock()
	for _, u := range s.Unsubscribe {
		if set := g.watchers[u]; set != nil {
			delete(set, c)
			if len(set) == 0 {
				delete(g.watchers, u)
			}
		}
		for i, w := range c.watching {
			if w == u {
				c.watching = append(c.watching[:i], c.watching[i+1:]...)
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
		if len(c.watching) >= maxWatching {
			full = true
			break
		}
		set[c] = struct{}{}
		c.watching = append(c.watching, u)
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
	dirty, synced := true, false
	var pending uint64
	var frame []byte
	for {
		select {
		case f := <-c.out:
			if !c.write(f) {
				return
			}
			continue
		case <-c.closed:
			return
		default:
		}
		if dirty {
			c.mu.Lock()
			room := cfg.Window - len(c.inflight)
			c.mu.Unlock()
			if room > 0 {
				want := min(room, readBatch)
				entries, err := cfg.Mailbox.Read(c.ctx, c.dev, c.lastSent.Load(), want)
				if err != nil {
					if c.ctx.Err() == nil {
						c.log.Error("mailbox read", "err", err)
						c.closeWith(pb.ErrorCode_ERROR_CODE_INTERNAL, "mailbox unavailable; reconnect later", websocket.StatusInternalError, delivery.StorageRetryAfter)
					}
					return
				}
				for _, e := range entries {
					env := new(pb.Envelope)
					if err := proto.Unmarshal(e.Data, env); err != nil {
						// Cannot happen unless the store is corrupt; skip the
						// entry rather than wedge the mailbox, and say so.
						c.log.Error("undecodable mailbox entry skipped", "seq", e.Seq, "err", err)
						c.lastSent.Store(e.Seq)
						continue
					}
					// Record the entry as in flight before writing it: the
					// device may ack it before writeRaw returns.
					env.Payload = nil
					c.mu.Lock()
					c.inflight[e.Seq] = env
					c.mu.Unlock()
					c.lastSent.Store(e.Seq)
					frame = appendDeliver(frame[:0], e.Seq, e.Data)
					if !c.writeRaw(frame) {
						return
					}
					cfg.Metrics.Delivered.Inc()
					if env.Kind == pb.EnvelopeKind_ENVELOPE_KIND_MESSAGE {
						cfg.Metrics.DeliverLatency.Observe(time.Since(time.UnixMilli(env.ServerTimeMs)).Seconds())
					}
				}
				pending += uint64(len(entries))
				if len(entries) < want {
					dirty = false
					if !synced {
						synced = true
						if !c.write(&pb.ServerFrame{Body: &pb.ServerFrame_Synced{Synced: &pb.Synced{Pending: pending}}}) {
							return
						}
					}
				}
				if cap(frame) > 64<<10 {
					frame = nil
				}
				continue
			}
			// The window is full: wait for acks (they poke wake).
		}
		select {
		case f := <-c.out:
			if !c.write(f) {
				return
			}
		case <-c.wake:
			dirty = true
		case <-c.closed:
			return
		}
	}
}

// finish closes the WebSocket, first telling the device why if there is a
// reason to give.
func (c *conn) finish() {
	c.closeWith(0, "", websocket.StatusNormalClosure, 0)
	// A device that does not answer the close handshake within closeGrace
	// is cut off: cancelling the reader's context closes the socket, which
	// ends the handshake too (it would otherwise wait 5 s for a reader
	// stuck in the middle of a frame).
	cut := time.AfterFunc(closeGrace, c.cancel)
	defer cut.Stop()
	if c.closeErr != nil {
		// Best effort: the device may not be reading.
		c.write(&pb.ServerFrame{Body: &pb.ServerFrame_Error{Error: c.closeErr}})
		c.g.cfg.Metrics.FrameErrors.WithLabelValues(c.closeErr.Code.String()).Inc()
		c.ws.Close(c.closeCode, c.closeErr.Code.String())
	} else if c.closeCode == CloseSlowConsumer {
		c.ws.CloseNow()
	} else {
		c.ws.Close(c.closeCode, "")
	}
	c.cancel() // unblocks the reader
}

func (c *conn) write(f *pb.ServerFrame) bool {
	b, err := proto.Marshal(f)
	if err != nil {
		c.log.Error("encode frame", "err", err)
		return false
	}
	return c.writeRaw(b)
}

func (c *conn) writeRaw(b []byte) bool {
	ctx, cancel := context.WithTimeout(context.Background(), c.g.cfg.WriteTimeout)
	err := c.ws.Write(ctx, websocket.MessageBinary, b)
	cancel()
	if err != nil {
		if ctx.Err() != nil {
			c.closeWith(0, "", CloseSlowConsumer, 0)
			c.log.Info("slow consumer: write timed out; closing", "timeout", c.g.cfg.WriteTimeout)
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
