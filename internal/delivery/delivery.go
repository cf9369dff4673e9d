// Package delivery is the heart of store-and-forward: it accepts messages
// (validate, authorise against the current device lists, make durable in
// every addressed device's mailbox, then notify), and turns acknowledgements
// and read reports into receipt events that flow back to the sender's
// devices through their own mailboxes.
//
// Group messages (groups.go) are copied by the server: the sender sends one
// payload, sealed with its sender key, and it goes to every device of every
// member of the group but the sending device. Changes of a group's
// membership are told to the members' devices in GROUP_UPDATE envelopes.
//
// It is used by both faces of the server: the WebSocket gateway and the
// HTTP API. It does not know how devices are connected; a Notifier tells the
// component that holds connections that a mailbox has new entries.
package delivery

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"time"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox"
	"github.com/courier-im/courier/internal/metrics"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

// Notifier is told when a device's mailbox has new entries. It must not block.
type Notifier interface {
	Notify(dev ident.Device)
}

// Limits on what a send may carry.
const (
	DefaultMaxPayload  = 64 << 10
	DefaultMaxPayloads = 32
	MaxClientMsgID     = 64
	MaxReadRefs        = 1000
	// StorageRetryAfter is what refusals for unavailable storage suggest.
	StorageRetryAfter = 5 * time.Second
)

// Config configures a Service.
type Config struct {
	Mailbox  mailbox.Store
	Accounts accounts.Store
	// Groups, when set, makes group sends possible (and GroupChanged
	// useful); without it a group send is refused as invalid.
	Groups   accounts.GroupStore
	Notifier Notifier
	Metrics  *metrics.Metrics
	Logger   *slog.Logger
	// MaxPayload is the largest payload for one device, in bytes.
	MaxPayload int
	// MaxPayloads is the most payloads (addressed devices) in one send.
	MaxPayloads int
	// Now returns the current time (tests may fix it).
	Now func() time.Time
}

// Service accepts messages and emits receipts.
type Service struct {
	cfg  Config
	ids  ident.ServerIDs
	acks ackCombiner // group acks waiting for a combined write (combine.go)
}

