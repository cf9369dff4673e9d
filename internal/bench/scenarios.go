package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/gateway"
)

// Options configure a bench run. Zero values take the defaults noted.
type Options struct {
	// Server is the base URL of the server under test; empty starts a
	// child `courier serve` (ServerCmd) on embedded defaults in a
	// temporary directory.
	Server string
	// ServerCmd runs the courier binary (e.g. [os.Executable()]); "serve"
	// and its flags are appended.
	ServerCmd []string
	// Transport is the child server's gateway transport ("goroutine" or
	// "epoll"), passed as `serve --transport`; empty leaves the child's
	// own default (its flag, or $COURIER_TRANSPORT). Only for a child
	// server.
	Transport string
	// ServerProcs, if positive, is the child server's GOMAXPROCS (set in
	// its environment): how many cores its Go code may use at once.
	// Zero leaves the runtime's default (every core, or $GOMAXPROCS).
	// Only for a child server.
	ServerProcs int
	// Pollers is how many event loops (loop.go) the bench's own
	// connections use; 0 means one per core. Not for conns' worker
	// processes, which keep one per core.
	Pollers int
	// WorkerCmd runs the courier binary for conns worker processes;
	// "bench conns-worker" is appended. WorkerEnv is added to their
	// environment.
	WorkerCmd []string
	WorkerEnv []string

	Duration time.Duration // measured phase (default 10 s; storm: the longest wait for all back, default 60 s)
	N        int           // conns, storm: connections (default 1000 / 1000)
	Pairs    int           // pairs: sender/receiver pairs (default 100)
	Inflight int           // pairs: sends in flight per sender, closed loop (default 1)
	Size     int           // payload bytes, at least 16 (default 64)
	Rate     float64       // pairs: fixed total send rate per second instead of a closed loop (0: closed loop)
	K        int           // fanout: receivers (default 1024)
	// Via is how fanout reaches its K devices: "group" (default), one
	// group send per round to a group of the sender and K users, or
	// "direct", K 1:1 sends per round.
	Via     string
	Pending int           // drain: pending messages (default 10000)
	Ping    time.Duration // heartbeat interval (default 30 s)
	// PerProcess is how many connections one bench process holds before
	// conns spreads over worker processes (default 18,500: the hard limit
	// here is 20,000 open files per process).
	PerProcess int
	// StormClose makes storm drop the connections from the bench's side
	// even when it started the server (default: restart the server).
	StormClose bool
	// DialConcurrency bounds concurrent handshakes (default 64).
	DialConcurrency int
	// Dir is the directory disk measures in (default: the temporary
	// directory, where a child server keeps its data).
	Dir string
	// Log receives progress lines (nil: discarded).
	Log io.Writer
}

func (o *Options) defaults(scenario string) {
	if o.Duration <= 0 {
		o.Duration = 10 * time.Second
		if scenario == "storm" {
			o.Duration = 60 * time.Second
		}
	}
	if o.N <= 0 {
		o.N = 1000
	}
	if o.Pairs <= 0 {
		o.Pairs = 100
	}
	if o.Inflight <= 0 {
		o.Inflight = 1
	}
	if o.Size <= 0 {
		o.Size = 64
	}
	if o.K <= 0 {
		o.K = 1024
	}
	if o.Via == "" {
		o.Via = ViaGroup
	}
	if o.Pending <= 0 {
		o.Pending = 10000
	}
	if o.Ping <= 0 {
		o.Ping = 30 * time.Second
	}
	if o.PerProcess <= 0 {
		o.PerProcess = 18500
	}
	if o.DialConcurrency <= 0 {
		o.DialConcurrency = 64
	}
	if o.Log == nil {
		o.Log = io.Discard
	}
}

// The ways fanout reaches its devices (Options.Via).
const (
	ViaGroup  = "group"
	ViaDirect = "direct"
)

// Scenarios lists the scenarios Run knows, in the order the help shows.
var Scenarios = []string{"conns", "pairs", "fanout", "drain", "storm", "disk"}

