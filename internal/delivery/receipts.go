package delivery

import (
	"context"
	"errors"
	"fmt"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

// Delivered describes a mailbox entry as it was handed to a device: what an
// acknowledgement of it must turn into.
type Delivered struct {
	Seq uint64
	// Envelope is the entry's envelope, or nil when the caller does not know
	// it (the entry was not delivered on this connection).
	Envelope *pb.Envelope
}

// Ack handles a device's acknowledgement of mailbox entries: for each acked
// message from another user it emits a DELIVERED receipt to all of the
// sender's devices, durably, and then deletes the entries.
//
// On a mailbox.DeleteAppender (the Pebble store) the deletion and the
// receipts are one atomic write, and receipts are emitted only for the
// entries it removed: a crash leaves both or neither, and acking an entry
// twice emits its receipt once. On other stores it takes two operations:
// receipts for entries whose envelope is known are appended before the
// delete, so a crash in between means a redelivery and a duplicate receipt
// (both harmless), never a lost receipt. For entries acked without a known
// envelope, receipts are emitted from what the delete returns.
func (s *Service) Ack(ctx context.Context, dev ident.Device, acked []Delivered) error {
	p, err := s.StartAck(ctx, dev, acked)
	if err != nil {
		return err
	}
	return p.Wait(ctx)
}

// PendingAck is an acknowledgement that StartAck has ordered.
type PendingAck struct {
	s        *Service
	dev      ident.Device
	acked    []Delivered
	receipts mailbox.Pending // nil: no receipt for the known envelopes
	notify   []mailbox.Item
	heads    headers   // of notify
	began    time.Time // taken before the receipts' append began
	// together: the store deleted the entries in the same write as it
	// appended the receipts (mailbox.DeleteAppender), removing removed.
	together bool
	removed  int
	// shared: the acks of several devices went as one write (combine.go),
	// whose receipts this waits for.
	shared *sharedReceipts
}

// StartAck does the part of Ack that orders it: the DELIVERED receipts for
// the entries whose envelope is known get their place in the senders'
// mailboxes (see StartSend), so that the receipts of a device's successive
// acks keep their order without each waiting for its fsync in turn. Wait
// finishes the work: it waits for the receipts to be durable, then deletes
// the entries. Errors are Ack's.
//
// When the mailbox is a mailbox.DeleteAppender, StartAck does it all as one
// mailbox write instead (see startAckTogether), and Wait only waits for it.
func (s *Service) StartAck(ctx context.Context, dev ident.Device, acked []Delivered) (*PendingAck, error) {
	if da, ok := s.cfg.Mailbox.(mailbox.DeleteAppender); ok && mayEmitReceipts(dev, acked) {
		if m, ok := s.cfg.Mailbox.(mailbox.ManyDeleteAppender); ok && combinable(dev, acked) {
			return s.startAckCombined(ctx, m, dev, acked)
		}
		return s.startAckTogether(ctx, da, dev, acked)
	}
	var known []*pb.Envelope
	for _, a := range acked {
		if a.Envelope != nil {
			known = append(known, a.Envelope)
		}
	}
	items, heads, err := s.deliveredItems(ctx, dev, known)
	if err != nil {
		return nil, err
	}
	p := &PendingAck{s: s, dev: dev, acked: acked, notify: items, heads: heads}
	if len(items) > 0 {
		p.began = time.Now()
		if p.receipts, err = s.startAppend(ctx, mailbox.Batch{Items: items, Time: s.cfg.Now()}); err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return nil, s.storageError(err)
		}
	}
	return p, nil
}

// mayEmitReceipts reports whether dev's ack of acked may emit a receipt:
// whether it names a message from another user, or an entry whose envelope
// is not known. An ack that cannot (of receipts, or of the user's own sync
// copies) is a plain delete, done by Wait off the caller's goroutine.
func mayEmitReceipts(dev ident.Device, acked []Delivered) bool {
	for _, a := range acked {
		if a.Envelope == nil || a.Envelope.Kind == pb.EnvelopeKind_ENVELOPE_KIND_MESSAGE && a.Envelope.Sender != dev.User {
			return true
		}
	}
	return false
}

