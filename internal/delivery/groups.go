package delivery

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

// GroupChunk is the most items one mailbox batch of a group message or a
// GROUP_UPDATE holds. A group of 1,024 members with 4 devices each is 4,096
// devices, more than one atomic batch may hold (a JetStream batch holds at
// most 1,000 messages), so such a send is split into several batches, each
// with its own idempotency key.
const GroupChunk = 500

// startGroupSend is StartSend for a group message: the one payload goes to
// every device of every member but the sending device (the sender's other
// devices get it as their copy).
//
// The items are in member order (the order members joined), each member's
// devices in id order, cut into chunks of GroupChunk: chunk n is appended
// with the key "send/<from>/<client_msg_id>/<n>". A send of one chunk is
// ordered like a 1:1 send. A send of several is made durable chunk by
// chunk in order, the first before the others are started: if the first
// is a duplicate (a retry), the others are stored under the first's server
// id and time, so that every copy of a message carries the same server id
// even when an earlier attempt stored only some of the chunks. Accepted is
// given only when every chunk is durable.
func (s *Service) startGroupSend(ctx context.Context, req SendRequest) (*PendingSend, error) {
	if s.cfg.Groups == nil {
		return nil, s.refuse(pb.RefusalCode_REFUSAL_CODE_INVALID, "this server keeps no groups")
	}
	if req.To != "" || len(req.Payloads) != 0 {
		return nil, s.refuse(pb.RefusalCode_REFUSAL_CODE_INVALID, "a group message has one payload and no to or payloads")
	}
	if !accounts.ValidGroupID(req.Group) {
		return nil, s.refuse(pb.RefusalCode_REFUSAL_CODE_INVALID, "group: %q is not a group id", req.Group)
	}
	if len(req.Payload) > s.cfg.MaxPayload {
		return nil, s.refuse(pb.RefusalCode_REFUSAL_CODE_PAYLOAD_TOO_LARGE,
			"the payload is %d bytes; the limit is %d", len(req.Payload), s.cfg.MaxPayload)
	}
	g, err := s.cfg.Groups.Group(ctx, req.Group)
	if errors.Is(err, accounts.ErrNotFound) {
		return nil, s.refuse(pb.RefusalCode_REFUSAL_CODE_UNKNOWN_RECIPIENT, "no group %q", req.Group)
	}
	if err != nil {
		return nil, s.storageError(err)
	}
	if member, _ := g.IsMember(req.From.User); !member {
		// Not telling a non-member that the group exists.
		return nil, s.refuse(pb.RefusalCode_REFUSAL_CODE_UNKNOWN_RECIPIENT, "no group %q", req.Group)
	}
	if req.GroupVersion != g.Version {
		r := s.refuse(pb.RefusalCode_REFUSAL_CODE_STALE_GROUP,
			"the group is at version %d, not %d: refresh it, hand the sender key to new members and retry", g.Version, req.GroupVersion)
		r.GroupVersion = g.Version
		return nil, r
	}
	devs, err := s.memberDevices(ctx, g.Members)
	if err != nil {
		return nil, s.storageError(err)
	}
	targets := devs[:0]
	for _, d := range devs {
		if d != req.From {
			targets = append(targets, d)
		}
	}
	if len(targets) == 0 {
		return nil, s.refuse(pb.RefusalCode_REFUSAL_CODE_INVALID, "no device to deliver to (the group has no other member and the sender no other device)")
	}

	now := s.cfg.Now()
	env := &pb.Envelope{
		Kind:         pb.EnvelopeKind_ENVELOPE_KIND_MESSAGE,
		ServerId:     s.ids.New(now),
		Sender:       req.From.User,
		SenderDevice: req.From.ID,
		ServerTimeMs: now.UnixMilli(),
		ClientMsgId:  req.ClientMsgID,
		Group:        req.Group,
		Payload:      req.Payload,
	}
	keyBase := "send/" + req.From.String() + "/" + req.ClientMsgID + "/"
	batch := func(n int, items []mailbox.Item) mailbox.Batch {
		// On a first attempt every chunk's key is new: each is made
		// from the client_msg_id the sender vouches it never sent.
		return mailbox.Batch{Key: keyBase + strconv.Itoa(n), KeyIsNew: req.FirstAttempt,
			Receipt: encodeAccepted(env.ServerId, time.UnixMilli(env.ServerTimeMs)), Items: items, Time: now}
	}
	items, err := sameItems(env, targets)
	if err != nil {
		return nil, err
	}
	chunks := chunk(items, GroupChunk)
	fail := func(err error) (*PendingSend, error) {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, s.storageError(err)
	}
	began := time.Now()
	first, err := s.startAppend(ctx, batch(0, chunks[0]))
	if err != nil {
		return fail(err)
	}
	p := &PendingSend{s: s, pending: []mailbox.Pending{first}, parts: chunks[:1:1], began: began, head: withoutPayload(env),
		acc: Accepted{ServerID: env.ServerId, Time: time.UnixMilli(env.ServerTimeMs)}}
	if len(chunks) == 1 {
		return p, nil
	}
	// The first chunk's result says whether an earlier attempt stored it,
	// under which server id, so the others wait for it to be durable;
	// except on a first attempt, which has no earlier attempt: then they
	// are ordered at once and share its fsync (Wait notifies each part
	// once durable).
	var res mailbox.Result
	if !req.FirstAttempt {
		if res, err = first.Wait(ctx); err != nil {
			return fail(err)
		}
		p.pending[0] = done(res)
		p.setSeqs(0, res.Seqs)
	}
	if res.Duplicate {
		id, t, err := decodeAccepted(res.Receipt)
		if err != nil {
			return nil, fmt.Errorf("decode stored acceptance: %w", err)
		}
		env.ServerId, env.ServerTimeMs = id, t.UnixMilli()
		p.head = withoutPayload(env)
		if items, err = sameItems(env, targets); err != nil {
			return nil, err
		}
		chunks = chunk(items, GroupChunk)
		p.parts = chunks[:1:1]
	}
	for n := 1; n < len(chunks); n++ {
		pend, err := s.startAppend(ctx, batch(n, chunks[n]))
		if err != nil {
			return fail(err)
		}
		p.pending = append(p.pending, pend)
		p.parts = append(p.parts, chunks[n])
	}
	if !req.FirstAttempt && !res.Duplicate {
		// The first chunk is durable: its devices fetch it while the
		// others are made durable.
		p.notifyUpTo(1)
	}
	return p, nil
}

