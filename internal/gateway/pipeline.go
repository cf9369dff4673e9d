package gateway

import "sync"

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
		fn := p.queue[0]
		p.queue[0] = nil
		p.queue = p.queue[1:]
		p.mu.Unlock()
		fn()
		<-p.slots
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
