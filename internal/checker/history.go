// Package checker proves, by experiment, that courier keeps its delivery
// promise. It runs real SDK clients (package client) against a server,
// records everything they see in a History, and then checks the History:
//
//   - every accepted message reaches, exactly once after the SDK's
//     de-duplication, every device of the recipient and every other device
//     of the sender that existed when it was accepted;
//   - nothing arrives that was not sent, and what arrives has the body and
//     sender that were sent;
//   - from one sender device to one recipient device, messages arrive in
//     the order they were accepted;
//   - the receipt status the SDK reports for a message on a device never
//     moves backward;
//   - a send that was never seen accepted (its context ended first) may or
//     may not arrive, but at most once per device.
//
// A History is a plain, thread-safe recorder: anything that can observe a
// conversation (the Driver, a test feeding a synthetic history, a soak
// command) records sends, acceptances, deliveries and receipts into it, and
// Check returns the Violations. Report prints, for each violation, only the
// events that concern the offending message(s), in time order: a minimal
// readable history of what went wrong.
//
// The Driver runs a randomised, seeded conversation between a few users
// (some with two devices) against a server URL: each device sends its
// share of the messages one after another with Client.Send, some devices
// mark what they read, some disconnect and come back as a new Client with
// the same credentials and the same (persistent) seen set, outbox and
// receipt tracker. A fault hook runs at fixed points of the conversation
// (a test restarts the server there). After the conversation, every
// client stays connected until every accepted message has been delivered
// everywhere it should (or a deadline passes), and the History is checked.
// Some devices can be made to read slowly, or to stall (never ack) until
// the conversation is over and then come back (Config.SlowReaders,
// Config.Stalled).
//
// Process runs the server under test as a child process on a data
// directory and port, and can kill it with SIGKILL and start it again;
// Process.KillFault is a Fault hook doing that at a random moment, and
// Process.Metrics reads the child's /metrics. Front stands in for a
// cluster's load balancer (WebSockets to the gateways, the rest to the api)
// so that the SDK's single server URL can point at a cluster.
package checker

import (
	"bytes"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/courier-im/courier/client"
)

// Kind is the kind of a recorded Event.
type Kind int

// Event kinds.
const (
	KindDevices   Kind = iota // the device set of a user (Device.User; Devices)
	KindSend                  // a send attempt entered a device's outbox
	KindAccepted              // the server accepted a message (server id known)
	KindDelivered             // the SDK handed a message to a device's application
	KindReceipt               // the SDK reported a receipt status on a device
)

// String returns the kind's name.
func (k Kind) String() string {
	switch k {
	case KindDevices:
		return "devices"
	case KindSend:
		return "send"
	case KindAccepted:
		return "accepted"
	case KindDelivered:
		return "delivered"
	case KindReceipt:
		return "receipt"
	}
	return fmt.Sprintf("Kind(%d)", int(k))
}

// Event is one recorded observation. Which fields are set depends on Kind.
type Event struct {
	Seq  int       // order of recording, from 1
	At   time.Time // when it was recorded
	Kind Kind

	// Device is the device the event happened at: the sender for Send and
	// Accepted, the receiving device for Delivered, the observer for
	// Receipt. For Devices only Device.User is set.
	Device client.Device
	// From is the sending device of a Delivered message.
	From client.Device
	// To is the recipient user of a Send.
	To          string
	ClientMsgID string
	ServerID    string
	Body        []byte
	Sync        bool          // Delivered: a copy of the user's own message
	Status      client.Status // Receipt
	Devices     []uint32      // Devices
}

// String formats the event on one line (without its time).
func (e Event) String() string {
	switch e.Kind {
	case KindDevices:
		return fmt.Sprintf("devices   %s has %v", e.Device.User, e.Devices)
	case KindSend:
		return fmt.Sprintf("send      %s → %s cmid=%s body=%q", e.Device, e.To, e.ClientMsgID, e.Body)
	case KindAccepted:
		return fmt.Sprintf("accepted  %s cmid=%s sid=%s", e.Device, e.ClientMsgID, e.ServerID)
	case KindDelivered:
		s := fmt.Sprintf("delivered at %s from %s sid=%s cmid=%s body=%q", e.Device, e.From, e.ServerID, e.ClientMsgID, e.Body)
		if e.Sync {
			s += " (sync)"
		}
		return s
	case KindReceipt:
		return fmt.Sprintf("receipt   at %s sid=%s status=%s", e.Device, e.ServerID, e.Status)
	}
	return e.Kind.String()
}

// msgKey names a message by its sending device and client message id.
type msgKey struct {
	from client.Device
	cmid string
}

type devSet = map[client.Device]bool

// History records what happened in a conversation. Its methods are safe for
// concurrent use. The zero value is not usable; call NewHistory.
type History struct {
	mu     sync.Mutex
	events []Event
	notify chan struct{} // a token after each change to the delivery state

	// Incremental view for Outstanding.
	devices   map[string][]uint32
	expected  map[string]devSet // server id → devices still owed the message
	delivered map[string]devSet // server id → devices that got it
	accepted  map[string]bool
	missing   int
	sent      map[msgKey]bool // send attempts not (yet) seen accepted
}

// NewHistory returns an empty History.
func NewHistory() *History {
	return &History{
		notify:    make(chan struct{}, 1),
		devices:   map[string][]uint32{},
		expected:  map[string]devSet{},
		delivered: map[string]devSet{},
		accepted:  map[string]bool{},
		sent:      map[msgKey]bool{},
	}
}

