package gateway

import (
	"encoding/binary"
	"errors"
	"log/slog"
	"runtime/debug"
	"sync"
	"sync/atomic"

	"github.com/coder/websocket"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	pb "github.com/courier-im/courier/proto/courier/v1"
)

// Batched writes on the epoll transport.
//
// Every frame the server sends on an epoll connection is framed here
// (server frames are unmasked: a 2 to 10 byte header and the payload) and
// appended to the connection's batch, a pooled buffer; the batch is handed
// to the socket, with one write(2), when the writer asks for it (flush),
// when the connection's flusher gets to it (evFlushSoon, flush.go) or
// when it reaches flushAt bytes. So the pump sends a whole mailbox read
// (up to readBatch Deliver frames, and Synced) with one write, and the
// pipeline the replies of all the frames it finishes in one run (the
// Accepted frames of a pipelined burst of sends, the Oks of acks). Frames
// of one connection keep the order in which they were appended, whoever
// appends them. A connection with nothing waiting holds no buffer.

// flushAt is the batch size past which a batch is written whatever the
// writer asked.
const flushAt = 32 << 10

// batchPool holds batch buffers between flushes.
var batchPool = sync.Pool{New: func() any {
	b := make([]byte, 0, 4<<10)
	return &b
}}

// evBatch is a connection's batch of frames waiting to be written.
type evBatch struct {
	wmu sync.Mutex
	buf *[]byte // nil: nothing waiting
}

// appendFrameHeader appends the header of an unmasked, final binary frame
// whose payload is n bytes.
func appendFrameHeader(b []byte, n int) []byte {
	const finBinary = 0x80 | 0x2
	switch {
	case n < 126:
		return append(b, finBinary, byte(n))
	case n < 1<<16:
		return binary.BigEndian.AppendUint16(append(b, finBinary, 126), uint16(n))
	default:
		return binary.BigEndian.AppendUint64(append(b, finBinary, 127), uint64(n))
	}
}

// Field numbers of ServerFrame.id, ServerFrame.accepted and Accepted's
// fields (proto/courier/v1/courier.proto).
const (
	serverFrameIDField       = 1
	serverFrameAcceptedField = 3
	acceptedServerIDField    = 1
	acceptedTimeField        = 2
	acceptedDuplicateField   = 3
)

// appendAcceptedFrame appends a ServerFrame{id, Accepted{serverID, ms,
// dup}} as proto.Marshal writes it (fields in number order, proto3
// defaults left out; TestAcceptedFrameEncoding compares them).
func appendAcceptedFrame(b []byte, id uint64, serverID string, ms int64, dup bool) []byte {
	if id != 0 {
		b = protowire.AppendVarint(protowire.AppendTag(b, serverFrameIDField, protowire.VarintType), id)
	}
	b = protowire.AppendTag(b, serverFrameAcceptedField, protowire.BytesType)
	b = protowire.AppendVarint(b, uint64(acceptedSize(serverID, ms, dup)))
	if serverID != "" {
		b = protowire.AppendString(protowire.AppendTag(b, acceptedServerIDField, protowire.BytesType), serverID)
	}
	if ms != 0 {
		b = protowire.AppendVarint(protowire.AppendTag(b, acceptedTimeField, protowire.VarintType), uint64(ms))
	}
	if dup {
		b = protowire.AppendVarint(protowire.AppendTag(b, acceptedDuplicateField, protowire.VarintType), 1)
	}
	return b
}

func acceptedSize(serverID string, ms int64, dup bool) int {
	n := 0
	if serverID != "" {
		n += protowire.SizeTag(acceptedServerIDField) + protowire.SizeBytes(len(serverID))
	}
	if ms != 0 {
		n += protowire.SizeTag(acceptedTimeField) + protowire.SizeVarint(uint64(ms))
	}
	if dup {
		n += protowire.SizeTag(acceptedDuplicateField) + 1
	}
	return n
}

