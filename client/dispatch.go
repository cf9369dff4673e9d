package client

import (
	"errors"
	"slices"
	"strings"

	courierv1 "github.com/courier-im/courier/proto/courier/v1"
)

// dispatchItem is one thing for the dispatcher: a ready event, a mailbox
// entry to handle and acknowledge, the end of catch-up, or an acceptance
// from the outbox.
type dispatchItem struct {
	event Event

	sess   *session // for entries and Synced: the connection they came on
	seq    uint64
	env    *courierv1.Envelope
	synced *courierv1.Synced

	accepted *ReceiptEvent // StatusSent, emitted only if still the state
}

// dispatchLoop hands events to Handler, in order, from one goroutine, and
// acknowledges mailbox entries once Handler has returned for them: one Ack
// per burst (everything queued when the burst began), waiting for the
// server's Ok so that a SyncedEvent means the catch-up is acknowledged.
//
// Once the client is closed, only the outbox's outcomes are still handed
// over (they happen once), after the outbox has stopped producing them.
func (c *Client) dispatchLoop() {
	defer c.dispatchDone.Done()
	for {
		select {
		case <-c.events.wake:
			c.dispatch(c.events.drain())
		case <-c.ctx.Done():
			c.outboxDone.Wait()
			c.dispatch(c.events.drain())
			return
		}
	}
}

func (c *Client) dispatch(items []dispatchItem) {
	var acks ackBatch
	for _, it := range items {
		if c.isClosed() {
			if failed, ok := it.event.(*SendFailedEvent); ok {
				c.handle(failed)
			} else if it.accepted != nil && c.tracker.Status(it.accepted.Message.ServerID) == StatusSent {
				c.handle(it.accepted)
			}
			continue
		}
		switch {
		case it.env != nil:
			if c.deliver(it.env) {
				acks.add(it.sess, it.seq)
			}
		case it.synced != nil:
			acks.flush(c)
			c.handle(&SyncedEvent{Pending: int(it.synced.GetPending())})
		case it.accepted != nil:
			// A delivered or read receipt handled since the acceptance
			// says more; the handler has had it already.
			if c.tracker.Status(it.accepted.Message.ServerID) == StatusSent {
				c.handle(it.accepted)
			}
		case it.event != nil:
			c.handle(it.event)
		case it.sess != nil:
			// A Deliver without an envelope: nothing to handle.
			acks.add(it.sess, it.seq)
		}
	}
	if !c.isClosed() {
		acks.flush(c)
	}
}

func (c *Client) handle(ev Event) {
	if c.cfg.Handler != nil {
		c.cfg.Handler(ev)
	}
}

