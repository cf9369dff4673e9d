package bench

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"
)

// backoff mirrors the SDK's reconnect policy (client/backoff.go): the
// delay before retry number attempt is uniform in [0, min·2^attempt]
// (capped at max), and a server's retry-after hint is honoured plus up to
// half of it again as jitter. The SDK's defaults are 250 ms and 30 s.
type backoff struct{ min, max time.Duration }

var sdkBackoff = backoff{min: 250 * time.Millisecond, max: 30 * time.Second}

func (b backoff) delay(attempt int, hint time.Duration) time.Duration {
	c := b.min
	for i := 0; i < attempt && c < b.max; i++ {
		c *= 2
	}
	c = min(c, b.max)
	d := time.Duration(rand.Int64N(int64(c) + 1))
	if hint > 0 {
		d = max(d, hint+time.Duration(rand.Int64N(int64(hint/2)+1)))
	}
	return d
}

// ---- storm ----

// runStorm connects N devices, gives each one message that it receives but
// does not ack (a phone that dies before acking), then drops every
// connection at once: with a child server by restarting it (SIGTERM, so it
// tells its clients to reconnect, then a fresh start on the same data and
// port: while it is down, reconnects are refused), with --server by
// closing all connections from the bench (also with a child server when
// StormClose is set). Every device reconnects with the
// SDK's jittered backoff, gets its message again, and acks it; the run
// ends when the server has confirmed every ack.
func runStorm(ctx context.Context, e *env) (*Result, error) {
	o := e.o
	sa, err := e.accounts(ctx, "s", 1)
	if err != nil {
		return nil, err
	}
	ra, err := e.accounts(ctx, "t", o.N)
	if err != nil {
		return nil, err
	}
	r := newRun(e.eng, e.t)
	r.confirmAcks = true
	devs := e.clients(r, ra, 0)
	snd := e.clients(r, sa, o.N)[0]
	s := &sender{stream: r.ledger.newStream(), targets: ra, size: o.Size}
	snd.snd = s
	for _, c := range devs {
		c.holdAcks.Store(true)
	}
	all := append(append([]*client(nil), devs...), snd)
	if failed, err := r.connectAll(ctx, all, o.DialConcurrency, 60*time.Second); failed > 0 {
		r.closeAll(all)
		return nil, fmt.Errorf("%d of %d connections failed: %v", failed, len(all), err)
	}
	hbCtx, stopHB := context.WithCancel(ctx)
	defer stopHB()
	go r.heartbeat(hbCtx, devs, o.Ping)

	e.logf("storm: %d devices connected; one unacked message each", o.N)
	var issued atomic.Int64
	fillDone := make(chan struct{})
	go func() {
		t := time.NewTicker(time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-fillDone:
				return
			case <-t.C:
				for s.inflight.Load() < 64 && issued.Load() < int64(o.N) {
					issued.Add(1)
					s.next(snd)
				}
			}
		}
	}()
	ok := waitFor(ctx, 5*time.Minute, func() bool {
		return r.ledger.accepted.Load() >= int64(o.N) && r.ledger.delivered.Load() >= int64(o.N)
	})
	close(fillDone)
	if !ok {
		r.closeAll(all)
		return nil, fmt.Errorf("storm set-up: %d accepted, %d delivered of %d", r.ledger.accepted.Load(), r.ledger.delivered.Load(), o.N)
	}

	// Reconnection machinery: a bounded pool of dialers fed by per-device
	// backoff timers.
	var (
		storming atomic.Bool
		attempts atomic.Int64
		queue    = make(chan *client, o.N)
		wg       sync.WaitGroup
	)
	schedule := func(c *client, hint time.Duration) {
		a := int(c.attempt.Add(1) - 1)
		time.AfterFunc(sdkBackoff.delay(a, hint), func() { queue <- c })
	}
	onClose := func(c *client, code int, err error) {
		if storming.Load() && c.snd == nil {
			schedule(c, time.Duration(c.hintMs.Swap(0))*time.Millisecond)
		}
	}
	r.onClose.Store(&onClose)
	dialCtx, stopDial := context.WithCancel(ctx)
	defer stopDial()
	for range o.DialConcurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-dialCtx.Done():
					return
				case c := <-queue:
					attempts.Add(1)
					if err := r.connect(c); err != nil {
						var hint time.Duration
						if de, ok := err.(*dialError); ok {
							r.count("refusal_"+de.kind, 1)
							hint = de.retryAfter
							if de.kind == "other" {
								r.noteErr(err)
							}
						} else {
							r.count("refusal_other", 1)
						}
						schedule(c, hint)
					}
				}
			}
		}()
	}
	defer wg.Wait()
	defer stopDial()

	var peak atomic.Int64
	sampleCtx, stopSample := context.WithCancel(ctx)
	if e.t.pid() == 0 { // a remote server: sample its RSS
		go func() {
			t := time.NewTicker(200 * time.Millisecond)
			defer t.Stop()
			for {
				select {
				case <-sampleCtx.Done():
					return
				case <-t.C:
					if st := e.t.sample(); int64(st.rss) > peak.Load() {
						peak.Store(int64(st.rss))
					}
				}
			}
		}()
	}
	defer stopSample()

	for _, c := range devs {
		c.holdAcks.Store(false)
	}
	storming.Store(true)
	s0 := e.t.sample()
	t0 := time.Now()
	restarted := e.t.pid() != 0 && !o.StormClose
	var restartTook time.Duration
	if restarted {
		e.logf("storm: restarting the server under %d connections", o.N)
		if err := e.t.restart(ctx); err != nil {
			r.closeAll(all)
			return nil, fmt.Errorf("restart server: %w", err)
		}
		restartTook = time.Since(t0)
		e.logf("storm: server back after %v", restartTook.Round(time.Millisecond))
	} else {
		e.logf("storm: dropping all %d connections", o.N)
		for _, c := range devs {
			c.close()
		}
	}
	// A device is back once it is up on a connection made after the drop.
	allBack := func() bool {
		for _, c := range devs {
			if !c.up.Load() || c.epochNow() < 2 {
				return false
			}
		}
		return true
	}
	var backAt time.Duration
	done := waitFor(ctx, o.Duration, func() bool {
		if backAt == 0 && allBack() {
			backAt = time.Since(t0)
		}
		return backAt != 0 && r.ledger.confirmed.Load() >= int64(o.N) && allBack()
	})
	elapsed := time.Since(t0)
	s1 := e.t.sample()
	stopSample()
	storming.Store(false)
	r.closeAll(all)

	res := &Result{Params: fmt.Sprintf("n=%d restart=%v", o.N, restarted)}
	messageFigures(res, r, true)
	res.P50Ms, res.P99Ms, res.P999Ms, res.MaxMs = nil, nil, nil, nil // send→deliver spans the drop: meaningless
	res.ConnsHeld = i64(int64(o.N))                                  // set below if not all came back
	if !done {
		r.count("not_all_back_and_drained", 1)
		res.ConnsHeld = nil
	}
	if backAt > 0 {
		res.BackMs = f64(float64(backAt) / float64(time.Millisecond))
	}
	if done {
		res.BackDrainedMs = f64(float64(elapsed) / float64(time.Millisecond))
	}
	res.Reconnects = i64(attempts.Load())
	if restarted {
		res.ServerRestartMs = f64(float64(restartTook) / float64(time.Millisecond))
	}
	if s1.peakRSS >= 0 {
		res.ServerPeakRSSBytes = f64(s1.peakRSS)
	} else if p := peak.Load(); p > 0 {
		res.ServerPeakRSSBytes = f64(float64(p))
	}
	if s1.rss >= 0 {
		res.ServerRSSBytes = f64(s1.rss)
	}
	if !restarted {
		res.ServerCPUSeconds, res.ServerCPUUsPerMsg = cpuPerMsg(s0, s1, 0)
	}
	if res.Counters == nil {
		res.Counters = map[string]int64{}
	}
	return res, nil
}
