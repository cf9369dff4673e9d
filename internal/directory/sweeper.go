package directory

import (
	"sync"
	"time"
)

// DefaultSweepEvery is how often a backend sweeps expired registrations
// when its options leave the interval zero.
const DefaultSweepEvery = time.Second

// Sweeper calls a backend's sweep periodically until Close. Backends use it
// so that a dead node's registrations expire (and their offline events go
// out) even when no call touches those users.
type Sweeper struct {
	stop chan struct{}
	done chan struct{}
	once sync.Once
}

// StartSweeper calls sweep every interval (zero: DefaultSweepEvery;
// negative: never — the caller sweeps by hand).
func StartSweeper(every time.Duration, sweep func()) *Sweeper {
	s := &Sweeper{stop: make(chan struct{}), done: make(chan struct{})}
	if every == 0 {
		every = DefaultSweepEvery
	}
	if every < 0 {
		close(s.done)
		return s
	}
	go func() {
		defer close(s.done)
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-s.stop:
				return
			case <-t.C:
				sweep()
			}
		}
	}()
	return s
}

// Close stops the sweeps and waits for one in progress to end. It is safe
// to call more than once.
func (s *Sweeper) Close() {
	s.once.Do(func() { close(s.stop) })
	<-s.done
}