// startAckTogether is StartAck on a mailbox.DeleteAppender: the acked
// entries are deleted, and the DELIVERED receipts for the messages among
// those actually removed are appended, in one atomic write. A crash leaves
// both or neither (a redelivery, whose ack emits the receipt then), and two
// acks of one entry (from an old and a new connection of the device, say)
// emit its receipt once. The receipts of all the messages of one sender
// that an ack removes are one receipt envelope, encoded once for all the
// sender's devices (deliveredItems).
func (s *Service) startAckTogether(ctx context.Context, da mailbox.DeleteAppender, dev ident.Device, acked []Delivered) (*PendingAck, error) {
	p := &PendingAck{s: s, dev: dev, acked: acked, together: true}
	seqs := make([]uint64, len(acked))
	known := true
	for i, a := range acked {
		seqs[i] = a.Seq
		known = known && a.Envelope != nil
	}
	// Called by the store with what it removed, under the device's delete
	// lock: it builds the receipts from the envelopes known, decoding only
	// the entries acked without one.
	then := func(removed []mailbox.Entry) ([]mailbox.Item, error) {
		known := make(map[uint64]*pb.Envelope, len(acked))
		for _, a := range acked {
			if a.Envelope != nil {
				known[a.Seq] = a.Envelope
			}
		}
		envs := make([]*pb.Envelope, 0, len(removed))
		for _, e := range removed {
			env := known[e.Seq]
			if env == nil {
				env = new(pb.Envelope)
				if err := proto.Unmarshal(e.Data, env); err != nil {
					s.cfg.Logger.Error("undecodable mailbox entry", "device", dev, "seq", e.Seq, "err", err)
					continue
				}
			}
			envs = append(envs, env)
		}
		items, heads, err := s.deliveredItems(ctx, dev, envs)
		p.notify, p.heads = items, heads
		return items, err
	}
	p.began = time.Now()
	// With every envelope known, the store need not read the entries.
	removed, pend, err := da.StartDeleteAppend(ctx, mailbox.DeleteAppend{Device: dev, Seqs: seqs, Then: then, Time: s.cfg.Now(), SeqsOnly: known})
	if err != nil {
		var ref *Refusal
		switch {
		case ctx.Err() != nil:
			return nil, ctx.Err()
		case errors.As(err, &ref):
			return nil, err
		}
		return nil, s.storageError(err)
	}
	p.receipts, p.removed = pend, len(removed)
	return p, nil
}

// Wait waits for the receipts to be durable and deletes the acked entries
// (or, after startAckTogether, waits for the one write that did both).
// Call it once.
func (p *PendingAck) Wait(ctx context.Context) error {
	s, dev := p.s, p.dev
	if p.shared != nil {
		if err := p.shared.wait(ctx, s); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return s.storageError(err)
		}
		s.cfg.Metrics.Acked.Add(float64(p.removed))
		return nil
	}
	if p.receipts != nil {
		res, err := p.receipts.Wait(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return s.storageError(err)
		}
		if len(p.notify) > 0 {
			s.receiptsStored(p.notify, p.heads, res.Seqs, p.began, pb.ReceiptType_RECEIPT_TYPE_DELIVERED)
		}
	}
	if p.together {
		s.cfg.Metrics.Acked.Add(float64(p.removed))
		return nil
	}
	seqs := make([]uint64, 0, len(p.acked))
	unknown := false
	for _, a := range p.acked {
		seqs = append(seqs, a.Seq)
		unknown = unknown || a.Envelope == nil
	}
	removed, err := s.deleteAcked(ctx, dev, seqs, !unknown)
	if err != nil {
		return fmt.Errorf("delete acked entries: %w", err)
	}
	s.cfg.Metrics.Acked.Add(float64(len(removed)))
	if !unknown {
		return nil
	}
	isKnown := make(map[uint64]bool, len(p.acked))
	for _, a := range p.acked {
		isKnown[a.Seq] = a.Envelope != nil
	}
	var late []*pb.Envelope
	for _, e := range removed {
		if isKnown[e.Seq] {
			continue
		}
		env := new(pb.Envelope)
		if err := proto.Unmarshal(e.Data, env); err != nil {
			s.cfg.Logger.Error("undecodable mailbox entry", "device", dev, "seq", e.Seq, "err", err)
			continue
		}
		late = append(late, env)
	}
	return s.emitDelivered(ctx, dev, late)
}

