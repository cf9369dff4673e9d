package gateway

import (
	"sync"
	"sync/atomic"
)

// pipeline runs the second half of a connection's Send and Ack frames: the
// reader orders each one in the mailbox (delivery.StartSend, StartAck) and
// hands the rest (waiting for the fsync, answering) to the pipeline, which
// runs those tails one after another in frame order. So a device may have
// several sends in flight, whose fsyncs are shared, while the order of its
// sends in every mailbox, and of the replies, is the order of its frames.
//
// The pipeline has a goroutine only while it has work, and allocates
// nothing until it must wait (its condition variable), so an idle
// connection pays nothing for it beyond the struct.
type pipeline struct {
	mu      sync.Mutex
	cond    *sync.Cond // made by the first wait; broadcast when a place frees, the queue drains, or the connection closes
	queue   []func()
	n       int32 // frames in the pipeline: acquired, and their tail not finished
	running bool
	closed  bool // the connection is closing: acquire gives up

	more atomic.Bool // the running tail has others after it in its run
}

// acquire takes a place in the pipeline for one frame, waiting while
// maxPipelined are in it; it gives up (false) once the connection is
// closing (close).
func (p *pipeline) acquire() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for !p.closed && p.n >= maxPipelined {
		p.waitLocked()
	}
	if p.closed {
		return false
	}
	p.n++
	return true
}

// close makes acquire give up, now and from now on.
func (p *pipeline) close() {
	p.mu.Lock()
	p.closed = true
	p.broadcastLocked()
	p.mu.Unlock()
}

// then queues the tail of a frame that acquired its place, and reports
// whether the caller must start run (no run is under way).
func (p *pipeline) then(fn func()) (start bool) {
	p.mu.Lock()
	p.queue = append(p.queue, fn)
	start = !p.running
	p.running = true
	p.mu.Unlock()
	return start
}

// then queues the tail of a frame that acquired its place in the
// connection's pipeline, starting the pipeline's goroutine if it has
// none.
func (c *conn) then(fn func()) {
	if c.pipe.then(fn) {
		c.g.spares.Go(c.runPipeline)
	}
}

// runPipeline runs the pipeline, which on the epoll transport hands the
// replies it held during a run to the connection's flusher at the end of
// the run (flush.go).
func (c *conn) runPipeline() {
	var flush func() bool
	if c.gr == nil {
		flush = c.evFlushSoon
	}
	c.pipe.run(flush)
}

// run finishes the queued tails in runs: each run takes every tail queued
// when it starts. While a tail has others after it in its run, more is
// set, and the epoll transport keeps that tail's reply in the connection's
// batch (evwrite.go): the replies of one run go out with one write, after
// its last tail answers. A run is at most maxPipelined tails whose storage
// work was ordered together, so a reply waits at most for the fsyncs of
// the frames ordered with it, and the run ends with flush, if set.
func (p *pipeline) run(flush func() bool) {
	for {
		p.mu.Lock()
		if len(p.queue) == 0 {
			p.running = false
			p.queue = nil
			p.broadcastLocked()
			p.mu.Unlock()
			return
		}
		batch := p.queue
		p.queue = nil
		p.mu.Unlock()
		for i, fn := range batch {
			p.more.Store(i < len(batch)-1)
			batch[i] = nil
			fn()
			p.mu.Lock()
			p.n--
			p.broadcastLocked()
			p.mu.Unlock()
		}
		if len(batch) > 1 && flush != nil {
			// The last tail may have had nothing to say (a frame with
			// id 0 asks for no reply).
			flush()
		}
	}
}

// wait returns once everything queued so far has run.
func (p *pipeline) wait() {
	p.mu.Lock()
	for p.running {
		p.waitLocked()
	}
	p.mu.Unlock()
}

// waitLocked waits for the next broadcast; p.mu must be held.
func (p *pipeline) waitLocked() {
	if p.cond == nil {
		p.cond = sync.NewCond(&p.mu)
	}
	p.cond.Wait()
}

// broadcastLocked wakes every waiter, if any ever waited; p.mu must be
// held.
func (p *pipeline) broadcastLocked() {
	if p.cond != nil {
		p.cond.Broadcast()
	}
}