// deliver handles one mailbox entry and reports whether to acknowledge it.
func (c *Client) deliver(env *courierv1.Envelope) bool {
	id := env.GetServerId()
	if id == "" {
		c.log.Warn("dropping a mailbox entry without a server id")
		return true
	}
	seen, err := c.seen.Seen(id)
	if err != nil {
		// Better twice than never: handle it as new.
		c.log.Error("seen store: lookup failed", "id", id, "err", err)
	}
	if seen {
		return true
	}
	switch env.GetKind() {
	case courierv1.EnvelopeKind_ENVELOPE_KIND_MESSAGE:
		from := Device{User: env.GetSender(), ID: env.GetSenderDevice()}
		clientMsgID := env.GetClientMsgId()
		var body []byte
		var err error
		if c.cfg.Cipher != nil {
			var o Opened
			o, err = c.cfg.Cipher.Open(c.ctx, Inbound{ServerID: id, ClientMsgID: clientMsgID, From: from,
				To: env.GetTo(), Group: env.GetGroup(), Time: timeMs(env.GetServerTimeMs()), Payload: env.GetPayload()})
			if err == nil && o.GroupInfo != nil {
				c.groupInfo(from, o.GroupInfo, timeMs(env.GetServerTimeMs()))
			}
			if err == nil && o.Drop {
				break
			}
			body = o.Body
			if o.ClientMsgID != "" {
				clientMsgID = o.ClientMsgID
			}
		} else {
			body, err = c.cfg.Open(c.ctx, from, env.GetPayload())
		}
		if err != nil {
			c.log.Warn("cannot open a message", "id", id, "from", from, "err", err)
			body = nil
		}
		if from.User == c.self.User {
			// Sent by another device of this user: its receipts come here
			// too, so track it from the state it is known to have reached.
			ref := MessageRef{ServerID: id, ClientMsgID: clientMsgID}
			peer := env.GetTo()
			if g := env.GetGroup(); g != "" {
				peer = GroupPeer(g)
			}
			c.tracker.Track(ref, peer)
			c.tracker.Advance(ref, StatusSent)
		}
		c.handle(&MessageEvent{
			ServerID:    id,
			ClientMsgID: clientMsgID,
			From:        from.User,
			FromDevice:  from.ID,
			To:          env.GetTo(),
			Group:       env.GetGroup(),
			Sync:        from.User == c.self.User,
			Time:        timeMs(env.GetServerTimeMs()),
			Body:        body,
			Err:         err,
		})
	case courierv1.EnvelopeKind_ENVELOPE_KIND_RECEIPT:
		st := statusOf(env.GetReceipt().GetType())
		if st == StatusUnknown {
			c.log.Warn("ignoring a receipt of unknown type", "id", id)
			break
		}
		for _, m := range env.GetReceipt().GetMessages() {
			ref := MessageRef{ServerID: m.GetServerId(), ClientMsgID: m.GetClientMsgId()}
			// A receipt the server combined from several members' acks
			// names, per message, the member it is from.
			by, byDevice := env.GetSender(), env.GetSenderDevice()
			if m.GetBy() != "" {
				by, byDevice = m.GetBy(), m.GetByDevice()
			}
			if group := c.groupOf(ref); group != "" {
				c.groupReceipt(env, ref, group, st, by, byDevice)
				continue
			}
			if !c.tracker.Advance(ref, st) {
				continue
			}
			to := c.tracker.Peer(ref.ServerID)
			if to == "" {
				to = env.GetSender()
			}
			c.handle(&ReceiptEvent{
				Message:  ref,
				To:       to,
				Status:   st,
				By:       by,
				ByDevice: byDevice,
				Time:     timeMs(env.GetServerTimeMs()),
			})
		}
	case courierv1.EnvelopeKind_ENVELOPE_KIND_GROUP_UPDATE:
		c.groupUpdate(env)
	case courierv1.EnvelopeKind_ENVELOPE_KIND_KEYS_LOW:
		n := int(env.GetKeysLow().GetRemaining())
		if kl, ok := c.cfg.Cipher.(KeysLowHandler); ok {
			kl.KeysLow(n)
		}
		c.handle(&KeysLowEvent{Remaining: n})
	default:
		c.log.Warn("ignoring a mailbox entry of unknown kind", "id", id, "kind", env.GetKind())
	}
	if err := c.seen.MarkSeen(id); err != nil {
		c.log.Error("seen store: mark failed", "id", id, "err", err)
	}
	return true
}

// ackBatch gathers the seqs to acknowledge, per connection.
type ackBatch struct {
	sessions []*session
	seqs     map[*session][]uint64
}

func (b *ackBatch) add(s *session, seq uint64) {
	if b.seqs == nil {
		b.seqs = map[*session][]uint64{}
	}
	if _, ok := b.seqs[s]; !ok {
		b.sessions = append(b.sessions, s)
	}
	b.seqs[s] = append(b.seqs[s], seq)
}

// flush sends the gathered acks and waits for the server's Ok. Acks for a
// connection that has ended are dropped: its entries come again on the
// next one, and Seen answers for them.
func (b *ackBatch) flush(c *Client) {
	for _, s := range b.sessions {
		for chunk := range slices.Chunk(b.seqs[s], maxAckSeqs) {
			if err := s.ack(chunk); err != nil {
				if !errors.Is(err, errDisconnected) {
					c.log.Warn("ack failed; the entries will come again", "err", err)
				}
				break
			}
		}
	}
	b.sessions, b.seqs = nil, nil
}

// groupOf returns the group a sent message named by ref went to, if the
// tracker knows it as a group message.
func (c *Client) groupOf(ref MessageRef) string {
	peer := ""
	if ref.ServerID != "" {
		peer = c.tracker.Peer(ref.ServerID)
	}
	if peer == "" && ref.ClientMsgID != "" {
		peer = c.tracker.Peer(ref.ClientMsgID)
	}
	if g, ok := strings.CutPrefix(peer, "#"); ok {
		return g
	}
	return ""
}

// groupReceipt reports a receipt for a group message, per member: each
// member's state moves forward on its own (the message's own state is the
// furthest any member reached). by and byDevice are the member the
// receipt is from.
func (c *Client) groupReceipt(env *courierv1.Envelope, ref MessageRef, group string, st Status, by string, byDevice uint32) {
	c.tracker.Advance(ref, st)
	if by == c.self.User {
		return // another device of this user has the message: not news
	}
	id := ref.ServerID
	if id == "" {
		id = ref.ClientMsgID
	}
	if !c.members.Advance(MessageRef{ServerID: by + "/" + id}, st) {
		return
	}
	c.handle(&ReceiptEvent{
		Message:  ref,
		To:       GroupPeer(group),
		Group:    group,
		Status:   st,
		By:       by,
		ByDevice: byDevice,
		Time:     timeMs(env.GetServerTimeMs()),
	})
}