// New returns a Service. Mailbox, Accounts, Notifier and Metrics are required.
func New(cfg Config) *Service {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.MaxPayload <= 0 {
		cfg.MaxPayload = DefaultMaxPayload
	}
	if cfg.MaxPayloads <= 0 {
		cfg.MaxPayloads = DefaultMaxPayloads
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Service{cfg: cfg}
}

// MaxPayload is the configured payload limit.
func (s *Service) MaxPayload() int { return s.cfg.MaxPayload }

// MaxPayloads is the configured limit on payloads per send.
func (s *Service) MaxPayloads() int { return s.cfg.MaxPayloads }

// Payload is the ciphertext for one device.
type Payload struct {
	Device ident.Device
	Data   []byte
}

// SendRequest is one message from one device: a 1:1 message (To and one
// payload per addressed device in Payloads) or a group message (Group,
// GroupVersion and the one Payload for every device).
type SendRequest struct {
	From        ident.Device
	ClientMsgID string
	To          string
	Payloads    []Payload
	// Group is the group a group message is for; To and Payloads are then
	// empty.
	Group string
	// GroupVersion is the group's version the sender's key was handed out
	// for: it must be the current one (STALE_GROUP otherwise).
	GroupVersion uint64
	// Payload is a group message's one ciphertext.
	Payload []byte
	// FirstAttempt is the sender's word that it never sent ClientMsgID
	// before: the send's appends then skip the idempotency lookup
	// (mailbox.Batch.KeyIsNew), and a false claim can store it twice.
	FirstAttempt bool
}

// Accepted is the answer to an accepted send.
type Accepted struct {
	ServerID  string
	Time      time.Time
	Duplicate bool
}

// Refusal is the error for a send (or read report) that was not accepted.
// Nothing was stored.
type Refusal struct {
	Code       pb.RefusalCode
	Message    string
	Devices    []*pb.UserDevices // for STALE_DEVICES
	RetryAfter time.Duration
	// GroupVersion is the group's current version, for STALE_GROUP.
	GroupVersion uint64
}

func (r *Refusal) Error() string { return fmt.Sprintf("refused (%s): %s", CodeName(r.Code), r.Message) }

// CodeName is the stable lower-case name of a refusal code, used in HTTP
// errors and metrics.
func CodeName(c pb.RefusalCode) string {
	switch c {
	case pb.RefusalCode_REFUSAL_CODE_INVALID:
		return "invalid"
	case pb.RefusalCode_REFUSAL_CODE_UNKNOWN_RECIPIENT:
		return "unknown_recipient"
	case pb.RefusalCode_REFUSAL_CODE_STALE_DEVICES:
		return "stale_devices"
	case pb.RefusalCode_REFUSAL_CODE_PAYLOAD_TOO_LARGE:
		return "payload_too_large"
	case pb.RefusalCode_REFUSAL_CODE_STORAGE_UNAVAILABLE:
		return "storage_unavailable"
	case pb.RefusalCode_REFUSAL_CODE_SHUTTING_DOWN:
		return "shutting_down"
	case pb.RefusalCode_REFUSAL_CODE_RATE_LIMITED:
		return "rate_limited"
	case pb.RefusalCode_REFUSAL_CODE_STALE_GROUP:
		return "stale_group"
	}
	return "unspecified"
}

func (s *Service) refuse(code pb.RefusalCode, format string, args ...any) *Refusal {
	s.cfg.Metrics.Refused.WithLabelValues(CodeName(code)).Inc()
	return &Refusal{Code: code, Message: fmt.Sprintf(format, args...)}
}

// Send accepts a message: it returns only once the message is durable in
// the mailbox of every addressed device, or a *Refusal (nothing stored), or
// a context error (the outcome is then unknown to the caller, who retries
// with the same client message id).
func (s *Service) Send(ctx context.Context, req SendRequest) (Accepted, error) {
	p, err := s.StartSend(ctx, req)
	if err != nil {
		return Accepted{}, err
	}
	return p.Wait(ctx)
}

// PendingSend is a send that StartSend has ordered; Wait says how it ended.
type PendingSend struct {
	s *Service
	// pending holds the send's appends: one, or for a group message to
	// many devices one per chunk (see groups.go), the first of which
	// decides whether the send is a duplicate. parts[i] is what pending[i]
	// appends.
	pending []mailbox.Pending
	parts   [][]mailbox.Item
	// seqs[i] holds the seqs parts[i] took, once it is durable (nil for a
	// duplicate); began is a time taken before the first append began.
	seqs  [][]uint64
	began time.Time
	// head is the message's envelope without its payload (StoredEntry.Head).
	head *pb.Envelope
	// notified counts the leading parts whose devices have been told: a
	// part of a fresh send is told as soon as it is durable, without
	// waiting for the later ones.
	notified int
	acc      Accepted
	// waited holds Wait's result once it has been computed.
	waited bool
	err    error
	// one holds pending, parts and seqs of a send of one append (every
	// 1:1 message), so that it allocates no slices for them.
	one struct {
		pending [1]mailbox.Pending
		parts   [1][]mailbox.Item
		seqs    [1][]uint64
	}
}

// StartSend does the part of Send that orders the message: it checks the
// request and, when the mailbox supports it (mailbox.Sequencer), returns
// as soon as the message has its place in every addressed mailbox, after
// every message of an earlier StartSend that returned, without waiting for
// it to be durable; Wait does that. So a connection can start its sends one
// after another, in the order the device sent them, and let their fsyncs
// be shared. With a mailbox that cannot split an append, StartSend does
// the whole append. Errors are Send's.
func (s *Service) StartSend(ctx context.Context, req SendRequest) (*PendingSend, error) {
	if n := len(req.ClientMsgID); n == 0 || n > MaxClientMsgID {
		return nil, s.refuse(pb.RefusalCode_REFUSAL_CODE_INVALID, "client_msg_id must be 1 to %d bytes", MaxClientMsgID)
	}
	if req.Group != "" {
		return s.startGroupSend(ctx, req)
	}
	if len(req.Payload) > 0 || req.GroupVersion != 0 {
		return nil, s.refuse(pb.RefusalCode_REFUSAL_CODE_INVALID, "payload and group_version are for group messages; a 1:1 message has payloads")
	}
	if !ident.ValidUser(req.To) {
		return nil, s.refuse(pb.RefusalCode_REFUSAL_CODE_INVALID, "to: %v", ident.ErrBadUser)
	}
	if len(req.Payloads) == 0 {
		return nil, s.refuse(pb.RefusalCode_REFUSAL_CODE_INVALID, "no payloads")
	}
	if len(req.Payloads) > s.cfg.MaxPayloads {
		return nil, s.refuse(pb.RefusalCode_REFUSAL_CODE_INVALID, "%d payloads; at most %d", len(req.Payloads), s.cfg.MaxPayloads)
	}
	for _, p := range req.Payloads {
		if len(p.Data) > s.cfg.MaxPayload {
			return nil, s.refuse(pb.RefusalCode_REFUSAL_CODE_PAYLOAD_TOO_LARGE,
				"payload for %s is %d bytes; the limit is %d", p.Device, len(p.Data), s.cfg.MaxPayload)
		}
	}

	// The addressed set must be exactly: every device of the recipient,
	// and every other device of the sender.
	toDevs, err := accounts.DevicesView(ctx, s.cfg.Accounts, req.To)
	if errors.Is(err, accounts.ErrNotFound) {
		return nil, s.refuse(pb.RefusalCode_REFUSAL_CODE_UNKNOWN_RECIPIENT, "no user %q", req.To)
	}
	if err != nil {
		return nil, s.storageError(err)
	}
	fromDevs := toDevs
	if req.From.User != req.To {
		fromDevs, err = accounts.DevicesView(ctx, s.cfg.Accounts, req.From.User)
		if err != nil {
			return nil, s.storageError(err)
		}
	}
	want := make(map[ident.Device]bool, len(toDevs)+len(fromDevs))
	for _, d := range toDevs {
		want[ident.Device{User: req.To, ID: d.ID}] = true
	}
	for _, d := range fromDevs {
		want[ident.Device{User: req.From.User, ID: d.ID}] = true
	}
	delete(want, req.From)
	if len(want) == 0 {
		return nil, s.refuse(pb.RefusalCode_REFUSAL_CODE_INVALID, "no device to deliver to (a note to self needs a second device)")
	}
	stale := len(req.Payloads) != len(want)
	seen := make(map[ident.Device]bool, len(req.Payloads))
	for _, p := range req.Payloads {
		if !want[p.Device] || seen[p.Device] {
			stale = true
			break
		}
		seen[p.Device] = true
	}
	if stale {
		r := s.refuse(pb.RefusalCode_REFUSAL_CODE_STALE_DEVICES, "the payloads must address exactly the current devices of %s and the sender's other devices", req.To)
		r.Devices = []*pb.UserDevices{userDevices(req.To, toDevs)}
		if req.From.User != req.To {
			r.Devices = append(r.Devices, userDevices(req.From.User, fromDevs))
		}
		return nil, r
	}

	now := s.cfg.Now()
	serverID := s.ids.New(now)
	env := &pb.Envelope{
		Kind:         pb.EnvelopeKind_ENVELOPE_KIND_MESSAGE,
		ServerId:     serverID,
		Sender:       req.From.User,
		SenderDevice: req.From.ID,
		ServerTimeMs: now.UnixMilli(),
		ClientMsgId:  req.ClientMsgID,
		To:           req.To,
	}
	items, err := messageItems(env, req.Payloads)
	if err != nil {
		return nil, err
	}
	began := time.Now()
	p, err := s.startAppend(ctx, mailbox.Batch{
		Key:      "send/" + req.From.String() + "/" + req.ClientMsgID,
		KeyIsNew: req.FirstAttempt,
		Receipt:  encodeAccepted(serverID, now),
		Items:    items,
		Time:     now,
	})
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, s.storageError(err)
	}
	ps := &PendingSend{s: s, began: began, head: env, acc: Accepted{ServerID: serverID, Time: time.UnixMilli(now.UnixMilli())}}
	ps.one.pending[0], ps.one.parts[0] = p, items
	ps.pending, ps.parts, ps.seqs = ps.one.pending[:], ps.one.parts[:], ps.one.seqs[:0]
	return ps, nil
}

