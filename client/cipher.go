package client

import (
	"context"
	"errors"
	"net"
	"net/url"
	"time"
)

// Cipher is an end-to-end encryption layer: it seals what the outbox sends
// and opens what arrives. Package client/e2e implements it with the Signal
// protocol. When Config.Cipher is set, Config.Seal and Config.Open are not
// used.
type Cipher interface {
	// Seal encrypts m for each of the devices to, answering one payload per
	// device in the same order. The outbox calls it at every attempt, with
	// the device lists current then (a stale_devices refusal brings new
	// ones). An error wrapped in a *SealError that is Temporary is retried
	// with backoff; any other error fails the message (SendFailedEvent).
	Seal(ctx context.Context, m OutboxMessage, to []Device) ([][]byte, error)

	// Open decrypts the payload of a message. An error is reported to
	// Handler in MessageEvent.Err (the message is still acknowledged: the
	// Cipher is expected to have done what can be done about it, such as
	// asking the sender to send it again).
	Open(ctx context.Context, in Inbound) (Opened, error)
}

// KeysLowHandler is implemented by a Cipher that wants to hear of
// ENVELOPE_KIND_KEYS_LOW notices (the server has few of this device's
// one-time prekeys left). KeysLow is called from the dispatcher goroutine
// and must not block for long.
type KeysLowHandler interface {
	KeysLow(remaining int)
}

// Inbound is a message envelope as a Cipher sees it.
type Inbound struct {
	ServerID    string
	ClientMsgID string // as the envelope says: for a resend, a new id
	From        Device
	To          string
	Group       string // a group message: the group (To is empty)
	Time        time.Time
	Payload     []byte
}

// Opened is what a Cipher made of an Inbound payload.
type Opened struct {
	Body []byte
	// ClientMsgID, if not empty, is the message's own client id, reported
	// in MessageEvent.ClientMsgID instead of the envelope's (a resend
	// travels under a new transport id).
	ClientMsgID string
	// Drop says there is nothing for the application: a control message
	// between ciphers, or a message it was given before. The entry is
	// acknowledged and marked seen.
	Drop bool
	// GroupInfo, if set, is a group's details (its name) that a member
	// sent this user: the Client checks the sender is a member and stores
	// them. Drop is then true.
	GroupInfo *GroupInfo
}

// Temporary reports whether the cause of a SealError may go away by
// itself: the server was busy or unreachable while the Cipher fetched
// keys.
func (e *SealError) Temporary() bool { return temporary(e.Err) }

func temporary(err error) bool {
	var re *RefusedError
	if errors.As(err, &re) {
		return re.Temporary()
	}
	var ue *url.Error
	var ne net.Error
	return errors.As(err, &ue) || errors.As(err, &ne) || errors.Is(err, context.DeadlineExceeded)
}

// KeysLowEvent reports the server's notice that this device has few
// one-time prekeys left (Remaining). A Cipher implementing KeysLowHandler
// has been told already; the event is for the application's information.
type KeysLowEvent struct {
	Remaining int
}

func (*KeysLowEvent) isEvent() {}