func (h *History) record(e Event) {
	h.mu.Lock()
	e.Seq = len(h.events) + 1
	if e.At.IsZero() {
		e.At = time.Now()
	}
	e.Body = bytes.Clone(e.Body)
	e.Devices = slices.Clone(e.Devices)
	h.events = append(h.events, e)
	switch e.Kind {
	case KindDevices:
		h.devices[e.Device.User] = e.Devices
	case KindSend:
		if _, ok := h.sent[msgKey{e.Device, e.ClientMsgID}]; !ok {
			h.sent[msgKey{e.Device, e.ClientMsgID}] = true
		}
	case KindAccepted:
		h.sent[msgKey{e.Device, e.ClientMsgID}] = false
		h.noteAccepted(e)
	case KindDelivered:
		d := h.delivered[e.ServerID]
		if d == nil {
			d = devSet{}
			h.delivered[e.ServerID] = d
		}
		d[e.Device] = true
		if exp := h.expected[e.ServerID]; exp[e.Device] {
			delete(exp, e.Device)
			h.missing--
		}
	}
	h.mu.Unlock()
	select {
	case h.notify <- struct{}{}:
	default:
	}
}

// noteAccepted updates the incremental view for the first acceptance of a
// server id. The caller holds h.mu.
func (h *History) noteAccepted(e Event) {
	if h.accepted[e.ServerID] {
		return
	}
	h.accepted[e.ServerID] = true
	var to string
	for i := len(h.events) - 1; i >= 0; i-- {
		s := h.events[i]
		if s.Kind == KindSend && s.Device == e.Device && s.ClientMsgID == e.ClientMsgID {
			to = s.To
			break
		}
	}
	if to == "" {
		return
	}
	exp := devSet{}
	for d := range addressees(h.devices, e.Device, to) {
		if !h.delivered[e.ServerID][d] {
			exp[d] = true
			h.missing++
		}
	}
	h.expected[e.ServerID] = exp
}

// addressees is the set of devices a message from from to user to is owed
// to, given the device sets.
func addressees(devices map[string][]uint32, from client.Device, to string) devSet {
	set := devSet{}
	for _, id := range devices[to] {
		set[client.Device{User: to, ID: id}] = true
	}
	for _, id := range devices[from.User] {
		set[client.Device{User: from.User, ID: id}] = true
	}
	delete(set, from)
	return set
}

// SetDevices records the current device set of a user. A message is owed
// to the device sets in force when its acceptance is recorded.
func (h *History) SetDevices(user string, ids []uint32) {
	h.record(Event{Kind: KindDevices, Device: client.Device{User: user}, Devices: ids})
}

// Send records a send attempt: a message from device from to user to, with
// its client message id and body, entering the outbox.
func (h *History) Send(from client.Device, to, clientMsgID string, body []byte) {
	h.record(Event{Kind: KindSend, Device: from, To: to, ClientMsgID: clientMsgID, Body: body})
}

// Accepted records that the server accepted the message clientMsgID from
// device from as serverID. Recording it more than once is harmless (if the
// server id is the same each time).
func (h *History) Accepted(from client.Device, clientMsgID, serverID string) {
	h.record(Event{Kind: KindAccepted, Device: from, ClientMsgID: clientMsgID, ServerID: serverID})
}

// Delivered records that the SDK handed device at a message from device
// from.
func (h *History) Delivered(at, from client.Device, serverID, clientMsgID string, body []byte, sync bool) {
	h.record(Event{Kind: KindDelivered, Device: at, From: from, ServerID: serverID,
		ClientMsgID: clientMsgID, Body: body, Sync: sync})
}

// Receipt records that the SDK on device at reported status for the
// message serverID.
func (h *History) Receipt(at client.Device, serverID string, status client.Status) {
	h.record(Event{Kind: KindReceipt, Device: at, ServerID: serverID, Status: status})
}

// Events returns a copy of the recorded events, in recording order.
func (h *History) Events() []Event {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.events)
}

// Outstanding returns how many (accepted message, device) deliveries are
// still owed.
func (h *History) Outstanding() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.missing
}

// Unaccepted returns how many recorded send attempts have no recorded
// acceptance.
func (h *History) Unaccepted() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, waiting := range h.sent {
		if waiting {
			n++
		}
	}
	return n
}

// Changed returns a channel that receives a token after events are
// recorded (tokens coalesce). It is for one waiter at a time.
func (h *History) Changed() <-chan struct{} { return h.notify }

// Stats are totals over a History.
type Stats struct {
	Sends      int // distinct send attempts
	Accepted   int // distinct accepted messages
	Deliveries int // distinct (message, device) deliveries
	Duplicates int // deliveries shown more than once (beyond the first), by sender device and client message id, whatever their server ids
	Receipts   int // receipt events other than "sent"
}

// Stats counts what the History holds.
func (h *History) Stats() Stats {
	var st Stats
	sends := map[msgKey]bool{}
	acc := map[string]bool{}
	dels := map[string]devSet{}
	type shownKey struct {
		msg msgKey
		at  client.Device
	}
	shown := map[shownKey]bool{}
	for _, e := range h.Events() {
		switch e.Kind {
		case KindSend:
			sends[msgKey{e.Device, e.ClientMsgID}] = true
		case KindAccepted:
			acc[e.ServerID] = true
		case KindDelivered:
			d := dels[e.ServerID]
			if d == nil {
				d = devSet{}
				dels[e.ServerID] = d
			}
			if !d[e.Device] {
				d[e.Device] = true
				st.Deliveries++
			}
			k := shownKey{msgKey{e.From, e.ClientMsgID}, e.Device}
			if shown[k] {
				st.Duplicates++
			}
			shown[k] = true
		case KindReceipt:
			if e.Status != client.StatusSent {
				st.Receipts++
			}
		}
	}
	st.Sends, st.Accepted = len(sends), len(acc)
	return st
}
