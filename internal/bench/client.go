package bench

import (
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/protobuf/proto"

	pb "github.com/courier-im/courier/proto/courier/v1"
)

// client is one bench device and its current connection. It behaves as a
// real client would: it acks every delivery (messages and receipts, one
// Ack per read batch), answers WebSocket pings, and heartbeats with
// protocol Pings. All its callbacks run on the event loop.
type client struct {
	// Connection and parser state, under mu.
	mu        sync.Mutex
	nc        *wsConn
	rbuf      []byte
	frag      []byte
	closing   bool
	closeCode int
	acks      []uint64 // seqs to ack once the current read batch is parsed
	ackKeys   []uint64 // message keys among them (confirm mode)
	credits   int      // sends answered in this batch (closed loop)
	synced    bool     // Synced seen in this batch
	confirms  map[uint64][]uint64
	// unconfirmed (confirm mode) holds the message keys this device acked
	// and the server has not confirmed, with the connection it last got
	// each on. It outlives connections: an ack the server applied just
	// before the connection ended (a restart drops the replies of what
	// it finishes) is never confirmed, and its entry never comes again.
	unconfirmed map[uint64]uint32
	// While a read batch is handled (held), the frames the client writes
	// (its Ack, the sends the batch's answers let it make) are kept in
	// out and written together once it is done, as a client answering a
	// batch of frames at once would: one write(2) where there were one
	// per frame, so the bench's own CPU, which shares the machine with
	// the server, is not spent on syscalls. heldSends counts the sends
	// among them.
	held      bool
	out       *[]byte
	heldSends int

	r      *run
	acct   *account
	src    net.IP
	epoch  uint32       // connection number, from 1 (written by the dialer under mu)
	hintMs atomic.Int64 // retry_after_ms of the last closing Error
	up     atomic.Bool
	nextID atomic.Uint64
	// holdAcks: deliveries are recorded but not acked (a phone that dies
	// before acking).
	holdAcks atomic.Bool
	snd      *sender // non-nil for a sending device
	// groupStream, for a member of a bench group, numbers the group's
	// messages as this device receives them: message n of the group send
	// is message n of groupStream (see sender.fan).
	groupStream *stream
	attempt     atomic.Int32 // reconnect attempts since the last success
	expect      int          // storm: messages this device must get acked
}

// Frame ids: a Send's id is its message number + 1, so the reply names the
// message without a table; every other request uses the high half.
const otherIDs = 1 << 63

func (c *client) otherID() uint64 { return otherIDs | c.nextID.Add(1) }

// onData runs on the event loop for bytes read from the connection.
func (c *client) onData(data []byte) {
	c.mu.Lock()
	c.held = true
	c.parseLocked(data)
	c.mu.Unlock()
	c.flushAcks()
	c.mu.Lock()
	c.releaseLocked()
	c.mu.Unlock()
}

// releaseLocked ends holding writes and writes what was held.
func (c *client) releaseLocked() {
	c.held = false
	bp, sends := c.out, c.heldSends
	c.out, c.heldSends = nil, 0
	if bp == nil {
		return
	}
	err := net.ErrClosed
	if c.nc != nil {
		_, err = c.nc.Write(*bp)
	}
	if err != nil && sends > 0 && c.snd != nil {
		// As for a send written on its own: never accepted, not lost.
		c.snd.inflight.Add(int64(-sends))
		c.r.count("send_write_errors", int64(sends))
	}
	*bp = (*bp)[:0]
	if cap(*bp) <= 64<<10 {
		framePool.Put(bp)
	}
}