// Run runs one scenario and returns its result. An error means the run
// could not be made (server did not start, accounts could not be
// created); a run that lost or duplicated messages returns a Result whose
// OK method says so.
func Run(ctx context.Context, scenario string, o Options) (*Result, error) {
	o.defaults(scenario)
	if o.Size < payloadHeader {
		return nil, fmt.Errorf("--size %d: at least %d bytes (message id and send time)", o.Size, payloadHeader)
	}
	if scenario == "disk" { // the machine, not a server
		if o.Server != "" {
			return nil, errors.New("--server: disk measures the disk of the machine it runs on and talks to no server")
		}
		res, err := runDisk(ctx, o)
		if res != nil {
			res.Scenario = scenario
		}
		return res, err
	}
	fn := map[string]func(context.Context, *env) (*Result, error){
		"conns": runConns, "pairs": runPairs, "fanout": runFanout, "drain": runDrain, "storm": runStorm,
	}[scenario]
	if fn == nil {
		return nil, fmt.Errorf("unknown scenario %q (want one of %s)", scenario, strings.Join(Scenarios, ", "))
	}
	if o.Via != ViaGroup && o.Via != ViaDirect {
		return nil, fmt.Errorf("--via %q: want %s or %s", o.Via, ViaGroup, ViaDirect)
	}
	if o.Pollers < 0 {
		return nil, fmt.Errorf("--pollers %d: want a positive number of event loops, or 0 for one per core", o.Pollers)
	}
	if o.ServerProcs < 0 {
		return nil, fmt.Errorf("--server-procs %d: want a positive number of cores, or 0 for the runtime's default", o.ServerProcs)
	}
	raiseFileLimit()
	var t *target
	var err error
	switch o.Transport {
	case "", gateway.TransportGoroutine, gateway.TransportEpoll:
	default:
		return nil, fmt.Errorf("--transport %q: want %s or %s", o.Transport, gateway.TransportGoroutine, gateway.TransportEpoll)
	}
	if o.Server != "" {
		if o.Transport != "" {
			return nil, errors.New("--transport applies to the child server only; a server given with --server keeps its own")
		}
		if o.ServerProcs != 0 {
			return nil, errors.New("--server-procs applies to the child server only; a server given with --server keeps its own GOMAXPROCS")
		}
		t, err = remoteTarget(o.Server)
	} else {
		if len(o.ServerCmd) == 0 {
			return nil, errors.New("no --server and no command to start one")
		}
		var extra []string
		if scenario == "conns" || scenario == "storm" {
			// These two measure holding and reconnecting up to the
			// process's whole connection capacity (19,000 of the 19,900
			// a 20,000-file limit leaves), so the bench's own server admits
			// up to that capacity: at the default watermark (0.8) it
			// would refuse everything past 15,920, which is admission
			// working, not what these scenarios measure. A server given
			// with --server keeps its own settings.
			extra = append(extra, "--admit-watermark", "1")
		}
		if scenario == "fanout" && o.Via == ViaGroup {
			// The group is the sender and K receivers.
			extra = append(extra, "--max-group-members", strconv.Itoa(max(o.K+1, accounts.DefaultMaxGroupMembers)))
		}
		t, err = startChild(ctx, o.ServerCmd, childConfig{transport: o.Transport, procs: o.ServerProcs}, extra...)
	}
	if err != nil {
		return nil, err
	}
	defer t.close()
	eng, err := newEngine(o.Pollers)
	if err != nil {
		return nil, err
	}
	defer eng.stop()
	e := &env{o: o, t: t, eng: eng, reg: newRegistrar(t.base)}
	e.logf("server: %s", t.describe())
	cpu0 := selfCPU()
	res, err := fn(ctx, e)
	if res != nil {
		res.Scenario = scenario
		res.Server = t.describe()
		if v, ok := t.metrics()["go_sched_gomaxprocs_threads"]; ok {
			res.ServerProcs = i64(int64(v))
		}
		if res.BenchCPUSeconds == nil && cpu0 >= 0 {
			res.BenchCPUSeconds = f64(selfCPU() - cpu0) // the bench process's own CPU, for comparison
		}
		res.BenchPollers = i64(int64(len(eng.loops)))
	}
	return res, err
}

// env is what a scenario works with.
type env struct {
	o   Options
	t   *target
	eng *wsEngine
	reg *registrar
}

func (e *env) logf(format string, args ...any) {
	fmt.Fprintf(e.o.Log, "bench: "+format+"\n", args...)
}

// clients makes one client per account; source addresses are numbered
// from offset.
func (e *env) clients(r *run, accts []*account, offset int) []*client {
	out := make([]*client, len(accts))
	for i, a := range accts {
		out[i] = &client{r: r, acct: a, src: r.sourceIP(offset + i)}
	}
	return out
}

func (e *env) accounts(ctx context.Context, role string, n int) ([]*account, error) {
	start := time.Now()
	a, err := e.reg.create(ctx, role, n, 32)
	if err == nil {
		e.logf("created %d accounts (%s) in %v", n, role, time.Since(start).Round(time.Millisecond))
	}
	return a, err
}

