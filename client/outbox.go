package client

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync/atomic"
	"time"
)

// OutboxMessage is a message waiting in the outbox: plaintext, since it is
// sealed anew for the device lists current at each attempt.
type OutboxMessage struct {
	ClientMsgID string
	From        Device // the sending device (this client's)
	To          string
	Body        []byte
	Created     time.Time
	// Control marks a message of the Cipher's own (a request to resend,
	// say): not the user's, so not tracked and reported by no event.
	Control bool
	// ContentID, when set, makes this a resend: the body of the message
	// sent earlier with client id ContentID, sent again under a new client
	// id because a device could not decrypt it. Like Control, it is not
	// tracked or reported.
	ContentID string
	// Group, with To empty, makes this a message to a group (sealed once
	// with the sender key, GroupCipher.SealGroup). With To and Control
	// set, Body is the name of group Group, sent to member To.
	Group string
}

// hidden reports whether m is not a message the user sent just now.
func (m OutboxMessage) hidden() bool { return m.Control || m.ContentID != "" }

// ToGroup reports whether m is a message to a group.
func (m OutboxMessage) ToGroup() bool { return m.To == "" && m.Group != "" }

// peer is the conversation m belongs to: the recipient user, or
// GroupPeer of the group.
func (m OutboxMessage) peer() string {
	if m.ToGroup() {
		return GroupPeer(m.Group)
	}
	return m.To
}

// OutboxStore persists the outbox, so that messages not yet accepted
// survive a restart and are sent, with the same client message ids, by the
// next Client made with the same store. The Client keeps the queue itself;
// the store only mirrors it. Implementations must be safe for concurrent
// use.
type OutboxStore interface {
	// Add stores a message entering the outbox. Send and SendAsync call it
	// before they return, and fail if it fails.
	Add(m OutboxMessage) error
	// Remove deletes a message that left the outbox: accepted by the
	// server, or refused for good.
	Remove(clientMsgID string) error
	// Pending returns the stored messages, oldest first.
	Pending() ([]OutboxMessage, error)
}

// memOutbox is the default OutboxStore: it stores nothing, so the outbox
// lives only in the Client's memory.
type memOutbox struct{}

func (memOutbox) Add(OutboxMessage) error           { return nil }
func (memOutbox) Remove(string) error               { return nil }
func (memOutbox) Pending() ([]OutboxMessage, error) { return nil, nil }

// outbox is the client's queue of messages to send, oldest first. One
// goroutine sends them in order, so that messages from this device reach
// each recipient in the order they were sent.
type outbox struct {
	queue *queue[*outItem]
	retry chan struct{} // a connection came up: retry now
}

type outItem struct {
	msg  OutboxMessage
	done chan sendResult // nil if no one waits (SendAsync, restored)
	// barrier, if set, makes this a marker of Flush, closed when the
	// outbox reaches it.
	barrier chan struct{}
	// first says whether msg may still go out as a first attempt. Only
	// enqueueMessage sets it: a message loaded from Config.Outbox may have
	// been transmitted by an earlier process.
	first firstTry
}

// firstTry tracks whether a message's client id may have reached the
// server yet, for the Send frame's first_attempt: true tells the server
// not to look for an earlier acceptance, so it must be said only on the
// message's very first transmission. Anything later (a retry after an
// error or a timeout, a send after a reconnect, a reseal after
// stale_devices) says false. The zero value has been transmitted.
type firstTry struct{ unsent atomic.Bool }

// fresh returns a firstTry for a message made in this process and not
// yet transmitted.
func fresh() *firstTry {
	f := new(firstTry)
	f.unsent.Store(true)
	return f
}

// take is called just before the message is transmitted, over whichever
// transport: it reports whether this is the first transmission and
// records that there has been one. It is called before the write, since a
// write that fails may still have reached the server. A nil *firstTry is
// never first.
func (f *firstTry) take() bool {
	return f != nil && f.unsent.Swap(false)
}

type sendResult struct {
	sent Sent
	err  error
}

// maxStaleRetries is how many stale_devices refusals in a row are retried
// at once (with the device lists from the refusal) before backing off.
const maxStaleRetries = 3