// flushAcks sends the batch's Ack and runs what the batch unblocked.
func (c *client) flushAcks() {
	c.mu.Lock()
	acks, keys, credits, synced := c.acks, c.ackKeys, c.credits, c.synced
	c.acks, c.ackKeys, c.credits, c.synced = c.acks[:0], c.ackKeys[:0], 0, false
	var id uint64
	if len(acks) > 0 && c.r.confirmAcks {
		id = c.otherID()
		if c.confirms == nil {
			c.confirms = map[uint64][]uint64{}
		}
		c.confirms[id] = append([]uint64(nil), keys...)
		if c.unconfirmed == nil {
			c.unconfirmed = map[uint64]uint32{}
		}
		for _, k := range keys {
			c.unconfirmed[k] = c.epoch
		}
	}
	if len(acks) > 0 {
		c.sendLocked(&pb.ClientFrame{Id: id, Body: &pb.ClientFrame_Ack{Ack: &pb.Ack{Seqs: acks}}})
	}
	if cap(c.acks) > 256 {
		c.acks, c.ackKeys = nil, nil // do not keep a large batch's buffer on an idle device
	}
	c.mu.Unlock()
	if synced {
		if !c.up.Swap(true) {
			c.r.up.Add(1)
		}
		c.attempt.Store(0)
		if c.r.onSynced != nil {
			c.r.onSynced(c)
		}
	}
	if credits > 0 && c.snd != nil {
		c.snd.answered(c, credits)
	}
}

var framePoolPB = sync.Pool{New: func() any { return new(pb.ServerFrame) }}

// onMessageLocked handles one ServerFrame.
func (c *client) onMessageLocked(msg []byte) {
	var ff fastFrame
	if decodeFast(msg, &ff) {
		if ff.body == frameDeliverField {
			c.deliveryLocked(&ff.deliver)
		} else {
			c.acceptedLocked(ff.id)
		}
		return
	}
	f := framePoolPB.Get().(*pb.ServerFrame)
	defer func() { f.Reset(); framePoolPB.Put(f) }()
	if err := proto.Unmarshal(msg, f); err != nil {
		c.r.count("undecodable_frames", 1)
		return
	}
	switch b := f.Body.(type) {
	case *pb.ServerFrame_Hello:
	case *pb.ServerFrame_Synced:
		c.synced = true
		c.appliedLocked()
	case *pb.ServerFrame_Deliver:
		c.deliverLocked(b.Deliver)
	case *pb.ServerFrame_Accepted:
		c.acceptedLocked(f.Id)
	case *pb.ServerFrame_Refused:
		c.r.count("refused_"+b.Refused.Code.String(), 1)
		if c.snd != nil && f.Id > 0 && f.Id < otherIDs {
			c.snd.retry(c, uint32(f.Id-1), time.Duration(b.Refused.RetryAfterMs)*time.Millisecond)
		}
	case *pb.ServerFrame_Ok:
		if keys, ok := c.confirms[f.Id]; ok {
			delete(c.confirms, f.Id)
			for _, k := range keys {
				c.r.ledger.markConfirmed(k)
				delete(c.unconfirmed, k)
			}
			c.r.confirmedAcks.Add(int64(len(keys)))
		}
	case *pb.ServerFrame_Pong:
		c.r.pongs.Add(1)
	case *pb.ServerFrame_Error:
		c.r.count("error_"+b.Error.Code.String(), 1)
		if b.Error.RetryAfterMs > 0 {
			c.hintMs.Store(b.Error.RetryAfterMs)
		}
	}
}

// acceptedLocked handles the Accepted frame answering the frame id.
func (c *client) acceptedLocked(id uint64) {
	if c.snd != nil && id > 0 && id < otherIDs {
		c.snd.accepted(&c.r.ledger, uint32(id-1))
		c.credits++
	}
}

func (c *client) deliverLocked(d *pb.Deliver) {
	dv := deliveryOf(d)
	c.deliveryLocked(&dv)
}