// messageFigures fills the message-related fields shared by scenarios.
func messageFigures(res *Result, r *run, confirm bool) {
	l := &r.ledger
	res.Sent = i64(l.sent.Load())
	res.Accepted = i64(l.accepted.Load())
	res.Delivered = i64(l.delivered.Load())
	res.Lost = i64(l.lost(confirm))
	res.Duplicates = i64(l.duplicates.Load())
	res.Unexpected = i64(l.unexpected.Load())
	if v := l.redelivered.Load(); v > 0 {
		res.Redelivered = i64(v)
	}
	res.ReceiptsSeen = i64(r.receipts.Load())
	res.P50Ms = r.lat.quantileMs(50)
	res.P99Ms = r.lat.quantileMs(99)
	res.P999Ms = r.lat.quantileMs(99.9)
	res.MaxMs = r.lat.maxMs()
	if c := r.snapshotCounters(); len(c) > 0 {
		res.Counters = c
	}
	r.mu.Lock()
	res.FirstError = r.firstErr
	r.mu.Unlock()
}

func cpuPerMsg(s0, s1 stats, msgs int64) (*float64, *float64) {
	if s0.cpu < 0 || s1.cpu < 0 {
		return nil, nil
	}
	cpu := s1.cpu - s0.cpu
	if msgs == 0 {
		return f64(cpu), nil
	}
	return f64(cpu), f64(cpu * 1e6 / float64(msgs))
}

// walFigures adds what the server's mailbox WAL fsyncs did between two
// samples: how many, their mean time, and how many took over ~100 ms (a
// stall of the disk, which every message accepted meanwhile waits out).
func walFigures(res *Result, s0, s1 stats) {
	if s0.walSyncs < 0 || s1.walSyncs < 0 {
		return
	}
	n := s1.walSyncs - s0.walSyncs
	res.ServerWALFsyncs = i64(int64(n))
	if n > 0 && s0.walSeconds >= 0 && s1.walSeconds >= 0 {
		res.ServerWALFsyncMeanMs = f64((s1.walSeconds - s0.walSeconds) * 1000 / n)
	}
	if s0.walSlow >= 0 && s1.walSlow >= 0 {
		res.ServerWALFsyncsSlow = i64(int64(s1.walSlow - s0.walSlow))
	}
}

// settle waits until every accepted message is delivered, no send is
// unanswered and (receipts) every delivery's receipt came back to its
// sender, or the timeout passes.
func settle(ctx context.Context, r *run, senders []*sender, receipts bool, timeout time.Duration) bool {
	return waitFor(ctx, timeout, func() bool {
		for _, s := range senders {
			if s.inflight.Load() != 0 {
				return false
			}
		}
		l := &r.ledger
		if l.delivered.Load() < l.accepted.Load() {
			return false
		}
		return !receipts || r.receipts.Load() >= l.delivered.Load()
	})
}

// ---- pairs ----

func runPairs(ctx context.Context, e *env) (*Result, error) {
	o := e.o
	sa, err := e.accounts(ctx, "s", o.Pairs)
	if err != nil {
		return nil, err
	}
	ra, err := e.accounts(ctx, "r", o.Pairs)
	if err != nil {
		return nil, err
	}
	r := newRun(e.eng, e.t)
	recv := e.clients(r, ra, 0)
	send := e.clients(r, sa, o.Pairs)
	senders := make([]*sender, o.Pairs)
	for i, c := range send {
		senders[i] = &sender{stream: r.ledger.newStream(), targets: []*account{ra[i]}, size: o.Size, refill: o.Rate == 0}
		c.snd = senders[i]
	}
	all := append(append([]*client(nil), recv...), send...)
	if failed, err := r.connectAll(ctx, all, o.DialConcurrency, 30*time.Second); failed > 0 {
		return nil, fmt.Errorf("%d of %d connections failed: %v", failed, len(all), err)
	}
	defer r.closeAll(all)
	hbCtx, stopHB := context.WithCancel(ctx)
	defer stopHB()
	go r.heartbeat(hbCtx, all, o.Ping)

	e.logf("pairs: %d pairs, %d in flight each, %d-byte payloads, rate %v, for %v", o.Pairs, o.Inflight, o.Size, o.Rate, o.Duration)
	s0 := e.t.sample()
	start := time.Now()
	stopAt := start.Add(o.Duration).UnixNano()
	for _, s := range senders {
		s.stopAt.Store(stopAt)
	}
	if o.Rate == 0 {
		for i, c := range send {
			for range o.Inflight {
				senders[i].next(c)
			}
		}
		sleepCtx(ctx, o.Duration)
	} else {
		pace(ctx, r, send, o.Rate, o.Inflight, o.Duration)
	}
	elapsed := time.Since(start).Seconds()
	accepted, delivered := r.ledger.accepted.Load(), r.ledger.delivered.Load()
	settled := settle(ctx, r, senders, true, 30*time.Second)
	s1 := e.t.sample()

	res := &Result{Params: fmt.Sprintf("pairs=%d inflight=%d size=%d rate=%v", o.Pairs, o.Inflight, o.Size, o.Rate)}
	res.DurationSec = f64(elapsed)
	res.AcceptedPerSec = f64(float64(accepted) / elapsed)
	res.DeliveredPerSec = f64(float64(delivered) / elapsed)
	messageFigures(res, r, false)
	res.ServerCPUSeconds, res.ServerCPUUsPerMsg = cpuPerMsg(s0, s1, r.ledger.delivered.Load())
	walFigures(res, s0, s1)
	if !settled {
		r.count("not_settled_after_30s", 1)
	}
	return res, nil
}

