// Package delivery is the heart of store-and-forward: it accepts messages
// (validate, authorise against the current device lists, make durable in
// every addressed device's mailbox, then notify), and turns acknowledgements
// and read reports into receipt events that flow back to the sender's
// devices through their own mailboxes.
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
	cfg Config
	ids ident.ServerIDs
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

// SendRequest is one message from one device.
type SendRequest struct {
	From        ident.Device
	ClientMsgID string
	To          string
	Payloads    []Payload
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
	if n := len(req.ClientMsgID); n == 0 || n > MaxClientMsgID {
		return Accepted{}, s.refuse(pb.RefusalCode_REFUSAL_CODE_INVALID, "client_msg_id must be 1 to %d bytes", MaxClientMsgID)
	}
	if !ident.ValidUser(req.To) {
		return Accepted{}, s.refuse(pb.RefusalCode_REFUSAL_CODE_INVALID, "to: %v", ident.ErrBadUser)
	}
	if len(req.Payloads) == 0 {
		return Accepted{}, s.refuse(pb.RefusalCode_REFUSAL_CODE_INVALID, "no payloads")
	}
	if len(req.Payloads) > s.cfg.MaxPayloads {
		return Accepted{}, s.refuse(pb.RefusalCode_REFUSAL_CODE_INVALID, "%d payloads; at most %d", len(req.Payloads), s.cfg.MaxPayloads)
	}
	for _, p := range req.Payloads {
		if len(p.Data) > s.cfg.MaxPayload {
			return Accepted{}, s.refuse(pb.RefusalCode_REFUSAL_CODE_PAYLOAD_TOO_LARGE,
				"payload for %s is %d bytes; the limit is %d", p.Device, len(p.Data), s.cfg.MaxPayload)
		}
	}

	// The addressed set must be exactly: every device of the recipient,
	// and every other device of the sender.
	toDevs, err := s.cfg.Accounts.Devices(ctx, req.To)
	if errors.Is(err, accounts.ErrNotFound) {
		return Accepted{}, s.refuse(pb.RefusalCode_REFUSAL_CODE_UNKNOWN_RECIPIENT, "no user %q", req.To)
	}
	if err != nil {
		return Accepted{}, s.storageError(err)
	}
	fromDevs := toDevs
	if req.From.User != req.To {
		fromDevs, err = s.cfg.Accounts.Devices(ctx, req.From.User)
		if err != nil {
			return Accepted{}, s.storageError(err)
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
		return Accepted{}, s.refuse(pb.RefusalCode_REFUSAL_CODE_INVALID, "no device to deliver to (a note to self needs a second device)")
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
		return Accepted{}, r
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
	items := make([]mailbox.Item, len(req.Payloads))
	for i, p := range req.Payloads {
		env.Payload = p.Data
		data, err := proto.Marshal(env)
		if err != nil {
			return Accepted{}, fmt.Errorf("encode envelope: %w", err)
		}
		items[i] = mailbox.Item{Device: p.Device, Data: data}
	}
	res, err := s.cfg.Mailbox.Append(ctx, mailbox.Batch{
		Key:     "send/" + req.From.String() + "/" + req.ClientMsgID,
		Receipt: encodeAccepted(serverID, now),
		Items:   items,
		Time:    now,
	})
	if err != nil {
		if ctx.Err() != nil {
			return Accepted{}, ctx.Err()
		}
		return Accepted{}, s.storageError(err)
	}
	if res.Duplicate {
		s.cfg.Metrics.Duplicates.Inc()
		id, t, err := decodeAccepted(res.Receipt)
		if err != nil {
			return Accepted{}, fmt.Errorf("decode stored acceptance: %w", err)
		}
		return Accepted{ServerID: id, Time: t, Duplicate: true}, nil
	}
	s.cfg.Metrics.Accepted.Inc()
	for _, it := range items {
		s.cfg.Notifier.Notify(it.Device)
	}
	return Accepted{ServerID: serverID, Time: time.UnixMilli(now.UnixMilli())}, nil
}

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