// acceptedFrameSize is the length of appendAcceptedFrame's encoding.
func acceptedFrameSize(id uint64, serverID string, ms int64, dup bool) int {
	n := protowire.SizeTag(serverFrameAcceptedField) + protowire.SizeBytes(acceptedSize(serverID, ms, dup))
	if id != 0 {
		n += protowire.SizeTag(serverFrameIDField) + protowire.SizeVarint(id)
	}
	return n
}

// deliverSize is the length of appendDeliver's encoding.
func deliverSize(seq uint64, n int) int {
	inner := protowire.SizeTag(1) + protowire.SizeVarint(seq) + protowire.SizeTag(2) + protowire.SizeBytes(n)
	return protowire.SizeTag(5) + protowire.SizeBytes(inner)
}

// lockBatch locks the connection's batch and returns its buffer, taking
// one from the pool if none is waiting.
func (c *conn) lockBatch() *[]byte {
	s := &c.ev
	s.wmu.Lock()
	if s.buf == nil {
		s.buf = batchPool.Get().(*[]byte)
	}
	return s.buf
}

// unlockBatch releases the batch locked by lockBatch, first writing it if
// flush is set or it has grown to flushAt. It reports false if the write
// failed (the connection is then closing).
func (c *conn) unlockBatch(flush bool) bool {
	s := &c.ev
	if !flush && len(*s.buf) < flushAt {
		s.wmu.Unlock()
		return true
	}
	err := c.writeBatchLocked()
	s.wmu.Unlock()
	if err != nil {
		// After the unlock: closing writes the close frames.
		if errors.Is(err, errOverflow) {
			c.logger().Info("slow consumer: too much written and not read; closed")
			c.closeWith(0, "", CloseSlowConsumer, 0)
		} else {
			c.closeWith(0, "", websocket.StatusNormalClosure, 0)
		}
		return false
	}
	return true
}

// writeBatchLocked hands the batch to the socket: at once as far as the
// socket takes it, the rest by the event loop within WriteTimeout (a
// device that does not read is cut off when it passes).
func (c *conn) writeBatchLocked() error {
	s := &c.ev
	b := s.buf
	s.buf = nil
	if b == nil {
		return nil
	}
	var err error
	if len(*b) > 0 {
		// What the socket does not take waits for the loop.
		err = c.evSendLocked(*b)
	}
	if cap(*b) <= 64<<10 {
		*b = (*b)[:0]
		batchPool.Put(b)
	}
	return err
}

// evFlush writes what is waiting in the batch.
func (c *conn) evFlush() bool {
	c.ev.wmu.Lock()
	return c.unlockBatch(true)
}

// evWrite writes one binary message of encoded bytes, now if flush is set,
// else with the next flush.
func (c *conn) evWrite(msg []byte, flush bool) bool {
	b := c.lockBatch()
	*b = append(appendFrameHeader(*b, len(msg)), msg...)
	return c.unlockBatch(flush)
}

// evWriteFrame encodes f straight into the batch.
func (c *conn) evWriteFrame(f *pb.ServerFrame, flush bool) bool {
	n := proto.Size(f)
	b := c.lockBatch()
	start := len(*b)
	*b = appendFrameHeader(*b, n)
	out, err := proto.MarshalOptions{UseCachedSize: true}.MarshalAppend(*b, f)
	if err != nil || len(out)-len(*b) != n {
		*b = (*b)[:start]
		c.ev.wmu.Unlock()
		c.logger().Error("encode frame", "err", err)
		return false
	}
	*b = out
	return c.unlockBatch(flush)
}

// evWriteControl writes a control frame (ping, pong) now.
func (c *conn) evWriteControl(op byte, payload []byte) bool {
	b := c.lockBatch()
	*b = append(append(*b, 0x80|op, byte(len(payload))), payload...)
	return c.unlockBatch(true)
}

