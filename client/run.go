package client

import (
	"context"
	"errors"
	"maps"
	"slices"
	"time"
)

// Run connects to the server and stays connected until ctx ends (then it
// returns nil), reconnecting with exponential backoff and full jitter, and
// never sooner than the server asks (retry_after_ms, Retry-After).
//
// On each connection the server streams every entry waiting in this
// device's mailbox, then live ones; Run hands them to Config.Handler in
// order and acknowledges them once handled. It reports connection changes
// as ConnectionEvent and catching up as SyncedEvent, re-subscribes to
// presence, and makes the outbox send over the connection.
//
// Run stops for good, returning an error, when the server refuses the
// credential (errors.Is(err, ErrUnauthorized)) or when another connection
// of this same device takes over (errors.Is(err, ErrSuperseded)): two
// copies of one device would otherwise take turns kicking each other out.
// After Close it returns ErrClosed. Only one Run may be active at a time.
func (c *Client) Run(ctx context.Context) error {
	c.mu.Lock()
	if c.running {
		c.mu.Unlock()
		return errors.New("courier: Run is already running")
	}
	c.running = true
	c.runs.Add(1)
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		c.running = false
		c.mu.Unlock()
		c.runs.Done()
	}()
	if c.isClosed() {
		return ErrClosed
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(c.ctx, cancel) // Close ends Run
	defer stop()

	attempt := 0
	for {
		c.emit(&ConnectionEvent{State: Connecting})
		s, err := c.dial(ctx)
		if err == nil {
			var synced bool
			synced, err = c.serve(ctx, s)
			if synced {
				attempt = 0
			}
		}
		if ctx.Err() != nil {
			c.emit(&ConnectionEvent{State: Disconnected})
			if c.isClosed() {
				return ErrClosed
			}
			return nil
		}
		if errors.Is(err, ErrUnauthorized) || errors.Is(err, ErrSuperseded) {
			c.log.Warn("connection closed for good", "err", err)
			c.emit(&ConnectionEvent{State: Disconnected, Err: err})
			return err
		}
		var hint time.Duration
		var re *RefusedError
		if errors.As(err, &re) {
			hint = re.RetryAfter
		}
		d := c.backoff.delay(attempt, hint)
		attempt++
		c.log.Info("disconnected; reconnecting", "in", d, "err", err)
		c.emit(&ConnectionEvent{State: Disconnected, Err: err, RetryIn: d})
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
		}
	}
}

// serve runs one connection until it ends, and reports whether it got as
// far as Synced (a healthy connection, after which backoff starts over).
func (c *Client) serve(ctx context.Context, s *session) (synced bool, err error) {
	c.mu.Lock()
	c.sess = s
	subs := slices.Sorted(maps.Keys(c.subs))
	c.mu.Unlock()
	c.emit(&ConnectionEvent{State: Connected})
	c.retryOutbox()

	stop := context.AfterFunc(ctx, func() {
		// Tell the server we are leaving; the read loop sees the close.
		s.ws.Close(1000, "")
	})
	defer stop()
	go s.pinger(c.cfg.PingInterval)
	if len(subs) > 0 {
		go c.resubscribe(s, subs)
	}
	readErr := s.readLoop()

	c.mu.Lock()
	if c.sess == s {
		c.sess = nil
	}
	c.mu.Unlock()
	err = s.end(readErr)
	return s.synced.Load(), err
}

// resubscribe makes the presence subscriptions again on a new connection.
// If some user no longer exists, the others are subscribed one by one and
// the missing ones forgotten.
func (c *Client) resubscribe(s *session, users []string) {
	ctx, cancel := context.WithTimeout(context.Background(), ackTimeout)
	defer cancel()
	err := s.subscribe(ctx, users)
	var re *RefusedError
	if err == nil || !errors.As(err, &re) || re.Code != CodeUnknownUser {
		if err != nil && !errors.Is(err, errDisconnected) {
			c.log.Warn("presence subscription failed", "err", err)
		}
		return
	}
	for _, u := range users {
		err := s.subscribe(ctx, []string{u})
		if errors.As(err, &re) && re.Code == CodeUnknownUser {
			c.log.Warn("presence: forgetting an unknown user", "user", u)
			c.mu.Lock()
			delete(c.subs, u)
			c.mu.Unlock()
		} else if err != nil {
			return
		}
	}
}
