package client

import (
	"strconv"
	"time"
)

// Credentials identify and authenticate one device. They are issued once, at
// registration (Register), and kept by the application (the CLI keeps them
// in its profile directory).
type Credentials struct {
	Server string `json:"server"` // base URL, e.g. http://127.0.0.1:8080
	User   string `json:"user"`
	Device uint32 `json:"device"`
	Secret string `json:"credential"`
}

// Status is where a message the user sent stands. It only moves forward:
// Pending → Sent → Delivered → Read.
type Status int

const (
	StatusPending   Status = iota // in the outbox, not yet accepted by the server
	StatusSent                    // accepted and durable on the server (✓)
	StatusDelivered               // acknowledged by a device of the recipient (✓✓)
	StatusRead                    // read by the recipient (blue ✓✓)

	// StatusUnknown is what Client.Status and Tracker.Status report for a
	// message they do not know (never sent from here, forgotten, or refused).
	StatusUnknown Status = -1
)

// String returns the lower-case name of s: "pending", "sent", "delivered",
// "read" or "unknown".
func (s Status) String() string {
	switch s {
	case StatusPending:
		return "pending"
	case StatusSent:
		return "sent"
	case StatusDelivered:
		return "delivered"
	case StatusRead:
		return "read"
	case StatusUnknown:
		return "unknown"
	}
	return "Status(" + strconv.Itoa(int(s)) + ")"
}

// Device is the address of one device of one user, written "alice.1".
type Device struct {
	User string
	ID   uint32
}

// String returns the "user.id" form of d.
func (d Device) String() string { return d.User + "." + strconv.FormatUint(uint64(d.ID), 10) }

// Sent is the server's acceptance of a message: from then on the server
// owns its delivery. Time is the server's acceptance time. Duplicate is true
// when the server had accepted this client message id before (a retry whose
// first answer was lost); the ids and time are then those of the first
// acceptance.
type Sent struct {
	MessageRef
	Time      time.Time
	Duplicate bool
}

// MessageRef names a message by its server id and the sender's client id.
type MessageRef struct {
	ServerID    string
	ClientMsgID string
}

// Event is what a Client reports to the application: *MessageEvent,
// *ReceiptEvent, *PresenceEvent, *TypingEvent, *ConnectionEvent,
// *SyncedEvent, *SendFailedEvent or *KeysLowEvent.
type Event interface{ isEvent() }

// MessageEvent is a message delivered to this device, after duplicate
// suppression: each message is reported once.
type MessageEvent struct {
	ServerID    string
	ClientMsgID string
	From        string // sending user
	FromDevice  uint32
	// To is the user the message was sent to: this user, or, for a copy of
	// a message sent by another of this user's devices (Sync), the peer.
	To string
	// Group is set for a message to a group: the group's id (To is then
	// empty).
	Group string
	Sync  bool
	Time  time.Time // server acceptance time
	Body  []byte
	// Err is set, and Body nil, when Config.Open could not open the
	// payload. The message is still reported once and acknowledged.
	Err error
}

// ReceiptEvent reports that a message this user sent advanced to Status.
// It is emitted only when the state moves forward (duplicate and late
// receipts are swallowed), and also for StatusSent when the outbox gets the
// server's acceptance.
type ReceiptEvent struct {
	Message  MessageRef
	To       string // the peer the message was sent to, if known (GroupPeer for a group)
	Group    string // for a message to a group: its id; By is then the member the receipt is from
	Status   Status
	By       string // the user whose device produced the receipt
	ByDevice uint32
	Time     time.Time
}

// PresenceEvent reports a subscribed user's presence.
type PresenceEvent struct {
	User     string
	Online   bool
	LastSeen time.Time // zero if never seen
}

// TypingEvent reports that a peer started or stopped typing to this user.
type TypingEvent struct {
	From       string
	FromDevice uint32
	Typing     bool
}

// SendFailedEvent reports that a message left the outbox without being
// accepted: the server refused it for good (Err is then a *RefusedError),
// or Config.Seal failed. It is how SendAsync callers learn of failures.
type SendFailedEvent struct {
	Message MessageRef // ClientMsgID only
	To      string     // the recipient, or GroupPeer of the group
	Group   string     // for a message to a group: its id
	Err     error
}

// ConnState is the state of the client's connection.
type ConnState int

// String returns "disconnected", "connecting" or "connected".
func (s ConnState) String() string {
	switch s {
	case Disconnected:
		return "disconnected"
	case Connecting:
		return "connecting"
	case Connected:
		return "connected"
	}
	return "ConnState(" + strconv.Itoa(int(s)) + ")"
}

// Connection states.
const (
	Disconnected ConnState = iota // not connected; Run retries after ConnectionEvent.RetryIn, or has stopped
	Connecting                    // dialling and waiting for the server's hello
	Connected                     // live: entries stream in, and the outbox sends over the connection
)

// ConnectionEvent reports a change of connection state. Err says why a
// connection ended or failed; RetryIn when the next attempt is due.
type ConnectionEvent struct {
	State   ConnState
	Err     error
	RetryIn time.Duration
}

// SyncedEvent reports that everything pending at connect time has been
// delivered to the application.
type SyncedEvent struct {
	Pending int
}

func (*MessageEvent) isEvent()    {}
func (*ReceiptEvent) isEvent()    {}
func (*PresenceEvent) isEvent()   {}
func (*TypingEvent) isEvent()     {}
func (*ConnectionEvent) isEvent() {}
func (*SyncedEvent) isEvent()     {}
func (*SendFailedEvent) isEvent() {}
