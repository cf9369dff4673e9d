package delivery

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

// Combined acks of group messages.
//
// A message to a group of n members is acked by n devices at nearly the
// same moment, and each ack emitted its own DELIVERED receipt to the
// sender: n receipt entries written, handed, delivered, acked and deleted
// for one message (n = 1,024: about a third of the server's work for the
// message). On a mailbox.ManyDeleteAppender the acks of group messages
// that arrive while another such write is being ordered wait for it and
// then go together, as a store's group commit does: one atomic write
// deletes every acked entry and appends, to each device of each sender,
// one receipt whose references say which member each is from
// (MessageRef.by). A lone ack goes at once, alone, with the receipt it
// always had. Acks of one device never share a write (the store takes
// each device once), and acks of other entries (1:1 messages, receipts,
// unknown envelopes) take the single path: they have nothing to combine
// with.

// maxCombined bounds the acks of one combined write: the delete locks it
// holds, and the size of the receipt it makes.
const maxCombined = 256

// ackCombiner queues the group acks waiting for the combined write under
// way.
type ackCombiner struct {
	mu    sync.Mutex
	queue []*ackJob
	busy  bool // a leader is writing; new jobs queue
}

// ackJob is one device's ack in the combiner.
type ackJob struct {
	ctx   context.Context
	dev   ident.Device
	acked []Delivered // every Envelope set
	done  chan struct{}
	lead  bool // woken to lead the next write, not with a result
	p     *PendingAck
	err   error
}

// combinable reports whether dev's ack of acked may be combined: every
// entry is a known message to a group from another user.
func combinable(dev ident.Device, acked []Delivered) bool {
	for _, a := range acked {
		env := a.Envelope
		if env == nil || env.Kind != pb.EnvelopeKind_ENVELOPE_KIND_MESSAGE || env.Group == "" || env.Sender == dev.User {
			return false
		}
	}
	return len(acked) > 0
}

// startAckCombined is StartAck for a combinable ack on a store that can
// delete for several devices in one write.
func (s *Service) startAckCombined(ctx context.Context, m mailbox.ManyDeleteAppender, dev ident.Device, acked []Delivered) (*PendingAck, error) {
	c := &s.acks
	j := &ackJob{ctx: ctx, dev: dev, acked: acked, done: make(chan struct{})}
	c.mu.Lock()
	c.queue = append(c.queue, j)
	if c.busy {
		c.mu.Unlock()
		<-j.done
		if !j.lead {
			return j.p, j.err
		}
	} else {
		c.busy = true
		c.mu.Unlock()
	}
	s.leadCombined(m)
	return j.p, j.err
}

// leadCombined writes what is queued (the leader's job first among it),
// wakes the jobs written, then hands the lead to the first job still
// queued, if any. A panic in the write fails the jobs, and lets the next
// lead, before it goes on.
func (s *Service) leadCombined(m mailbox.ManyDeleteAppender) {
	c := &s.acks
	c.mu.Lock()
	batch := c.take()
	c.mu.Unlock()
	defer func() {
		p := recover()
		if p != nil {
			for _, j := range batch {
				j.p, j.err = nil, fmt.Errorf("delivery: combined ack write failed: %v", p)
			}
		}
		for _, j := range batch[1:] {
			close(j.done)
		}
		c.mu.Lock()
		if len(c.queue) == 0 {
			c.busy = false
			c.mu.Unlock()
		} else {
			next := c.queue[0]
			next.lead = true
			c.mu.Unlock()
			close(next.done)
		}
		if p != nil {
			panic(p)
		}
	}()
	s.writeCombined(m, batch)
}

// take removes from the queue, and returns, the jobs of the next write:
// in queue order, at most maxCombined, each device once (a second ack of
// a device waits for the next write). c.mu is held.
func (c *ackCombiner) take() []*ackJob {
	batch := make([]*ackJob, 0, min(len(c.queue), maxCombined))
	in := make(map[ident.Device]bool, cap(batch))
	var rest []*ackJob
	for i, j := range c.queue {
		if len(batch) == maxCombined {
			rest = append(rest, c.queue[i:]...)
			break
		}
		if in[j.dev] {
			rest = append(rest, j)
			continue
		}
		in[j.dev] = true
		batch = append(batch, j)
	}
	clear(c.queue)
	c.queue = append(c.queue[:0], rest...)
	return batch
}