// pace sends at a fixed total rate, round robin over the senders, never
// more than inflight (at least 64) unanswered per sender; a send that
// finds its sender saturated is skipped and counted.
func pace(ctx context.Context, r *run, send []*client, rate float64, inflight int, d time.Duration) {
	limit := int64(max(inflight, 64))
	start := time.Now()
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	var issued int64
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-tick.C:
			el := now.Sub(start)
			if el >= d {
				return
			}
			due := int64(rate*el.Seconds()) - issued
			for ; due > 0; due-- {
				c := send[issued%int64(len(send))]
				issued++
				if c.snd.inflight.Load() >= limit {
					r.count("rate_skipped_saturated", 1)
					continue
				}
				c.snd.next(c)
			}
		}
	}
}

func sleepCtx(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

// ---- fanout ----

// runFanout measures one sender reaching K online devices, round after
// round: by one group send to a group of the sender and K users (--via
// group), or by K 1:1 sends (--via direct). A round ends at the last of
// the K deliveries.
func runFanout(ctx context.Context, e *env) (*Result, error) {
	o := e.o
	sa, err := e.accounts(ctx, "f", 1)
	if err != nil {
		return nil, err
	}
	ra, err := e.accounts(ctx, "r", o.K)
	if err != nil {
		return nil, err
	}
	r := newRun(e.eng, e.t)
	recv := e.clients(r, ra, 0)
	snd := e.clients(r, sa, o.K)[0]
	s := &sender{targets: ra, size: o.Size}
	if o.Via == ViaGroup {
		start := time.Now()
		id, version, err := e.reg.createGroup(ctx, sa[0], ra)
		if err != nil {
			return nil, fmt.Errorf("creating the group: %w", err)
		}
		e.logf("created group %s of %d members (version %d) in %v", id, o.K+1, version, time.Since(start).Round(time.Millisecond))
		s.group, s.groupVersion = id, version
		s.fan = make([]*stream, len(recv))
		for i, c := range recv {
			c.groupStream = r.ledger.newStream()
			s.fan[i] = c.groupStream
		}
	} else {
		s.stream = r.ledger.newStream()
	}
	snd.snd = s
	all := append(append([]*client(nil), recv...), snd)
	if failed, err := r.connectAll(ctx, all, o.DialConcurrency, 60*time.Second); failed > 0 {
		return nil, fmt.Errorf("%d of %d connections failed: %v", failed, len(all), err)
	}
	defer r.closeAll(all)
	hbCtx, stopHB := context.WithCancel(ctx)
	defer stopHB()
	go r.heartbeat(hbCtx, all, o.Ping)
	if o.Via == ViaGroup {
		// The group's GROUP_UPDATEs came with the backlog, before Synced,
		// and were acked; let the acks' deletions settle out of the
		// measurement.
		time.Sleep(500 * time.Millisecond)
	}

	// One round: one group send, or the sender sends one message to each
	// of the K devices (pipelined); the round ends at the last delivery.
	// Rounds repeat for the duration.
	e.logf("fanout: one sender to %d devices via %s, rounds for %v", o.K, o.Via, o.Duration)
	s0 := e.t.sample()
	start := time.Now()
	last := newLatencies()
	var rounds int64
	for rounds == 0 || (time.Since(start) < o.Duration && ctx.Err() == nil) {
		t0 := time.Now()
		want := r.ledger.delivered.Load() + int64(o.K)
		if o.Via == ViaGroup {
			s.next(snd)
		} else {
			for range o.K {
				s.next(snd)
			}
		}
		if !waitFor(ctx, 60*time.Second, func() bool {
			return s.inflight.Load() == 0 && r.ledger.delivered.Load() >= want
		}) {
			r.count("round_incomplete_after_60s", 1)
			break
		}
		last.record(time.Duration(r.lastDelivery.Load() - t0.UnixNano()))
		rounds++
	}
	elapsed := time.Since(start).Seconds()
	settle(ctx, r, []*sender{s}, true, 30*time.Second)
	s1 := e.t.sample()
	res := &Result{Params: fmt.Sprintf("k=%d via=%s size=%d", o.K, o.Via, o.Size)}
	res.DurationSec = f64(elapsed)
	res.Rounds = i64(rounds)
	res.DeliveredPerSec = f64(float64(r.ledger.delivered.Load()) / elapsed)
	res.AcceptedPerSec = f64(float64(r.ledger.accepted.Load()) / elapsed)
	res.LastDeliveryP50 = last.quantileMs(50)
	res.LastDeliveryP99 = last.quantileMs(99)
	res.LastDeliveryMax = last.maxMs()
	messageFigures(res, r, false)
	if n := r.groupUpdates.Load(); n > 0 {
		if res.Counters == nil {
			res.Counters = map[string]int64{}
		}
		res.Counters["group_updates_acked"] = n
	}
	res.ServerCPUSeconds, res.ServerCPUUsPerMsg = cpuPerMsg(s0, s1, r.ledger.delivered.Load())
	walFigures(res, s0, s1)
	return res, nil
}

// ---- drain ----

func runDrain(ctx context.Context, e *env) (*Result, error) {
	o := e.o
	sa, err := e.accounts(ctx, "s", 1)
	if err != nil {
		return nil, err
	}
	ra, err := e.accounts(ctx, "d", 1)
	if err != nil {
		return nil, err
	}
	r := newRun(e.eng, e.t)
	snd := e.clients(r, sa, 0)[0]
	rcv := e.clients(r, ra, 1)[0]
	s := &sender{stream: r.ledger.newStream(), targets: ra, size: o.Size}
	snd.snd = s
	if failed, err := r.connectAll(ctx, []*client{snd}, 1, 30*time.Second); failed > 0 {
		return nil, fmt.Errorf("sender did not connect: %v", err)
	}
	defer r.closeAll([]*client{snd, rcv})

	// Fill the offline device's mailbox: 64 sends in flight.
	e.logf("drain: queueing %d messages for an offline device", o.Pending)
	fill := time.Now()
	var issued atomic.Int64
	var mu sync.Mutex
	more := func() {
		mu.Lock()
		defer mu.Unlock()
		for s.inflight.Load() < 64 && issued.Load() < int64(o.Pending) {
			issued.Add(1)
			s.next(snd)
		}
	}
	stopFill := make(chan struct{})
	go func() {
		t := time.NewTicker(time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-stopFill:
				return
			case <-t.C:
				more()
			}
		}
	}()
	ok := waitFor(ctx, 5*time.Minute, func() bool {
		return r.ledger.accepted.Load() >= int64(o.Pending) && s.inflight.Load() == 0
	})
	close(stopFill)
	if !ok {
		return nil, fmt.Errorf("queueing: only %d of %d accepted", r.ledger.accepted.Load(), o.Pending)
	}
	e.logf("drain: %d queued in %v; connecting the device", o.Pending, time.Since(fill).Round(time.Millisecond))
	time.Sleep(500 * time.Millisecond) // let the fill's fsyncs and receipts settle out of the measurement
	s0 := e.t.sample()
	t0 := time.Now()
	if failed, err := r.connectAll(ctx, []*client{rcv}, 1, 30*time.Second); failed > 0 {
		return nil, fmt.Errorf("device did not connect: %v", err)
	}
	drained := waitFor(ctx, max(o.Duration, time.Minute), func() bool {
		return r.ledger.delivered.Load() >= int64(o.Pending)
	})
	drainTime := time.Duration(r.lastDelivery.Load() - t0.UnixNano())
	s1 := e.t.sample()
	settle(ctx, r, []*sender{s}, true, 30*time.Second)
	res := &Result{Params: fmt.Sprintf("pending=%d size=%d", o.Pending, o.Size)}
	messageFigures(res, r, false)
	// Send→deliver latency includes the time offline: meaningless here.
	res.P50Ms, res.P99Ms, res.P999Ms, res.MaxMs = nil, nil, nil, nil
	if drained {
		res.DrainMs = f64(float64(drainTime) / float64(time.Millisecond))
		res.DeliveredPerSec = f64(float64(o.Pending) / drainTime.Seconds())
	} else {
		r.count("not_drained", 1)
	}
	res.ServerCPUSeconds, res.ServerCPUUsPerMsg = cpuPerMsg(s0, s1, int64(o.Pending))
	walFigures(res, s0, s1)
	return res, nil
}
