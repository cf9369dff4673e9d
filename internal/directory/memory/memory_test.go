package memory_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/courier-im/courier/internal/directory"
	"github.com/courier-im/courier/internal/directory/directorytest"
	"github.com/courier-im/courier/internal/directory/memory"
	"github.com/courier-im/courier/internal/ident"
)

func TestConformance(t *testing.T) {
	directorytest.Run(t, func(t *testing.T) directory.Directory {
		d := memory.New(memory.Options{SweepEvery: 20 * time.Millisecond})
		t.Cleanup(func() { d.Close() })
		return d
	})
}

type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

// With an injected clock, expiry and last seen are exact.
func TestFakeClock(t *testing.T) {
	clk := &fakeClock{now: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	d := memory.New(memory.Options{Now: clk.Now, SweepEvery: -1})
	defer d.Close()
	ctx := context.Background()
	ch, err := d.Watch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	a1 := ident.Device{User: "alice", ID: 1}
	start := clk.Now()
	if _, _, err := d.Register(ctx, directory.Session{Device: a1, Node: "n1", ID: "s1"}, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	clk.Advance(5 * time.Second)
	if lost, err := d.Refresh(ctx, "n1", []directory.DeviceSession{{Device: a1, Session: "s1"}}, 10*time.Second); err != nil || len(lost) != 0 {
		t.Fatalf("Refresh = %v, %v", lost, err)
	}
	clk.Advance(9 * time.Second) // 1s before expiry
	d.Sweep()
	if _, ok, _ := d.Lookup(ctx, a1); !ok {
		t.Fatal("registration expired early")
	}
	clk.Advance(time.Second)
	d.Sweep()
	if _, ok, _ := d.Lookup(ctx, a1); ok {
		t.Fatal("registration outlived its TTL")
	}
	want := start.Add(5 * time.Second) // the last refresh
	if p, _ := d.Presence(ctx, "alice"); p.Online || !p.LastSeen.Equal(want) {
		t.Fatalf("Presence = %+v, want offline, last seen %v", p, want)
	}
	if ev := <-ch; !ev.Online {
		t.Fatalf("first event %+v", ev)
	}
	if ev := <-ch; ev.Online || !ev.LastSeen.Equal(want) {
		t.Fatalf("second event %+v, want offline at %v", ev, want)
	}
}