// writeCombined does the one write of batch and gives each job its
// PendingAck or error.
func (s *Service) writeCombined(m mailbox.ManyDeleteAppender, batch []*ackJob) {
	lead := batch[0]
	// The write is the whole batch's, not only its leader's: a leader
	// whose connection closes must not fail the others.
	ctx := context.WithoutCancel(lead.ctx)
	dels := make([]mailbox.DeleteAppend, len(batch))
	for i, j := range batch {
		seqs := make([]uint64, len(j.acked))
		for k, a := range j.acked {
			seqs[k] = a.Seq
		}
		dels[i] = mailbox.DeleteAppend{Device: j.dev, Seqs: seqs, SeqsOnly: true}
	}
	shared := &sharedReceipts{}
	then := func(removed [][]mailbox.Entry) ([]mailbox.Item, error) {
		items, heads, err := s.combinedItems(ctx, batch, removed)
		shared.notify, shared.heads = items, heads
		return items, err
	}
	shared.began = time.Now()
	removed, pend, err := m.StartDeleteAppendMany(ctx, mailbox.DeleteAppendMany{Deletes: dels, Then: then, Time: s.cfg.Now()})
	if err != nil {
		var ref *Refusal
		if !errors.As(err, &ref) {
			err = s.storageError(err)
		}
	}
	shared.pend = pend
	for i, j := range batch {
		if err != nil {
			j.err = err
		} else {
			j.p = &PendingAck{s: s, dev: j.dev, acked: j.acked, together: true, removed: len(removed[i]), shared: shared}
		}
	}
}

// sharedReceipts are the receipts of one combined write, which every ack
// in it waits for; the first to see them durable hands them over.
type sharedReceipts struct {
	pend   mailbox.Pending
	notify []mailbox.Item
	heads  headers
	began  time.Time

	once sync.Once
	err  error
}

// wait waits for the combined write to be durable (or ctx to end) and
// hands the receipts to their devices, once.
func (r *sharedReceipts) wait(ctx context.Context, s *Service) error {
	res, err := r.pend.Wait(ctx)
	if err != nil {
		return err
	}
	r.once.Do(func() {
		if len(r.notify) > 0 {
			s.receiptsStored(r.notify, r.heads, res.Seqs, r.began, pb.ReceiptType_RECEIPT_TYPE_DELIVERED)
		}
	})
	return nil
}

// combinedItems builds the DELIVERED receipts of a combined write: for
// each sender, in the order first met, one receipt to each of its devices
// naming every removed message, each with the member it is from (by, left
// empty for the receipt's own sender: the first member met).
func (s *Service) combinedItems(ctx context.Context, batch []*ackJob, removed [][]mailbox.Entry) ([]mailbox.Item, headers, error) {
	type forSender struct {
		first ident.Device
		refs  []*pb.MessageRef
	}
	var order []string
	senders := map[string]*forSender{}
	for i, j := range batch {
		if len(removed[i]) == 0 {
			continue
		}
		known := make(map[uint64]*pb.Envelope, len(j.acked))
		for _, a := range j.acked {
			known[a.Seq] = a.Envelope
		}
		for _, e := range removed[i] {
			env := known[e.Seq]
			if env == nil {
				continue
			}
			f := senders[env.Sender]
			if f == nil {
				f = &forSender{first: j.dev}
				senders[env.Sender] = f
				order = append(order, env.Sender)
			}
			ref := &pb.MessageRef{ServerId: env.ServerId, ClientMsgId: env.ClientMsgId}
			if j.dev != f.first {
				ref.By, ref.ByDevice = j.dev.User, j.dev.ID
			}
			f.refs = append(f.refs, ref)
		}
	}
	var (
		items []mailbox.Item
		heads headers
	)
	for _, sender := range order {
		f := senders[sender]
		it, head, err := s.receiptItems(ctx, f.first, sender, pb.ReceiptType_RECEIPT_TYPE_DELIVERED, f.refs)
		if err != nil {
			return nil, headers{}, err
		}
		heads.add(head, len(it), len(order) == 1)
		items = append(items, it...)
	}
	return items, heads, nil
}