// SealError reports that Config.Seal failed for a device. The message is
// dropped from the outbox.
type SealError struct {
	Device Device
	Err    error
}

// Error says which device the seal failed for, and why.
func (e *SealError) Error() string {
	to := e.Device.String()
	if e.Device.ID == 0 { // the whole message, not one device
		to = e.Device.User
	}
	return fmt.Sprintf("courier: seal for %s: %v", to, e.Err)
}

// Unwrap returns Seal's error.
func (e *SealError) Unwrap() error { return e.Err }

func (c *Client) enqueue(to string, body []byte, wait bool) (*outItem, error) {
	return c.enqueueMessage(OutboxMessage{To: to, Body: body}, wait)
}

// SendControl puts in the outbox a message that is not the user's: a
// Cipher's control message (control true), or a resend of the message
// sent earlier with client id contentID. It is sent like any message, in
// order, and survives restarts with the outbox, but it is not tracked and
// no event reports it; it returns the message's new client id.
func (c *Client) SendControl(to string, body []byte, control bool, contentID string) (string, error) {
	if !control && contentID == "" {
		return "", errors.New("courier: send control: neither a control message nor a resend")
	}
	it, err := c.enqueueMessage(OutboxMessage{To: to, Body: body, Control: control, ContentID: contentID}, false)
	if err != nil {
		return "", err
	}
	return it.msg.ClientMsgID, nil
}

func (c *Client) enqueueMessage(m OutboxMessage, wait bool) (*outItem, error) {
	if c.isClosed() {
		return nil, ErrClosed
	}
	switch {
	case m.ToGroup():
		if !validGroupID(m.Group) {
			return nil, fmt.Errorf("courier: send: bad group id %q", m.Group)
		}
	case !validUser(m.To):
		return nil, fmt.Errorf("courier: send: bad user name %q", m.To)
	}
	m.ClientMsgID, m.From, m.Body, m.Created = newClientMsgID(), c.self, slices.Clone(m.Body), time.Now()
	if err := c.store.Add(m); err != nil {
		return nil, fmt.Errorf("courier: send: store in the outbox: %w", err)
	}
	it := &outItem{msg: m}
	it.first.unsent.Store(true)
	if wait {
		it.done = make(chan sendResult, 1)
	}
	if !m.hidden() {
		c.tracker.Track(MessageRef{ClientMsgID: m.ClientMsgID}, m.peer())
	}
	c.outbox.queue.push(it)
	return it, nil
}

