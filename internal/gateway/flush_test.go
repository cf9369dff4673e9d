package gateway

import (
	"fmt"
	"runtime"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	pb "github.com/courier-im/courier/proto/courier/v1"
)

// TestFlushSoonWritesEveryQueuedFrame has writers add frames to one
// connection's batch without flushing it and queue it on its flusher,
// all at once, as pipelines and pumps do: every frame reaches the device,
// each writer's in the order it added them, and the connection leaves the
// queue. A frame added while the flusher is writing the batch must not be
// left waiting (the reads would then run into their deadline).
func TestFlushSoonWritesEveryQueuedFrame(t *testing.T) {
	g, url, authz := epollServer(t, 0)
	r := dialRaw(t, url, authz, nil)
	c := aliceConn(t, g)

	const writers, frames = 8, 500
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range frames {
				c.evWrite(fmt.Appendf(nil, "%d-%d", w, i), false)
				if i%3 == 0 || i == frames-1 {
					c.evFlushSoon()
				}
			}
		}()
	}
	next := make([]int, writers)
	for n := 0; n < writers*frames; {
		op, p, err := r.read()
		if err != nil {
			t.Fatalf("after %v frames: %v", next, err)
		}
		if isSynced(p) {
			continue // the pump's, for the empty mailbox
		}
		n++
		var w, i int
		if _, err := fmt.Sscanf(string(p), "%d-%d", &w, &i); op != opBinary || err != nil || w < 0 || w >= writers {
			t.Fatalf("frame %q (opcode %d)", p, op)
		}
		if i != next[w] {
			t.Fatalf("writer %d: frame %d, want %d", w, i, next[w])
		}
		next[w]++
	}
	wg.Wait()
	// Every writer has returned and every frame is read: the flusher took
	// the connection off its queue (it may still be on its way there for
	// a last, empty, batch).
	f := g.ep.flusherOf(c)
	for range 1000 {
		f.mu.Lock()
		n := len(f.queued)
		f.mu.Unlock()
		if n == 0 && !c.ev.has(evQueued) {
			return
		}
		runtime.Gosched()
	}
	t.Error("the connection is still queued on its flusher")
}

// TestFlushSoonClearsBeforeWriting checks the flusher takes a connection
// off its queue before it writes the batch, not after: a frame added in
// between (here, while the test holds the batch as a writer adding a
// frame does) queues the connection again, rather than finding it queued
// and being left in the batch with nobody to write it.
func TestFlushSoonClearsBeforeWriting(t *testing.T) {
	g, url, authz := epollServer(t, 0)
	r := dialRaw(t, url, authz, nil)
	c := aliceConn(t, g)

	b := c.lockBatch()
	c.evFlushSoon()
	cleared := false
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		if !c.ev.has(evQueued) {
			cleared = true
			break
		}
	}
	*b = append(appendFrameHeader(*b, 3), "one"...)
	c.unlockBatch(false)
	if !cleared {
		t.Fatal("the flusher did not take the connection off its queue while the batch was held")
	}
	c.evFlushSoon()
	c.evWrite([]byte("two"), false)
	c.evFlushSoon()
	for _, want := range []string{"one", "two"} {
		for {
			op, p, err := r.read()
			if err != nil {
				t.Fatalf("reading %q: %v", want, err)
			}
			if isSynced(p) {
				continue
			}
			if op != opBinary || string(p) != want {
				t.Fatalf("frame %q (opcode %d), want %q", p, op, want)
			}
			break
		}
	}
}

// aliceConn returns the connection of alice.1, once registered.
func aliceConn(t *testing.T, g *Gateway) *conn {
	t.Helper()
	for range 5000 {
		g.mu.Lock()
		c := g.users["alice"]
		g.mu.Unlock()
		if c != nil {
			if c.gr != nil {
				t.Fatal("alice's connection is not on the epoll transport")
			}
			return c
		}
		time.Sleep(time.Millisecond)
	}
	t.Fatal("alice's connection is not registered")
	return nil
}

// isSynced reports whether p is a ServerFrame carrying Synced.
func isSynced(p []byte) bool {
	var f pb.ServerFrame
	return proto.Unmarshal(p, &f) == nil && f.GetSynced() != nil
}
