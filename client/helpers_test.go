package client_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/courier-im/courier/client"
)

// waitTimeout bounds every wait for a condition in these tests: a wait
// that needs it has failed.
const waitTimeout = 20 * time.Second

// recorder collects a client's events for tests to wait on.
type recorder struct {
	mu      sync.Mutex
	events  []client.Event
	changed chan struct{} // closed and replaced on every event
	// onEvent, if set, runs in the handler before the event is recorded.
	onEvent func(client.Event)
}

func newRecorder() *recorder { return &recorder{changed: make(chan struct{})} }

func (r *recorder) handle(ev client.Event) {
	if r.onEvent != nil {
		r.onEvent(ev)
	}
	r.mu.Lock()
	r.events = append(r.events, ev)
	close(r.changed)
	r.changed = make(chan struct{})
	r.mu.Unlock()
}

// snapshot returns the events so far.
func (r *recorder) snapshot() []client.Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]client.Event(nil), r.events...)
}

// wait waits until cond holds for the events so far, and fails the test
// if it does not within waitTimeout.
func (r *recorder) wait(t testing.TB, what string, cond func([]client.Event) bool) []client.Event {
	t.Helper()
	deadline := time.NewTimer(waitTimeout)
	defer deadline.Stop()
	for {
		r.mu.Lock()
		evs := append([]client.Event(nil), r.events...)
		ch := r.changed
		r.mu.Unlock()
		if cond(evs) {
			return evs
		}
		select {
		case <-ch:
		case <-deadline.C:
			t.Fatalf("timed out waiting for %s; events: %s", what, describe(evs))
		}
	}
}

// waitEvent waits for an event of type T that matches.
func waitEvent[T client.Event](t testing.TB, r *recorder, what string, match func(T) bool) T {
	t.Helper()
	var found T
	r.wait(t, what, func(evs []client.Event) bool {
		for _, ev := range evs {
			if e, ok := ev.(T); ok && (match == nil || match(e)) {
				found = e
				return true
			}
		}
		return false
	})
	return found
}

// count returns how many recorded events of type T match.
func count[T client.Event](r *recorder, match func(T) bool) int {
	n := 0
	for _, ev := range r.snapshot() {
		if e, ok := ev.(T); ok && (match == nil || match(e)) {
			n++
		}
	}
	return n
}

func describe(evs []client.Event) string {
	s := ""
	for _, ev := range evs {
		switch e := ev.(type) {
		case *client.MessageEvent:
			s += fmt.Sprintf("\n  message %s from %s.%d: %q", e.ServerID, e.From, e.FromDevice, e.Body)
		case *client.ReceiptEvent:
			s += fmt.Sprintf("\n  receipt %s/%s %v by %s", e.Message.ServerID, e.Message.ClientMsgID, e.Status, e.By)
		case *client.ConnectionEvent:
			s += fmt.Sprintf("\n  connection %v err=%v retry=%v", e.State, e.Err, e.RetryIn)
		default:
			s += fmt.Sprintf("\n  %T %+v", ev, ev)
		}
	}
	return s
}

// runClient starts c.Run in the background; the test's cleanup closes c
// and reports Run's result through the returned channel.
func runClient(t testing.TB, c *client.Client) <-chan error {
	t.Helper()
	done := make(chan error, 1)
	ctx, cancel := context.WithCancel(context.Background())
	go func() { done <- c.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		c.Close()
	})
	return done
}