// deliveryLocked handles a delivered entry.
func (c *client) deliveryLocked(d *delivery) {
	hold := c.holdAcks.Load()
	switch d.kind {
	case pb.EnvelopeKind_ENVELOPE_KIND_MESSAGE:
		key, sent, ok := parsePayload(d.payload)
		if ok && d.group {
			// A group message: one payload for every member, whose key is
			// the message number; this device's copy is that message of
			// its own group stream.
			ok = c.groupStream != nil
			if ok {
				key = uint64(c.groupStream.id)<<32 | uint64(uint32(key))
			}
		}
		if !ok {
			c.r.ledger.unexpected.Add(1)
			break
		}
		if c.r.ledger.markDelivered(key, c.epoch) {
			c.r.lat.record(time.Duration(time.Now().UnixNano() - sent))
			c.r.lastDelivery.Store(time.Now().UnixNano())
		}
		if _, ok := c.unconfirmed[key]; ok {
			c.unconfirmed[key] = c.epoch // came again: that ack was not applied
		}
		if !hold {
			c.ackKeys = append(c.ackKeys, key)
		}
	case pb.EnvelopeKind_ENVELOPE_KIND_RECEIPT:
		if d.receipt == pb.ReceiptType_RECEIPT_TYPE_DELIVERED {
			c.r.receipts.Add(int64(d.receipts))
		}
	case pb.EnvelopeKind_ENVELOPE_KIND_GROUP_UPDATE:
		// Not a message: counted apart, and acked like any entry so that
		// the server deletes it.
		c.r.groupUpdates.Add(1)
	}
	if !hold {
		c.acks = append(c.acks, d.seq)
	}
}

// appliedLocked runs at Synced, which follows the Deliver of every entry
// the mailbox held when the connection was made: a key acked on an earlier
// connection, unconfirmed, that did not come again on this one is no
// longer in the mailbox, so the server applied its ack and its reply was
// lost with that connection. It counts as confirmed. A key delivered and
// never acked is not in unconfirmed: were it missing, it stays lost.
func (c *client) appliedLocked() {
	for k, ep := range c.unconfirmed {
		if ep < c.epoch {
			delete(c.unconfirmed, k)
			c.r.ledger.markConfirmed(k)
			c.r.count("acks_applied_reply_lost", 1)
		}
	}
}

func (c *client) epochNow() uint32 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.epoch
}

// send encodes and writes a client frame.
func (c *client) send(f *pb.ClientFrame) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.sendLocked(f)
}

// sendMessage sends a message's Send frame.
func (c *client) sendMessage(f *pb.ClientFrame) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.sendLocked(f); err != nil {
		return err
	}
	if c.held {
		c.heldSends++
	}
	return nil
}

func (c *client) sendLocked(f *pb.ClientFrame) error {
	b, err := proto.MarshalOptions{}.MarshalAppend(nil, f)
	if err != nil {
		return err
	}
	return c.writeFrameLocked(opBinary, b)
}

// ping sends a protocol Ping (the heartbeat that keeps the server's idle
// timer from firing).
func (c *client) ping() {
	if !c.up.Load() {
		return
	}
	c.send(&pb.ClientFrame{Id: c.otherID(), Body: &pb.ClientFrame_Ping{Ping: &pb.Ping{ClientTimeMs: time.Now().UnixMilli()}}})
}

// failLocked closes the connection after a protocol error.
func (c *client) failLocked(err error) {
	c.r.count("protocol_errors", 1)
	c.r.noteErr(err)
	if c.nc != nil {
		c.nc.Close()
	}
}

// close closes the connection from the bench's side.
func (c *client) close() {
	c.mu.Lock()
	nc := c.nc
	c.mu.Unlock()
	if nc != nil {
		nc.Close()
	}
}

// onClosed runs on the event loop when a connection of c ends.
func (c *client) onClosed(nc *wsConn, err error) {
	c.mu.Lock()
	if c.nc != nc {
		c.mu.Unlock()
		return
	}
	c.nc = nil
	c.rbuf, c.frag, c.confirms = nil, nil, nil
	c.acks, c.ackKeys = nil, nil
	code := c.closeCode
	c.closeCode, c.closing = 0, false
	c.mu.Unlock()
	if c.up.Swap(false) {
		c.r.up.Add(-1)
	}
	if f := c.r.onClose.Load(); f != nil {
		(*f)(c, code, err)
	}
}

