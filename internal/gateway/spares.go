package gateway

import (
	"runtime"
	"sync/atomic"
)

// spares runs the connections' pipelines (pipeline.go) on goroutines that
// live on between runs. A pipeline's run goes deep (Pebble's commit and
// look-ups, through the ack's delete), and a goroutine made for each run
// grows its stack from the smallest size by copying it, two or three times
// at that depth: ≈ 8 % of the server's CPU at a fixed rate of sends, where
// nearly every send and ack starts a run of its own (docs/performance.md).
//
// Unlike workers, spares never makes a job wait: with no idle goroutine
// it starts one, since a pipeline's tail may wait for another's (a frame
// waiting for a place in its pipeline), and a bounded pool could fill with
// them. Only the idle ones are bounded: a goroutine that finds maxIdle
// others idle ends, so a burst leaves at most maxIdle behind, and the
// collector shrinks their stacks while they wait. They end when stop is
// closed; a job given after that runs on a goroutine of its own.
type spares struct {
	maxIdle int32
	idle    atomic.Int32 // idle goroutines not yet promised a job
	queue   chan func()  // unbuffered: a send is taken by an idle goroutine
	stop    <-chan struct{}
}

func newSpares(stop <-chan struct{}) *spares {
	return &spares{maxIdle: int32(64 * runtime.GOMAXPROCS(0)), queue: make(chan func()), stop: stop}
}

// Go runs f on an idle goroutine, or a new one.
func (s *spares) Go(f func()) {
	for {
		i := s.idle.Load()
		if i <= 0 {
			break
		}
		if s.idle.CompareAndSwap(i, i-1) {
			// The goroutine that counted itself idle is at, or on its
			// way to, its receive, unless stop ended it. At it, it takes
			// f without the select that watches stop too.
			select {
			case s.queue <- f:
				return
			default:
			}
			select {
			case s.queue <- f:
			case <-s.stop:
				go f()
			}
			return
		}
	}
	go s.run(f)
}

func (s *spares) run(f func()) {
	for {
		f()
		if s.idle.Add(1) > s.maxIdle {
			s.idle.Add(-1)
			return
		}
		select {
		case f = <-s.queue:
		case <-s.stop:
			return
		}
	}
}
