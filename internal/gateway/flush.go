package gateway

import (
	"sync"
	"unsafe"
)

// Writes behind the work that makes them.
//
// A loopback or LAN write(2) is the dearest system call the gateway makes:
// the kernel carries the segment through TCP, into the reader's socket,
// and wakes the reader, all within the call (on this project's VM ≈ 10
// µs a write, four times a read). So the fewer writes per message, the
// better, and a write should carry every frame the connection has ready.
//
// The frames of a message come from different places: the Accepted from
// the sender's pipeline, the Deliver from the recipient's pump, the
// receipt from the sender's pump, each at its own time. Written where
// they are made, each is a write of its own. Instead, the pipelines and
// pumps leave them in the connection's batch and queue the connection on
// a flusher, a goroutine that writes the batches of the connections on
// its queue, one write each. While it writes one connection's, the others
// go on filling theirs: under load a write carries several frames (the
// Accepted of one send and the receipt of another, a Deliver and the
// next), and when the server is idle a frame waits only for the flusher
// to be woken. Frames keep their order: a batch is written whole, under
// its lock, whoever writes it.
//
// Close frames, pings and pongs, and the frames the writer asks to flush
// at once (evWrite with flush set) are still written where they are made.

// flusher is one flusher goroutine's queue.
type flusher struct {
	mu     sync.Mutex
	queued []*conn   // connections whose batch waits for this flusher
	spare  []*conn   // the list being written, reused for the next
	wake   chan bool // has a value while queued is not empty and the flusher may be asleep
}

func newFlusher() *flusher { return &flusher{wake: make(chan bool, 1)} }

// flusherOf returns the flusher of c: the same one for the connection's
// whole life (its address picks it: a conn never moves).
func (e *epoll) flusherOf(c *conn) *flusher {
	return e.flushers[(uintptr(unsafe.Pointer(c))>>8)%uintptr(len(e.flushers))]
}

// evFlushSoon has c's batch written by its flusher, soon, rather than now.
// It always reports true: a failed write closes the connection, in the
// flusher.
func (c *conn) evFlushSoon() bool {
	if c.ev.set(evQueued) {
		return true // queued already, and not yet taken off the queue
	}
	f := c.g.ep.flusherOf(c)
	f.mu.Lock()
	f.queued = append(f.queued, c)
	first := len(f.queued) == 1
	f.mu.Unlock()
	if first {
		select {
		case f.wake <- true:
		default:
		}
	}
	return true
}

// flush writes the batches of the connections queued on f until none
// waits, then waits for more, until the transport stops.
func (e *epoll) flush(f *flusher) {
	defer e.wg.Done()
	for {
		for f.writeQueued() {
		}
		select {
		case <-f.wake:
		case <-e.stop:
			for f.writeQueued() {
			}
			return
		}
	}
}

// writeQueued takes the connections queued so far off the queue and
// writes their batches. It reports false if none was queued.
func (f *flusher) writeQueued() bool {
	f.mu.Lock()
	list := f.queued
	if len(list) == 0 {
		f.mu.Unlock()
		return false
	}
	f.queued = f.spare[:0]
	f.mu.Unlock()
	for i, c := range list {
		// Cleared before the write: a frame added after it is queued
		// again (and, if this write carries it too, finds its batch
		// empty the next time).
		c.ev.clear(evQueued)
		c.evFlush()
		list[i] = nil
	}
	f.spare = list[:0]
	return true
}