// Wait returns once the message is durable (or known to be a duplicate),
// with Send's result and errors. It may be called more than once.
func (p *PendingSend) Wait(ctx context.Context) (Accepted, error) {
	if p.waited {
		return p.acc, p.err
	}
	acc, err := p.wait(ctx)
	if ctx.Err() == nil || err == nil {
		// A context error is the caller's, not the send's: not kept.
		p.acc, p.err, p.waited = acc, err, true
	}
	return acc, err
}

func (p *PendingSend) wait(ctx context.Context) (Accepted, error) {
	s := p.s
	var res mailbox.Result
	for i, pend := range p.pending {
		r, err := pend.Wait(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return Accepted{}, ctx.Err()
			}
			return Accepted{}, s.storageError(err)
		}
		if i == 0 {
			res = r
		}
		p.setSeqs(i, r.Seqs)
		if !res.Duplicate {
			// This part is durable: its devices may fetch it while the
			// later parts are still being made durable.
			p.notifyUpTo(i + 1)
		}
	}
	if res.Duplicate {
		s.cfg.Metrics.Duplicates.Inc()
		id, t, err := decodeAccepted(res.Receipt)
		if err != nil {
			return Accepted{}, fmt.Errorf("decode stored acceptance: %w", err)
		}
		if len(p.pending) > 1 {
			// The later chunks may have been stored only now, finishing
			// an earlier attempt.
			p.notifyUpTo(len(p.parts))
		}
		return Accepted{ServerID: id, Time: t, Duplicate: true}, nil
	}
	s.cfg.Metrics.Accepted.Inc()
	return p.acc, nil
}