// deleteAcked deletes dev's entries seqs and returns those it removed; if
// known (the caller knows their envelopes), entries may come back with
// their Seq only, which spares a store that has DeleteAppender reading
// them.
func (s *Service) deleteAcked(ctx context.Context, dev ident.Device, seqs []uint64, known bool) ([]mailbox.Entry, error) {
	da, ok := s.cfg.Mailbox.(mailbox.DeleteAppender)
	if !ok || !known {
		return s.cfg.Mailbox.Delete(ctx, dev, seqs)
	}
	removed, p, err := da.StartDeleteAppend(ctx, mailbox.DeleteAppend{Device: dev, Seqs: seqs, SeqsOnly: true})
	if err != nil {
		return nil, err
	}
	// Appending nothing, it is not synced: Wait only sees it written.
	if _, err := p.Wait(ctx); err != nil {
		return nil, err
	}
	return removed, nil
}

// emitDelivered appends DELIVERED receipts for the messages among envs that
// another user sent: one receipt per sender, listing its messages.
func (s *Service) emitDelivered(ctx context.Context, by ident.Device, envs []*pb.Envelope) error {
	items, heads, err := s.deliveredItems(ctx, by, envs)
	if err != nil {
		return err
	}
	return s.appendReceipts(ctx, items, heads, pb.ReceiptType_RECEIPT_TYPE_DELIVERED)
}

// deliveredItems builds the DELIVERED receipts for the messages among envs
// that another user sent, one per sender, for every device of the sender,
// and returns them with their envelopes.
func (s *Service) deliveredItems(ctx context.Context, by ident.Device, envs []*pb.Envelope) ([]mailbox.Item, headers, error) {
	var order []string
	bySender := map[string][]*pb.MessageRef{}
	refs := make([]pb.MessageRef, len(envs)) // one allocation for every reference
	for i, env := range envs {
		if env.Kind != pb.EnvelopeKind_ENVELOPE_KIND_MESSAGE || env.Sender == by.User {
			continue
		}
		if _, ok := bySender[env.Sender]; !ok {
			order = append(order, env.Sender)
		}
		refs[i].ServerId, refs[i].ClientMsgId = env.ServerId, env.ClientMsgId
		bySender[env.Sender] = append(bySender[env.Sender], &refs[i])
	}
	if len(order) == 0 {
		return nil, headers{}, nil
	}
	var (
		items []mailbox.Item
		heads headers
	)
	for _, sender := range order {
		it, head, err := s.receiptItems(ctx, by, sender, pb.ReceiptType_RECEIPT_TYPE_DELIVERED, bySender[sender])
		if err != nil {
			return nil, headers{}, err
		}
		heads.add(head, len(it), len(order) == 1)
		items = append(items, it...)
	}
	return items, heads, nil
}

