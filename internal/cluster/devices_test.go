package cluster_test

import (
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/courier-im/courier/internal/cluster"
)

// cacheLog records what a DeviceBus does to its cache.
type cacheLog struct {
	mu     sync.Mutex
	events []string
}

func (c *cacheLog) Invalidate(user string) { c.add("invalidate " + user) }
func (c *cacheLog) Flush()                 { c.add("flush") }

func (c *cacheLog) add(e string) {
	c.mu.Lock()
	c.events = append(c.events, e)
	c.mu.Unlock()
}

func (c *cacheLog) snapshot() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.events)
}

func (c *cacheLog) has(e string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Contains(c.events, e)
}

func (c *cacheLog) count(e string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, x := range c.events {
		if x == e {
			n++
		}
	}
	return n
}

func deviceBus(t *testing.T, url, node, subject string, c cluster.DeviceCache) *cluster.DeviceBus {
	t.Helper()
	b, err := cluster.NewDeviceBus(cluster.DeviceBusConfig{Conn: connect(t, url), Node: node, Subject: subject})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Start(c); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := b.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return b
}

// A change announced by one node invalidates the user on the others, not
// on itself (it invalidated its own cache already); a node flushes its
// cache when it starts listening and when its connection comes back.
func TestDeviceBus(t *testing.T) {
	t.Parallel()
	n := startNATS(t)
	subject := "test.devices." + randHex(6)
	var ca, cb cacheLog
	a := deviceBus(t, n.URL(), "a", subject, &ca)
	deviceBus(t, n.URL(), "b", subject, &cb)
	if !ca.has("flush") || !cb.has("flush") {
		t.Fatalf("no flush at start: %v / %v", ca.snapshot(), cb.snapshot())
	}
	a.Changed("alice")
	eventually(t, 10*time.Second, func() error {
		if !cb.has("invalidate alice") {
			return fmt.Errorf("b heard nothing: %v", cb.snapshot())
		}
		return nil
	})

	// Malformed announcements are ignored.
	nc := connect(t, n.URL())
	for _, bad := range []string{"", "d", "d a", "x a alice", "d a.b alice", "d a al ice", "d a " + strings.Repeat("u", 200)} {
		if err := nc.Publish(subject, []byte(bad)); err != nil {
			t.Fatal(err)
		}
	}
	nc.Publish(subject, []byte("d c carol"))
	eventually(t, 10*time.Second, func() error {
		if !cb.has("invalidate carol") {
			return fmt.Errorf("b heard nothing of carol: %v", cb.snapshot())
		}
		return nil
	})
	if got := len(cb.snapshot()); got != 3 { // flush, alice, carol
		t.Fatalf("b's cache saw %v", cb.snapshot())
	}
	// carol was published after the server had a's alice, so a has had
	// its own announcement back by the time it hears carol: it ignored it.
	eventually(t, 10*time.Second, func() error {
		if !ca.has("invalidate carol") {
			return fmt.Errorf("a heard nothing of carol: %v", ca.snapshot())
		}
		return nil
	})
	if ca.has("invalidate alice") {
		t.Fatalf("a applied its own announcement: %v", ca.snapshot())
	}

	// The server goes away and comes back: both flush.
	flushes := cb.count("flush")
	n.Stop()
	n.Start(t)
	eventually(t, 30*time.Second, func() error {
		if cb.count("flush") < flushes+2 { // reconnecting, then connected
			return fmt.Errorf("b's flushes: %d, want %d", cb.count("flush"), flushes+2)
		}
		return nil
	})
	// And the subscription is back.
	eventually(t, 30*time.Second, func() error {
		a.Changed("dave")
		if !cb.has("invalidate dave") {
			return fmt.Errorf("b heard nothing after the reconnection")
		}
		return nil
	})
}

func TestDeviceBusConfigErrors(t *testing.T) {
	n := startNATS(t)
	nc := connect(t, n.URL())
	for _, cfg := range []cluster.DeviceBusConfig{
		{Node: "a"},
		{Conn: nc, Node: "a.b"},
		{Conn: nc, Node: "a", Subject: "devices.*"},
		{Conn: nc, Node: "a", Subject: "devices. x"},
		{Conn: nc, Node: "a", Subject: "devices."},
	} {
		if _, err := cluster.NewDeviceBus(cfg); err == nil {
			t.Errorf("NewDeviceBus(%+v) succeeded", cfg)
		}
	}
	b, err := cluster.NewDeviceBus(cluster.DeviceBusConfig{Conn: nc, Node: "a"})
	if err != nil {
		t.Fatal(err)
	}
	if b.Subject() != cluster.DefaultDevicesSubject {
		t.Fatalf("default subject %q", b.Subject())
	}
	if err := b.Start(nil); err == nil {
		t.Fatal("Start without a cache succeeded")
	}
	if err := b.Start(&cacheLog{}); err != nil {
		t.Fatal(err)
	}
	if err := b.Start(&cacheLog{}); err == nil {
		t.Fatal("a second Start succeeded")
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
}
