package gateway

// Admission control: the gateway admits a connection only while the
// process is under its watermarks, and otherwise answers 503 overloaded
// with a retry delay that grows with how far over it is, jittered so that
// a reconnect storm spreads out instead of coming back in one wave.
//
// Each signal is a fraction of a limit. Connections are counted exactly,
// on every attempt; memory and CPU are sampled by one ticker per gateway
// and published in atomics, so that the check on the hot path is a few
// loads and compares, and a refusal costs almost nothing.

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"net/http"
	"os"
	"runtime"
	"runtime/debug"
	runtimemetrics "runtime/metrics"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/courier-im/courier/internal/apierr"
)

// The admission signals, the values of the signal label of the
// courier_gateway_load gauge.
const (
	// SignalConnections is the connections open or being opened, as a
	// fraction of Config.MaxConns.
	SignalConnections = "connections"
	// SignalMemory is the process's resident memory, as a fraction of
	// Config.MaxMemory (or of the Go memory limit).
	SignalMemory = "memory"
	// SignalCPU is the process's CPU time over the last few seconds, as a
	// fraction of GOMAXPROCS cores.
	SignalCPU = "cpu"
)

// DefaultAdmitWatermark is the fraction of MaxConns and MaxMemory from
// which new connections are refused.
const DefaultAdmitWatermark = 0.8

const (
	// admitSampleEvery is how often the memory and CPU signals are read.
	admitSampleEvery = 250 * time.Millisecond
	// cpuSmoothing is the time constant of the CPU signal's moving
	// average: a burst shorter than this barely moves it.
	cpuSmoothing = 5 * time.Second

	// An overloaded refusal asks the client to wait
	// [base, 2·base), base = overloadRetryMin + overloadRetrySlope·(how
	// far over the watermark, as a fraction of it), at most
	// overloadRetryMax: 1–2 s at the watermark, 5–10 s at 100 % of a
	// limit with the default watermark, 15–30 s far over.
	overloadRetryMin   = time.Second
	overloadRetrySlope = 16 * time.Second
	overloadRetryMax   = 15 * time.Second
)

// loadReading is one sample of the process's resources.
type loadReading struct {
	// mem is the memory the process holds, in bytes.
	mem uint64
	// cpu is the CPU time (user and system) the process has used since it
	// started.
	cpu time.Duration
}

// admission holds the signals and decides. The zero limits turn their
// signal off.
type admission struct {
	maxConns  int64   // 0: no connection cap
	memLimit  uint64  // 0: no memory signal
	watermark float64 // for connections and memory
	cpuMark   float64 // 0: CPU is measured, never refuses
	procs     float64 // GOMAXPROCS when the gateway started

	conns atomic.Int64  // connections open or being opened
	mem   atomic.Uint64 // float64 bits: the memory signal
	cpu   atomic.Uint64 // float64 bits: the CPU signal
	over  atomic.Bool   // the last sample found a signal over its mark

	// read samples the process; rand returns a uniform value in [0, n).
	// Tests replace both.
	read func() (loadReading, error)
	rand func(n int64) int64

	// Owned by the sampler.
	last      loadReading
	lastAt    time.Time
	sampled   bool
	readErred bool
}