// Read reports that the user of device by has read messages sent by sender:
// a READ receipt is made durable in every device of sender's mailbox.
func (s *Service) Read(ctx context.Context, by ident.Device, sender string, msgs []*pb.MessageRef) error {
	if !ident.ValidUser(sender) {
		return s.refuse(pb.RefusalCode_REFUSAL_CODE_INVALID, "sender: %v", ident.ErrBadUser)
	}
	if len(msgs) == 0 || len(msgs) > MaxReadRefs {
		return s.refuse(pb.RefusalCode_REFUSAL_CODE_INVALID, "a read report names 1 to %d messages", MaxReadRefs)
	}
	for _, m := range msgs {
		if len(m.GetServerId()) == 0 || len(m.GetServerId()) > 64 || len(m.GetClientMsgId()) > MaxClientMsgID {
			return s.refuse(pb.RefusalCode_REFUSAL_CODE_INVALID, "every message needs a server_id (and at most a %d-byte client_msg_id)", MaxClientMsgID)
		}
	}
	if sender == by.User {
		return s.refuse(pb.RefusalCode_REFUSAL_CODE_INVALID, "read receipts go to another user")
	}
	items, head, err := s.receiptItems(ctx, by, sender, pb.ReceiptType_RECEIPT_TYPE_READ, msgs)
	if errors.Is(err, accounts.ErrNotFound) {
		return s.refuse(pb.RefusalCode_REFUSAL_CODE_UNKNOWN_RECIPIENT, "no user %q", sender)
	}
	if err != nil {
		return err
	}
	return s.appendReceipts(ctx, items, headers{one: head}, pb.ReceiptType_RECEIPT_TYPE_READ)
}

// receiptItems builds a receipt of typ from by for msgs, addressed to every
// device of sender, and returns it with its envelope.
func (s *Service) receiptItems(ctx context.Context, by ident.Device, sender string, typ pb.ReceiptType, msgs []*pb.MessageRef) ([]mailbox.Item, *pb.Envelope, error) {
	devs, err := accounts.DevicesView(ctx, s.cfg.Accounts, sender)
	if errors.Is(err, accounts.ErrNotFound) {
		// The sender's account is gone: there is nobody to tell.
		if typ == pb.ReceiptType_RECEIPT_TYPE_DELIVERED {
			return nil, nil, nil
		}
		return nil, nil, err
	}
	if err != nil {
		return nil, nil, s.storageError(err)
	}
	now := s.cfg.Now()
	env := &pb.Envelope{
		Kind:         pb.EnvelopeKind_ENVELOPE_KIND_RECEIPT,
		ServerId:     s.ids.New(now),
		Sender:       by.User,
		SenderDevice: by.ID,
		ServerTimeMs: now.UnixMilli(),
		To:           sender,
		Receipt:      &pb.Receipt{Type: typ, Messages: msgs},
	}
	if !receiptStringsValid(env) {
		return nil, nil, errors.New("encode receipt: a string is not UTF-8")
	}
	data := appendReceiptEnvelope(make([]byte, 0, receiptEnvelopeSize(env)), env)
	items := make([]mailbox.Item, len(devs))
	for i, d := range devs {
		items[i] = mailbox.Item{Device: ident.Device{User: sender, ID: d.ID}, Data: data}
	}
	return items, env, nil
}

func (s *Service) appendReceipts(ctx context.Context, items []mailbox.Item, heads headers, typ pb.ReceiptType) error {
	if len(items) == 0 {
		return nil
	}
	began := time.Now()
	res, err := s.cfg.Mailbox.Append(ctx, mailbox.Batch{Items: items, Time: s.cfg.Now()})
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return s.storageError(err)
	}
	s.receiptsStored(items, heads, res.Seqs, began, typ)
	return nil
}

// receiptsStored counts durable receipts and tells their devices, handing
// them the entries (notifyStored) that the append begun at began stored
// as seqs.
func (s *Service) receiptsStored(items []mailbox.Item, heads headers, seqs []uint64, began time.Time, typ pb.ReceiptType) {
	s.cfg.Metrics.Receipts.WithLabelValues(receiptName(typ)).Inc()
	s.notifyStored(items, seqs, began, heads)
}

func receiptName(t pb.ReceiptType) string {
	if t == pb.ReceiptType_RECEIPT_TYPE_READ {
		return "read"
	}
	return "delivered"
}
