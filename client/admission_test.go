package client_test

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/courier-im/courier/client"
	"github.com/courier-im/courier/internal/server"
	"github.com/courier-im/courier/internal/servertest"
)

// A server at its connection watermark refuses with 503 overloaded and a
// retry-after; Run waits at least that long, retries, and connects once a
// place is free.
func TestReconnectAfterOverloaded(t *testing.T) {
	// Five connections at most, the watermark at 0.8: four fit.
	srv := servertest.Start(t, func(c *server.Config) { c.MaxConns = 5; c.AdmitWatermark = 0.8 })
	var first []*client.Client
	for i := range 4 {
		c, _, _ := online(t, register(t, srv, fmt.Sprintf("early%d", i)), fast)
		first = append(first, c)
	}
	late, rec := newClient(t, register(t, srv, "late"), fast)
	runClient(t, late)
	ev := waitEvent(t, rec, "an overloaded refusal", func(e *client.ConnectionEvent) bool {
		return e.State == client.Disconnected && e.Err != nil
	})
	var re *client.RefusedError
	if !errors.As(ev.Err, &re) || re.Code != client.CodeOverloaded || re.Status != 503 || re.RetryAfter < time.Second {
		t.Fatalf("refusal %v, want 503 overloaded with a retry-after of a second or more", ev.Err)
	}
	// Not sooner than asked, even with fast backoff.
	if ev.RetryIn < re.RetryAfter {
		t.Fatalf("retry in %v, sooner than the server's %v", ev.RetryIn, re.RetryAfter)
	}
	// A place frees up: the late client gets in on a retry.
	first[0].Close()
	waitEvent[*client.SyncedEvent](t, rec, "late synced", nil)
}