// sender is a sending device's message source: 1:1 messages, message n
// to targets[n % len], or group messages.
type sender struct {
	stream  *stream
	targets []*account // message n goes to targets[n % len]
	// group, when set, makes every message one group send (group at
	// groupVersion) instead. Such a message is one delivery to each
	// member's device, so it has no stream of its own: message n is
	// message n of each receiving device's stream in fan (its
	// client.groupStream), which only this sender numbers, so they go in
	// step.
	group        string
	groupVersion uint64
	fan          []*stream
	size         int
	inflight     atomic.Int64
	// stopAt: no new sends at or after this time (Unix nanos); 0: none
	// until set.
	stopAt   atomic.Int64
	refill   bool // closed loop: each answer sends the next message
	disabled atomic.Bool
}

// next numbers and sends a new message.
func (s *sender) next(c *client) {
	if s.disabled.Load() {
		return
	}
	if at := s.stopAt.Load(); at != 0 && time.Now().UnixNano() >= at {
		return
	}
	n := s.take(&c.r.ledger)
	s.inflight.Add(1)
	s.write(c, n, true)
}

// take numbers a new message: in its stream, or in every stream of fan.
func (s *sender) take(l *ledger) uint32 {
	if s.fan == nil {
		return l.take(s.stream)
	}
	var n uint32
	for i, st := range s.fan {
		m := l.take(st)
		if i > 0 && m != n {
			panic("bench: group streams out of step") // only this sender numbers them
		}
		n = m
	}
	return n
}

// accepted records that the server accepted message n.
func (s *sender) accepted(l *ledger, n uint32) {
	if s.fan == nil {
		l.markAccepted(s.stream, n)
		return
	}
	for _, st := range s.fan {
		l.markAccepted(st, n)
	}
}

// write sends message n. first is true for its first transmission and
// false for a resend (retry): only the first may skip the server's
// idempotency lookup. A message whose connection is lost is never resent.
func (s *sender) write(c *client, n uint32, first bool) {
	bp := framePool.Get().(*[]byte)
	var f *pb.ClientFrame
	if s.group != "" {
		// The server cannot tell this from a sender-key ciphertext.
		payload := appendPayload((*bp)[:0], uint64(n), time.Now().UnixNano(), s.size)
		f = &pb.ClientFrame{Id: uint64(n) + 1, Body: &pb.ClientFrame_Send{Send: &pb.Send{
			ClientMsgId:  "m" + strconv.FormatUint(uint64(n), 10),
			Group:        s.group,
			GroupVersion: s.groupVersion,
			Payload:      payload,
			FirstAttempt: first,
		}}}
		*bp = payload[:0]
	} else {
		to := s.targets[int(n)%len(s.targets)]
		key := uint64(s.stream.id)<<32 | uint64(n)
		payload := appendPayload((*bp)[:0], key, time.Now().UnixNano(), s.size)
		f = &pb.ClientFrame{Id: uint64(n) + 1, Body: &pb.ClientFrame_Send{Send: &pb.Send{
			ClientMsgId:  "m" + strconv.FormatUint(uint64(n), 10),
			To:           to.User,
			Payloads:     []*pb.DevicePayload{{Device: &pb.DeviceAddress{User: to.User, Device: to.Device}, Payload: payload}},
			FirstAttempt: first,
		}}}
		*bp = payload[:0]
	}
	if err := c.sendMessage(f); err != nil {
		// The connection is gone; the message was never accepted and is
		// not counted as lost. It stays "sent" for the record.
		s.inflight.Add(-1)
		c.r.count("send_write_errors", 1)
	}
	framePool.Put(bp)
}

// answered: k sends of c were accepted.
func (s *sender) answered(c *client, k int) {
	s.inflight.Add(int64(-k))
	if s.refill {
		for range k {
			s.next(c)
		}
	}
}

// retry re-sends message n (same client_msg_id) after the server's hint.
func (s *sender) retry(c *client, n uint32, after time.Duration) {
	c.r.count("send_retries", 1)
	time.AfterFunc(max(after, 10*time.Millisecond), func() { s.write(c, n, false) })
}