// memberDevices returns the devices of members, in member order and each
// member's in id order. A member whose account is gone has none.
func (s *Service) memberDevices(ctx context.Context, members []accounts.GroupMember) ([]ident.Device, error) {
	var devs []ident.Device
	for _, m := range members {
		ds, err := accounts.DevicesView(ctx, s.cfg.Accounts, m.User)
		if errors.Is(err, accounts.ErrNotFound) {
			continue
		}
		if err != nil {
			return nil, err
		}
		for _, d := range ds {
			devs = append(devs, ident.Device{User: m.User, ID: d.ID})
		}
	}
	return devs, nil
}

// sameItems encodes env once and addresses it to every device of devs.
func sameItems(env *pb.Envelope, devs []ident.Device) ([]mailbox.Item, error) {
	data, err := proto.Marshal(env)
	if err != nil {
		return nil, fmt.Errorf("encode envelope: %w", err)
	}
	items := make([]mailbox.Item, len(devs))
	for i, d := range devs {
		items[i] = mailbox.Item{Device: d, Data: data}
	}
	return items, nil
}

// withoutPayload returns a copy of env without its payload.
func withoutPayload(env *pb.Envelope) *pb.Envelope {
	head := proto.CloneOf(env)
	head.Payload = nil
	return head
}

// chunk cuts items into runs of at most n.
func chunk(items []mailbox.Item, n int) [][]mailbox.Item {
	var out [][]mailbox.Item
	for len(items) > n {
		out = append(out, items[:n:n])
		items = items[n:]
	}
	return append(out, items)
}

// GroupChanged tells every device of every member of the group, before and
// after the change (so the members a change removed learn it too), about a
// change that by made: a GROUP_UPDATE envelope, made durable in their
// mailboxes, and then a notification to the devices. A change that changed
// nothing tells nobody.
//
// The caller makes the change in the store first; if this fails (a
// *Refusal with STORAGE_UNAVAILABLE, or a context error), the change stands
// but some members may not have been told: they learn the group's state
// when they next fetch it, or from the next change's update. The appends
// are keyed by group, version and chunk, so calling it again for the same
// change stores nothing twice.
func (s *Service) GroupChanged(ctx context.Context, by ident.Device, ch accounts.GroupChange) error {
	if !ch.Changed {
		return nil
	}
	g := ch.Group
	up := &pb.GroupUpdate{Group: g.ID, Version: g.Version, Added: ch.Added, Removed: ch.Removed}
	users := make([]accounts.GroupMember, 0, len(g.Members)+len(ch.Removed))
	for _, m := range g.Members {
		up.Members = append(up.Members, &pb.GroupMember{User: m.User, Admin: m.Admin})
		users = append(users, m)
	}
	for _, u := range ch.Removed {
		users = append(users, accounts.GroupMember{User: u})
	}
	devs, err := s.memberDevices(ctx, users)
	if err != nil {
		return s.storageError(err)
	}
	if len(devs) == 0 {
		return nil
	}
	now := s.cfg.Now()
	env := &pb.Envelope{
		Kind:         pb.EnvelopeKind_ENVELOPE_KIND_GROUP_UPDATE,
		ServerId:     s.ids.New(now),
		Sender:       by.User,
		SenderDevice: by.ID,
		ServerTimeMs: now.UnixMilli(),
		Group:        g.ID,
		GroupUpdate:  up,
	}
	items, err := sameItems(env, devs)
	if err != nil {
		return err
	}
	keyBase := "group-update/" + g.ID + "/" + strconv.FormatUint(g.Version, 10) + "/"
	chunks := chunk(items, GroupChunk)
	pending := make([]mailbox.Pending, 0, len(chunks))
	began := time.Now()
	for n, c := range chunks {
		p, err := s.startAppend(ctx, mailbox.Batch{Key: keyBase + strconv.Itoa(n), Items: c, Time: now})
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return s.storageError(err)
		}
		pending = append(pending, p)
	}
	seqs := make([][]uint64, len(pending))
	for i, p := range pending {
		res, err := p.Wait(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return s.storageError(err)
		}
		seqs[i] = res.Seqs
	}
	for i, c := range chunks {
		s.notifyStored(c, seqs[i], began, headers{one: env})
	}
	return nil
}