// setSeqs records the seqs part i took, now that it is durable.
func (p *PendingSend) setSeqs(i int, seqs []uint64) {
	for len(p.seqs) <= i {
		p.seqs = append(p.seqs, nil)
	}
	p.seqs[i] = seqs
}

// notifyUpTo tells the devices of parts[:n] that have not been told yet,
// handing them their entries (notifyStored) where the seqs are known.
// Only a durable part may be told: a device must never fetch a copy that a
// crash could take back.
func (p *PendingSend) notifyUpTo(n int) {
	for ; p.notified < n; p.notified++ {
		var seqs []uint64
		if p.notified < len(p.seqs) {
			seqs = p.seqs[p.notified]
		}
		p.s.notifyStored(p.parts[p.notified], seqs, p.began, headers{one: p.head})
	}
}

// startAppend orders b in the mailbox: with mailbox.StartAppend when the
// store has it, else with a whole Append.
func (s *Service) startAppend(ctx context.Context, b mailbox.Batch) (mailbox.Pending, error) {
	if sq, ok := s.cfg.Mailbox.(mailbox.Sequencer); ok {
		return sq.StartAppend(ctx, b)
	}
	res, err := s.cfg.Mailbox.Append(ctx, b)
	if err != nil {
		return nil, err
	}
	return done(res), nil
}

// done is a mailbox.Pending that has already completed.
type done mailbox.Result

func (d done) Wait(context.Context) (mailbox.Result, error) { return mailbox.Result(d), nil }

// messageItems encodes env once for each payload, with that payload, as
// proto.Marshal would (byte for byte: payload is the last field a message
// envelope sets, and Marshal writes fields in number order), but marshals
// the rest of the envelope only once and puts every copy in one buffer,
// which matters for a message to many devices.
func messageItems(env *pb.Envelope, payloads []Payload) ([]mailbox.Item, error) {
	if env.Payload != nil || env.Receipt != nil {
		return nil, errors.New("encode envelope: messageItems needs an envelope without payload or receipt")
	}
	head, err := proto.Marshal(env)
	if err != nil {
		return nil, fmt.Errorf("encode envelope: %w", err)
	}
	total := 0
	for _, p := range payloads {
		total += len(head)
		if len(p.Data) > 0 {
			total += protowire.SizeTag(envelopePayloadField) + protowire.SizeBytes(len(p.Data))
		}
	}
	buf := make([]byte, 0, total)
	items := make([]mailbox.Item, len(payloads))
	for i, p := range payloads {
		start := len(buf)
		buf = append(buf, head...)
		if len(p.Data) > 0 { // proto3: an empty bytes field is not written
			buf = protowire.AppendTag(buf, envelopePayloadField, protowire.BytesType)
			buf = protowire.AppendBytes(buf, p.Data)
		}
		items[i] = mailbox.Item{Device: p.Device, Data: buf[start:len(buf):len(buf)]}
	}
	return items, nil
}

// envelopePayloadField is the field number of Envelope.payload.
const envelopePayloadField = 8

func (s *Service) storageError(err error) *Refusal {
	s.cfg.Logger.Error("storage failure; refusing", "err", err)
	r := s.refuse(pb.RefusalCode_REFUSAL_CODE_STORAGE_UNAVAILABLE, "the server cannot store messages right now; retry later with the same client_msg_id")
	r.RetryAfter = StorageRetryAfter
	return r
}

func userDevices(user string, devs []accounts.Device) *pb.UserDevices {
	ud := &pb.UserDevices{User: user}
	for _, d := range devs {
		ud.Devices = append(ud.Devices, d.ID)
	}
	return ud
}

// The acceptance stored with the idempotency key: "serverID unixMillis".
func encodeAccepted(id string, t time.Time) []byte {
	return strconv.AppendInt(append([]byte(id), ' '), t.UnixMilli(), 10)
}

func decodeAccepted(b []byte) (string, time.Time, error) {
	i := slices.Index(b, ' ')
	if i < 0 {
		return "", time.Time{}, fmt.Errorf("malformed acceptance %q", b)
	}
	ms, err := strconv.ParseInt(string(b[i+1:]), 10, 64)
	if err != nil {
		return "", time.Time{}, fmt.Errorf("malformed acceptance %q", b)
	}
	return string(b[:i]), time.UnixMilli(ms), nil
}