// evWriteClose writes a close frame with code and reason now, after the
// frames waiting in the batch.
func (c *conn) evWriteClose(code websocket.StatusCode, reason string) bool {
	if len(reason) > 123 {
		reason = reason[:123]
	}
	b := c.lockBatch()
	*b = append(*b, 0x80|opClose, byte(2+len(reason)))
	*b = binary.BigEndian.AppendUint16(*b, uint16(code))
	*b = append(*b, reason...)
	return c.unlockBatch(true)
}

// evAppendDeliver adds a Deliver frame for a mailbox entry to the batch,
// without decoding the entry (see appendDeliver).
func (c *conn) evAppendDeliver(seq uint64, entry []byte) bool {
	b := c.lockBatch()
	*b = appendDeliver(appendFrameHeader(*b, deliverSize(seq, len(entry))), seq, entry)
	return c.unlockBatch(false)
}

// workers runs the epoll transport's jobs (frame handling, the mailbox
// pump) on goroutines that live on between jobs, up to max at once, rather
// than a new goroutine for each job: frame handling goes deep (SQLite
// look-ups, storage), and a new goroutine grows its stack from the
// smallest size by copying it, each time (≈ 10 % of the CPU of a busy
// server on nbio's own pool). Idle workers wait for the next job; their
// stacks are shrunk by the collector while they wait. Jobs beyond max wait
// in a queue, in order, as on nbio's pool.
type workers struct {
	max     int32
	n       atomic.Int32 // workers started and not ended
	idle    atomic.Int32 // idle workers minus jobs waiting in the queue
	queue   chan func()  // a nil job ends the worker that takes it
	stop    chan struct{}
	stopped atomic.Bool
	once    sync.Once
	log     *slog.Logger
}

func newWorkers(max int, log *slog.Logger) *workers {
	return &workers{max: int32(max), queue: make(chan func(), 64<<10), stop: make(chan struct{}), log: log}
}

// Go runs f on a worker. It blocks only when the queue is full.
func (w *workers) Go(f func()) {
	for {
		i := w.idle.Load()
		if i <= 0 {
			break
		}
		if w.idle.CompareAndSwap(i, i-1) {
			w.send(f) // an idle worker takes it
			return
		}
	}
	if w.n.Add(1) <= w.max {
		go w.run(f)
		return
	}
	w.n.Add(-1)
	w.idle.Add(-1) // owed to the next worker that becomes idle
	w.send(f)
}

// send queues f. The queue has room nearly always: then a plain send,
// not the select that also watches stop (which locks both channels).
func (w *workers) send(f func()) {
	select {
	case w.queue <- f:
		return
	default:
	}
	select {
	case w.queue <- f:
	case <-w.stop:
	}
}

// run runs f, then the jobs it takes from the queue, until it takes a nil
// one (Stop) or finds the pool stopped after a job. An idle worker waits
// on the queue alone: a plain receive, where a select on the queue and
// stop cost ≈ 4 % of a busy server's CPU.
func (w *workers) run(f func()) {
	defer w.n.Add(-1)
	for {
		w.call(f)
		if w.stopped.Load() {
			return
		}
		w.idle.Add(1)
		if f = <-w.queue; f == nil {
			return
		}
	}
}

// call runs one job; a job that panics is logged, as nbio's pool does,
// rather than taking the server down.
func (w *workers) call(f func()) {
	defer func() {
		if err := recover(); err != nil {
			w.log.Error("epoll transport: job panicked", "panic", err, "stack", string(debug.Stack()))
		}
	}()
	f()
}

// Stop ends the idle workers and every worker once its job returns; jobs
// still queued are dropped.
func (w *workers) Stop() {
	w.once.Do(func() {
		w.stopped.Store(true)
		close(w.stop)
		// One nil job per worker wakes the idle ones; a busy one ends
		// after its job, leaving its nil in the queue. A full queue means
		// that no worker is idle.
		for range w.n.Load() {
			select {
			case w.queue <- nil:
			default:
				return
			}
		}
	})
}