// outboxLoop sends the outbox's messages, oldest first, until the client
// is closed. A message leaves the queue when the server accepts it or
// refuses it for good; transient failures are retried with backoff (the
// server's retry-after hints honoured), and at once when a connection
// comes up.
func (c *Client) outboxLoop() {
	defer c.outboxDone.Done()
	attempt, stale, staleGroup := 0, 0, 0
	for {
		it, ok := c.outbox.queue.first()
		if !ok {
			select {
			case <-c.outbox.queue.wake:
				continue
			case <-c.ctx.Done():
				return
			}
		}
		if it.barrier != nil {
			c.outbox.queue.dropFirst()
			close(it.barrier)
			continue
		}
		sent, err := c.attempt(c.ctx, it)
		if err != nil && c.isClosed() {
			return
		}
		var re *RefusedError
		refused := errors.As(err, &re)
		var se *SealError
		sealErr := errors.As(err, &se)
		if sealErr {
			refused = false // a refusal of the Cipher's key fetch, not of the send
		}
		switch {
		case err == nil:
			c.finish(it, sent, nil)
			attempt, stale, staleGroup = 0, 0, 0
			continue
		case sealErr && se.Temporary():
			var sre *RefusedError
			if errors.As(se.Err, &sre) {
				re, refused = sre, true // for its retry-after hint
			}
		case sealErr:
			c.log.Info("outbox: message cannot be sealed", "msg", it.msg.ClientMsgID, "to", it.msg.peer(), "err", err)
			c.finish(it, Sent{}, err)
			attempt, stale, staleGroup = 0, 0, 0
			continue
		case refused && re.Code == CodeStaleGroup:
			// The membership changed: refresh it (new members get the
			// sender key in the next seal; removals replace it).
			ctx, cancel := context.WithTimeout(c.ctx, attemptTimeout)
			_, rerr := c.RefreshGroup(ctx, it.msg.Group)
			cancel()
			if errors.Is(rerr, ErrNotMember) {
				c.finish(it, Sent{}, rerr)
				attempt, stale, staleGroup = 0, 0, 0
				continue
			}
			if staleGroup++; rerr == nil && staleGroup <= maxStaleGroupRetries {
				c.log.Debug("outbox: the group changed; retrying", "msg", it.msg.ClientMsgID, "group", it.msg.Group)
				continue
			}
		case refused && re.Code == CodeStaleDevices:
			c.learnDevices(re, it.msg.To)
			if stale++; stale <= maxStaleRetries {
				c.log.Debug("outbox: device lists were stale; retrying", "msg", it.msg.ClientMsgID)
				continue
			}
		case refused && !re.Temporary():
			c.log.Info("outbox: message refused", "msg", it.msg.ClientMsgID, "to", it.msg.peer(), "err", err)
			c.finish(it, Sent{}, err)
			attempt, stale, staleGroup = 0, 0, 0
			continue
		}
		var hint time.Duration
		if refused {
			hint = re.RetryAfter
		}
		d := c.backoff.delay(attempt, hint)
		attempt++
		c.log.Debug("outbox: send failed; retrying", "msg", it.msg.ClientMsgID, "in", d, "err", err)
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-c.outbox.retry:
		case <-c.ctx.Done():
			t.Stop()
			return
		}
		t.Stop()
	}
}

// attempt makes one try at sending it: address the current devices, seal
// for each, send over the connection if there is one, else over HTTP.
func (c *Client) attempt(ctx context.Context, it *outItem) (Sent, error) {
	ctx, cancel := context.WithTimeout(ctx, attemptTimeout)
	defer cancel()
	if it.msg.ToGroup() {
		return c.attemptGroup(ctx, it)
	}
	_, sent, err := c.attemptPairwise(ctx, it.msg, &it.first)
	return sent, err
}

// attemptPairwise sends a message to a user, sealed for each of the
// devices it goes to, which it returns. first is the message's firstTry.
func (c *Client) attemptPairwise(ctx context.Context, m OutboxMessage, first *firstTry) ([]Device, Sent, error) {
	targets, err := c.addressees(ctx, m.To)
	if err != nil {
		return nil, Sent{}, err
	}
	sent, err := c.sealAndSend(ctx, m, targets, first)
	return targets, sent, err
}

func (c *Client) sealAndSend(ctx context.Context, m OutboxMessage, targets []Device, first *firstTry) (Sent, error) {
	payloads := make([]devicePayload, len(targets))
	if c.cfg.Cipher != nil {
		sealed, err := c.cfg.Cipher.Seal(ctx, m, targets)
		if err != nil {
			var se *SealError
			if errors.As(err, &se) {
				return Sent{}, err
			}
			return Sent{}, &SealError{Device: Device{User: m.To}, Err: err}
		}
		if len(sealed) != len(targets) {
			return Sent{}, &SealError{Device: Device{User: m.To},
				Err: fmt.Errorf("cipher sealed %d payloads for %d devices", len(sealed), len(targets))}
		}
		for i, d := range targets {
			payloads[i] = devicePayload{to: d, data: sealed[i]}
		}
	} else {
		for i, d := range targets {
			data, err := c.cfg.Seal(ctx, d, m.Body)
			if err != nil {
				return Sent{}, &SealError{Device: d, Err: err}
			}
			payloads[i] = devicePayload{to: d, data: data}
		}
	}
	if s := c.session(); s != nil {
		sent, err := s.send(ctx, m.ClientMsgID, m.To, payloads, first)
		if !errors.Is(err, errDisconnected) {
			return sent, err
		}
		// The connection went away mid-send: HTTP now, same client id.
	}
	// The HTTP API has no first_attempt, but this is a transmission.
	first.take()
	return c.api.send(ctx, m.ClientMsgID, m.To, payloads)
}