// newAdmission checks and resolves the admission settings of cfg.
func newAdmission(cfg Config) (*admission, error) {
	var errs []error
	w := cfg.AdmitWatermark
	if w == 0 {
		w = DefaultAdmitWatermark
	}
	if !(w > 0 && w <= 1) {
		errs = append(errs, fmt.Errorf("gateway: admission watermark %v: want more than 0, at most 1", cfg.AdmitWatermark))
	}
	if !(cfg.AdmitCPU >= 0 && cfg.AdmitCPU <= 1) {
		errs = append(errs, fmt.Errorf("gateway: CPU admission watermark %v: want 0 (off) to 1", cfg.AdmitCPU))
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	a := &admission{watermark: w, cpuMark: cfg.AdmitCPU, procs: float64(runtime.GOMAXPROCS(0)),
		read: readLoad, rand: rand.Int64N}
	if cfg.MaxConns > 0 {
		a.maxConns = int64(cfg.MaxConns)
	}
	switch {
	case cfg.MaxMemory > 0:
		a.memLimit = uint64(cfg.MaxMemory)
	case cfg.MaxMemory == 0:
		if l := debug.SetMemoryLimit(-1); l > 0 && l < math.MaxInt64 {
			a.memLimit = uint64(l)
		}
	}
	return a, nil
}

// enter counts a connection attempt and reports whether it must be
// refused, with the delay to give it. Every call is matched by one call of
// leave, whatever the answer: a refused attempt counts until it has been
// answered, since it holds a descriptor until then.
func (a *admission) enter() (retry time.Duration, refuse bool) {
	n := a.conns.Add(1)
	worst := 0.0
	if a.maxConns > 0 {
		// The attempts before this one: at 8 of 10 with the mark at 0.8,
		// the ninth is refused.
		worst = float64(n-1) / float64(a.maxConns) / a.watermark
	}
	if a.memLimit > 0 {
		worst = max(worst, loadFloat(&a.mem)/a.watermark)
	}
	if a.cpuMark > 0 {
		worst = max(worst, loadFloat(&a.cpu)/a.cpuMark)
	}
	if worst < 1 {
		return 0, false
	}
	return a.retryAfter(worst), true
}

// leave forgets a connection counted by enter.
func (a *admission) leave() { a.conns.Add(-1) }

// retryAfter is the delay given to a refused attempt when the worst
// signal is at worst times its mark (at least 1).
func (a *admission) retryAfter(worst float64) time.Duration {
	base := overloadRetryMin
	if over := worst - 1; over > 0 {
		base += time.Duration(min(over*float64(overloadRetrySlope), float64(overloadRetryMax)))
	}
	base = min(base, overloadRetryMax)
	return base + time.Duration(a.rand(int64(base)))
}

// load returns a signal's value and whether it is on.
func (a *admission) load(signal string) (float64, bool) {
	switch signal {
	case SignalConnections:
		if a.maxConns <= 0 {
			return 0, false
		}
		return float64(a.conns.Load()) / float64(a.maxConns), true
	case SignalMemory:
		return loadFloat(&a.mem), a.memLimit > 0
	case SignalCPU:
		return loadFloat(&a.cpu), true
	}
	return 0, false
}

// signals lists the signals that are on.
func (a *admission) signals() []string {
	var s []string
	for _, sig := range []string{SignalConnections, SignalMemory, SignalCPU} {
		if _, ok := a.load(sig); ok {
			s = append(s, sig)
		}
	}
	return s
}

// sample reads the process once and updates the memory and CPU signals.
// Only the sampler goroutine (or a test) calls it. It returns the error of
// the reading, if any; the signals then keep their last values.
func (a *admission) sample(now time.Time) error {
	r, err := a.read()
	if err != nil {
		return err
	}
	if a.memLimit > 0 {
		storeFloat(&a.mem, float64(r.mem)/float64(a.memLimit))
	}
	if a.sampled {
		if dt := now.Sub(a.lastAt); dt > 0 && a.procs > 0 {
			used := float64(r.cpu-a.last.cpu) / float64(dt) / a.procs
			alpha := 1 - math.Exp(-float64(dt)/float64(cpuSmoothing))
			prev := loadFloat(&a.cpu)
			storeFloat(&a.cpu, prev+alpha*(max(used, 0)-prev))
		}
	}
	a.last, a.lastAt, a.sampled = r, now, true
	return nil
}

// overMark reports whether a signal is at or over its mark, and which.
func (a *admission) overMark() (string, float64, bool) {
	for _, sig := range []string{SignalConnections, SignalMemory, SignalCPU} {
		v, ok := a.load(sig)
		mark := a.watermark
		if sig == SignalCPU {
			mark = a.cpuMark
		}
		if ok && mark > 0 && v >= mark {
			return sig, v, true
		}
	}
	return "", 0, false
}

// admissionSampler samples the process every admitSampleEvery until the
// gateway shuts down, and logs when the gateway starts or stops refusing.
func (g *Gateway) admissionSampler() {
	a := g.load
	t := time.NewTicker(admitSampleEvery)
	defer t.Stop()
	for {
		if err := a.sample(time.Now()); err != nil && !a.readErred {
			a.readErred = true
			g.log.Warn("admission: reading the process's memory and CPU", "err", err)
		}
		sig, v, over := a.overMark()
		if over != a.over.Load() {
			a.over.Store(over)
			if over {
				g.log.Warn("admission: over the watermark; refusing new connections", "signal", sig, "load", v)
			} else {
				g.log.Info("admission: under the watermarks; admitting connections")
			}
		}
		select {
		case <-g.stop:
			return
		case <-t.C:
		}
	}
}

// refuseOverloaded answers a connection attempt made while the gateway is
// over a watermark: 503 overloaded, with the delay in whole seconds in
// Retry-After and in milliseconds in the body.
func (g *Gateway) refuseOverloaded(w http.ResponseWriter, retry time.Duration) {
	g.cfg.Metrics.Connects.WithLabelValues("overloaded").Inc()
	apierr.Write(w, http.StatusServiceUnavailable, apierr.Detail{Code: "overloaded",
		Message: "this server is at capacity; retry later", RetryAfterMs: retry.Milliseconds()})
}

// Load returns an admission signal (SignalConnections, SignalMemory,
// SignalCPU) as a fraction of its limit, and whether it is on: the
// connection signal needs MaxConns, the memory signal a memory limit.
func (g *Gateway) Load(signal string) (float64, bool) { return g.load.load(signal) }

// LoadSignals lists the admission signals that are on.
func (g *Gateway) LoadSignals() []string { return g.load.signals() }

// readLoad reads the process's resident memory and CPU time. Resident
// memory comes from /proc/self/statm; where that cannot be read, from the
// Go runtime (memory mapped minus memory returned to the system), which
// misses memory allocated outside Go.
func readLoad() (loadReading, error) {
	var r loadReading
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return r, fmt.Errorf("getrusage: %w", err)
	}
	r.cpu = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	if rss, ok := residentMemory(); ok {
		r.mem = rss
		return r, nil
	}
	s := []runtimemetrics.Sample{{Name: "/memory/classes/total:bytes"}, {Name: "/memory/classes/heap/released:bytes"}}
	runtimemetrics.Read(s)
	if s[0].Value.Kind() == runtimemetrics.KindUint64 && s[1].Value.Kind() == runtimemetrics.KindUint64 {
		r.mem = s[0].Value.Uint64() - s[1].Value.Uint64()
	}
	return r, nil
}

// residentMemory reads the resident set size from /proc/self/statm.
func residentMemory() (uint64, bool) {
	b, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		return 0, false
	}
	f := strings.Fields(string(b))
	if len(f) < 2 {
		return 0, false
	}
	pages, err := strconv.ParseUint(f[1], 10, 64)
	if err != nil {
		return 0, false
	}
	return pages * uint64(os.Getpagesize()), true
}

func loadFloat(v *atomic.Uint64) float64     { return math.Float64frombits(v.Load()) }
func storeFloat(v *atomic.Uint64, f float64) { v.Store(math.Float64bits(f)) }
