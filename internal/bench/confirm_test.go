package bench

import (
	"testing"

	"google.golang.org/protobuf/proto"

	pb "github.com/courier-im/courier/proto/courier/v1"
)

// In confirm mode an ack whose reply was lost with its connection counts
// as confirmed once a later connection has synced without the entry
// coming again; an entry that comes again, or one never acked, does not.
func TestAckAppliedReplyLost(t *testing.T) {
	r := newRun(nil, &target{})
	r.confirmAcks = true
	s := r.ledger.newStream()
	c := &client{r: r}
	msg := func(n uint32) *pb.Deliver {
		key := uint64(s.id)<<32 | uint64(n)
		return &pb.Deliver{Seq: uint64(n + 1), Envelope: &pb.Envelope{Kind: pb.EnvelopeKind_ENVELOPE_KIND_MESSAGE, Payload: appendPayload(nil, key, 1, 64)}}
	}
	for range 3 {
		n := r.ledger.take(s)
		r.ledger.markAccepted(s, n)
	}
	// Connection 1: messages 0 and 1 acked (no reply comes), 2 held.
	c.epoch = 1
	c.deliverLocked(msg(0))
	c.deliverLocked(msg(1))
	c.flushAcks() // no connection: the frame is not written, but the acks are sent as far as the device knows
	c.holdAcks.Store(true)
	c.deliverLocked(msg(2))
	c.holdAcks.Store(false)
	if got := r.ledger.lost(true); got != 3 {
		t.Fatalf("lost %d before any confirmation, want 3", got)
	}
	// Connection 2: message 1 comes again (its ack was not applied), then
	// Synced: 0 did not come again, so its ack was applied.
	c.epoch = 2
	c.deliverLocked(msg(1))
	c.onMessageLockedFrame(t, &pb.ServerFrame{Body: &pb.ServerFrame_Synced{Synced: &pb.Synced{}}})
	if got := r.ledger.lost(true); got != 2 {
		t.Fatalf("lost %d after the sync, want 2 (1 came again, 2 was never acked)", got)
	}
	if got := r.snapshotCounters()["acks_applied_reply_lost"]; got != 1 {
		t.Fatalf("acks_applied_reply_lost = %d, want 1", got)
	}
	// The ack of 1 on this connection is sent; Synced again on the same
	// connection changes nothing.
	c.flushAcks()
	c.onMessageLockedFrame(t, &pb.ServerFrame{Body: &pb.ServerFrame_Synced{Synced: &pb.Synced{}}})
	if got := r.ledger.lost(true); got != 2 {
		t.Fatalf("lost %d, want 2", got)
	}
}

// onMessageLockedFrame hands f to the client's frame handling.
func (c *client) onMessageLockedFrame(t *testing.T, f *pb.ServerFrame) {
	t.Helper()
	b, err := proto.Marshal(f)
	if err != nil {
		t.Fatal(err)
	}
	c.mu.Lock()
	c.onMessageLocked(b)
	c.mu.Unlock()
}