// addressees lists the devices a message to user to goes to: every device
// of to, and every other device of this user.
func (c *Client) addressees(ctx context.Context, to string) ([]Device, error) {
	toDevs, err := c.devicesOf(ctx, to)
	var re *RefusedError
	if errors.As(err, &re) && re.Code == CodeUnknownUser {
		return nil, &RefusedError{Code: CodeUnknownRecipient, Message: re.Message, Status: re.Status}
	}
	if err != nil {
		return nil, err
	}
	var out []Device
	for _, id := range toDevs {
		if d := (Device{User: to, ID: id}); d != c.self {
			out = append(out, d)
		}
	}
	if to == c.self.User {
		return out, nil
	}
	mine, err := c.devicesOf(ctx, c.self.User)
	if err != nil {
		return nil, err
	}
	for _, id := range mine {
		if id != c.self.ID {
			out = append(out, Device{User: c.self.User, ID: id})
		}
	}
	return out, nil
}

// devicesOf returns user's device ids from the cache, or from the server.
func (c *Client) devicesOf(ctx context.Context, user string) ([]uint32, error) {
	if ids, ok := c.cachedDevices(user); ok {
		return ids, nil
	}
	devs, err := c.api.devices(ctx, user)
	if err != nil {
		return nil, err
	}
	ids := make([]uint32, len(devs))
	for i, d := range devs {
		ids[i] = d.ID
	}
	c.setDevices(user, ids)
	return ids, nil
}

// learnDevices takes the current device lists from a stale_devices
// refusal; without them, it forgets the cached lists involved.
func (c *Client) learnDevices(re *RefusedError, to string) {
	if len(re.Devices) == 0 {
		c.mu.Lock()
		delete(c.devices, to)
		delete(c.devices, c.self.User)
		c.mu.Unlock()
		return
	}
	for user, ids := range re.Devices {
		c.setDevices(user, ids)
	}
}

// finish takes the head of the outbox out: accepted (err nil) or refused
// for good.
func (c *Client) finish(it *outItem, sent Sent, err error) {
	c.outbox.queue.dropFirst()
	if rerr := c.store.Remove(it.msg.ClientMsgID); rerr != nil {
		c.log.Error("outbox: remove from the store", "msg", it.msg.ClientMsgID, "err", rerr)
	}
	if it.msg.hidden() {
		if err != nil {
			c.log.Warn("outbox: control message or resend not sent", "msg", it.msg.ClientMsgID, "to", it.msg.peer(), "err", err)
		}
	} else if err == nil {
		if c.tracker.Advance(sent.MessageRef, StatusSent) {
			c.events.push(dispatchItem{accepted: &ReceiptEvent{
				Message: sent.MessageRef, To: it.msg.peer(), Group: it.msg.Group, Status: StatusSent, Time: sent.Time}})
		}
	} else {
		sent = Sent{MessageRef: MessageRef{ClientMsgID: it.msg.ClientMsgID}}
		c.tracker.Forget(it.msg.ClientMsgID)
		c.emit(&SendFailedEvent{Message: MessageRef{ClientMsgID: it.msg.ClientMsgID}, To: it.msg.peer(), Group: it.msg.Group, Err: err})
	}
	if it.done != nil {
		it.done <- sendResult{sent: sent, err: err}
	}
}

// retryOutbox makes the outbox retry at once (a connection came up).
func (c *Client) retryOutbox() {
	select {
	case c.outbox.retry <- struct{}{}:
	default:
	}
}

// Flush waits until every message put in the outbox before the call has
// left it (accepted by the server, or failed), or ctx ends. A command
// that queued messages (CreateGroup sends the group's name through the
// outbox) calls it before it exits.
func (c *Client) Flush(ctx context.Context) error {
	if c.isClosed() {
		return ErrClosed
	}
	it := &outItem{barrier: make(chan struct{})}
	c.outbox.queue.push(it)
	select {
	case <-it.barrier:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("courier: the outbox is not empty yet (what it holds stays in it): %w", ctx.Err())
	case <-c.ctx.Done():
		return ErrClosed
	}
}
