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
// The pipeline has a goroutine only while it has work, so an idle
// connection pays nothing for it.
type pipeline struct {
	slots chan struct{} // one token per frame in the pipeline

	mu      sync.Mutex
	queue   []func()
	running bool
	idle    *sync.Cond // signalled when the queue drains; uses mu

	more  atomic.Bool // the running tail has others after it in its run
	flush func() bool // if set, writes the replies held during a run
}

// acquire takes a place in the pipeline for one frame, waiting while
// maxPipelined are in it; it gives up (false) when closed is closed.
func (p *pipeline) acquire(closed <-chan struct{}) bool {
	p.mu.Lock()
	if p.slots == nil {
		p.slots = make(chan struct{}, maxPipelined)
		p.idle = sync.NewCond(&p.mu)
	}
	slots := p.slots
	p.mu.Unlock()
	select {
	case slots <- struct{}{}:
		return true
	case <-closed:
		return false
	}
}

// then queues the tail of a frame that acquired its place.
func (p *pipeline) then(fn func()) {
	p.mu.Lock()
	p.queue = append(p.queue, fn)
	start := !p.running
	p.running = true
	p.mu.Unlock()
	if start {
		go p.run()
	}
}

// run finishes the queued tails in runs: each run takes every tail queued
// when it starts. While a tail has others after it in its run, more is
// set, and the epoll transport keeps that tail's reply in the connection's
// batch (evwrite.go): the replies of one run go out with one write when
// its last tail answers. A run is at most maxPipelined tails whose storage
// work was ordered together, so a reply waits at most for the fsyncs of
// the frames ordered with it, and the run ends with a flush.
func (p *pipeline) run() {
	for {
		p.mu.Lock()
		if len(p.queue) == 0 {
			p.running = false
			p.queue = nil
			p.idle.Broadcast()
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
			<-p.slots
		}
		if len(batch) > 1 && p.flush != nil {
			// The last tail may have had nothing to say (a frame with
			// id 0 asks for no reply).
			p.flush()
		}
	}
}

// wait returns once everything queued so far has run.
func (p *pipeline) wait() {
	p.mu.Lock()
	for p.running {
		p.idle.Wait()
	}
	p.mu.Unlock()
}
