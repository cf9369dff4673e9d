package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// connSpec is one process's share of a conns run (sent to a worker
// process as JSON on its stdin).
type connSpec struct {
	HostPort string        `json:"hostport"`
	Loopback bool          `json:"loopback"`
	Offset   int           `json:"offset"` // global index of the first account (source addresses)
	Accounts []*account    `json:"accounts"`
	Ping     time.Duration `json:"ping"`
	Conc     int           `json:"conc"`
}

// connReport is a process's account of its connections (a worker's JSON
// lines on stdout: event "connected" once all have tried, "done" at the
// end).
type connReport struct {
	Event      string  `json:"event"`
	Held       int64   `json:"held"`
	Failed     int64   `json:"failed"`
	ConnectSec float64 `json:"connect_sec"`
	Pongs      int64   `json:"pongs"`
	FirstError string  `json:"first_error,omitempty"`
	RSS        float64 `json:"rss"`     // this bench process's RSS
	RSSBase    float64 `json:"rssbase"` // before connecting
	CPU        float64 `json:"cpu"`     // this bench process's CPU seconds
}

// holder holds one process's connections with heartbeats.
type holder struct {
	r       *run
	clients []*client
	stopHB  context.CancelFunc
	rep     connReport
}

func startHold(ctx context.Context, eng *wsEngine, spec connSpec) *holder {
	r := &run{eng: eng, hostport: spec.HostPort, loopback: spec.Loopback, lat: newLatencies(), counters: map[string]int64{}}
	h := &holder{r: r}
	h.rep.RSSBase = selfRSS()
	h.clients = make([]*client, len(spec.Accounts))
	for i, a := range spec.Accounts {
		h.clients[i] = &client{r: r, acct: a, src: r.sourceIP(spec.Offset + i)}
	}
	// The heartbeat runs from the start (it skips clients not up yet): a
	// connect phase slowed by refusals and retries can outlast the
	// server's idle timeout, which would close the first connections.
	hbCtx, stop := context.WithCancel(context.Background())
	h.stopHB = stop
	go r.heartbeat(hbCtx, h.clients, spec.Ping)
	start := time.Now()
	failed, err := r.connectAll(ctx, h.clients, max(1, spec.Conc), 60*time.Second)
	h.rep.ConnectSec = time.Since(start).Seconds()
	h.rep.Failed = int64(failed)
	if err != nil {
		h.rep.FirstError = err.Error()
	}
	h.rep.Held = r.up.Load()
	h.rep.Event = "connected"
	h.rep.RSS = selfRSS()
	return h
}

// finish reports what is still held, then closes everything.
func (h *holder) finish() connReport {
	h.stopHB()
	rep := h.rep
	rep.Event = "done"
	rep.Held = h.r.up.Load()
	rep.Pongs = h.r.pongs.Load()
	rep.RSS = selfRSS()
	rep.CPU = selfCPU()
	h.r.closeAll(h.clients)
	return rep
}

func selfRSS() float64 {
	st, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return -1
	}
	return procKB(string(st), "VmRSS:")
}

func selfCPU() float64 { return ProcessCPU(os.Getpid()) }

// RunWorker is the hidden `courier bench conns-worker` mode: it reads a
// connSpec from in, connects, writes a "connected" report line to out,
// holds the connections until in is closed (or ctx ends), then writes a
// "done" report line.
func RunWorker(ctx context.Context, in io.Reader, out io.Writer) error {
	raiseFileLimit()
	dec := json.NewDecoder(in)
	var spec connSpec
	if err := dec.Decode(&spec); err != nil {
		return fmt.Errorf("conns-worker: reading the spec on stdin: %w", err)
	}
	eng, err := newEngine(0)
	if err != nil {
		return err
	}
	defer eng.stop()
	h := startHold(ctx, eng, spec)
	enc := json.NewEncoder(out)
	if err := enc.Encode(h.rep); err != nil {
		return err
	}
	eof := make(chan struct{})
	go func() { io.Copy(io.Discard, dec.Buffered()); io.Copy(io.Discard, in); close(eof) }()
	select {
	case <-eof:
	case <-ctx.Done():
	}
	return enc.Encode(h.finish())
}

// worker is a conns worker process seen from the parent.
type worker struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	lines chan connReport
	errb  *strings.Builder
	mu    sync.Mutex
}

func (e *env) startWorker(spec connSpec) (*worker, error) {
	if len(e.o.WorkerCmd) == 0 {
		return nil, fmt.Errorf("%d connections need worker processes, and no worker command is set", len(spec.Accounts))
	}
	args := append(append([]string(nil), e.o.WorkerCmd[1:]...), "bench", "conns-worker")
	cmd := exec.Command(e.o.WorkerCmd[0], args...)
	cmd.Env = append(os.Environ(), e.o.WorkerEnv...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	w := &worker{cmd: cmd, lines: make(chan connReport, 4), errb: &strings.Builder{}}
	cmd.Stderr = w
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start worker: %w", err)
	}
	w.stdin = stdin
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			var rep connReport
			if json.Unmarshal(sc.Bytes(), &rep) == nil {
				w.lines <- rep
			}
		}
		close(w.lines)
	}()
	if err := json.NewEncoder(stdin).Encode(spec); err != nil {
		cmd.Process.Kill()
		return nil, fmt.Errorf("worker spec: %w", err)
	}
	return w, nil
}

// Write collects the worker's stderr (for errors).
func (w *worker) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.errb.Len() < 8192 {
		w.errb.Write(p)
	}
	return len(p), nil
}

func (w *worker) report(timeout time.Duration) (connReport, error) {
	select {
	case rep, ok := <-w.lines:
		if ok {
			return rep, nil
		}
	case <-time.After(timeout):
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	return connReport{}, fmt.Errorf("worker pid %d gave no report: %s", w.cmd.Process.Pid, lastLines(w.errb.String(), 5))
}

// ---- conns ----

func runConns(ctx context.Context, e *env) (*Result, error) {
	o := e.o
	accts, err := e.accounts(ctx, "c", o.N)
	if err != nil {
		return nil, err
	}
	time.Sleep(time.Second) // let account creation's work settle out of the baseline
	base := e.t.sample()
	procs := (o.N + o.PerProcess - 1) / o.PerProcess
	e.logf("conns: %d connections over %d bench process(es), heartbeat every %v, hold %v", o.N, procs, o.Ping, o.Duration)

	var reps []connReport
	var finish []func() (connReport, error)
	start := time.Now()
	if procs <= 1 {
		h := startHold(ctx, e.eng, connSpec{HostPort: e.t.hostport, Loopback: e.t.loopback, Accounts: accts, Ping: o.Ping, Conc: o.DialConcurrency})
		reps = append(reps, h.rep)
		finish = append(finish, func() (connReport, error) { return h.finish(), nil })
	} else {
		var workers []*worker
		for p := range procs {
			lo, hi := p*o.N/procs, (p+1)*o.N/procs
			w, err := e.startWorker(connSpec{HostPort: e.t.hostport, Loopback: e.t.loopback, Offset: lo, Accounts: accts[lo:hi],
				Ping: o.Ping, Conc: max(1, o.DialConcurrency/procs)})
			if err != nil {
				for _, w := range workers {
					w.cmd.Process.Kill()
				}
				return nil, err
			}
			workers = append(workers, w)
		}
		for _, w := range workers {
			rep, err := w.report(5 * time.Minute)
			if err != nil {
				return nil, err
			}
			reps = append(reps, rep)
			finish = append(finish, func() (connReport, error) {
				w.stdin.Close()
				rep, err := w.report(time.Minute)
				w.cmd.Wait()
				return rep, err
			})
		}
	}
	connectSec := time.Since(start).Seconds()
	var held, failed int64
	var firstErr string
	for _, rep := range reps {
		held += rep.Held
		failed += rep.Failed
		if firstErr == "" {
			firstErr = rep.FirstError
		}
	}
	e.logf("conns: %d held, %d failed, in %.1f s; holding for %v", held, failed, connectSec, o.Duration)
	time.Sleep(2 * time.Second) // let the server's connection set-up garbage go
	loaded := e.t.sample()
	sleepCtx(ctx, o.Duration)
	end := e.t.sample()

	var endHeld, pongs int64
	var benchRSS, benchBase, benchCPU float64
	for _, f := range finish {
		rep, err := f()
		if err != nil {
			return nil, err
		}
		endHeld += rep.Held
		pongs += rep.Pongs
		benchRSS += rep.RSS
		benchBase += rep.RSSBase
		benchCPU += rep.CPU
	}

	res := &Result{Params: fmt.Sprintf("n=%d ping=%v", o.N, o.Ping)}
	res.DurationSec = f64(o.Duration.Seconds())
	res.ConnsHeld = i64(endHeld)
	res.ConnsFailed = i64(failed)
	res.ConnsDropped = i64(held - endHeld)
	res.ConnectPerSec = f64(float64(held) / connectSec)
	res.Workers = i64(int64(procs))
	if held > 0 {
		if base.rss >= 0 && end.rss >= 0 {
			res.ServerRSSBaseBytes = f64(base.rss)
			res.ServerRSSBytes = f64(end.rss)
			res.ServerRSSBytesPerConn = f64((end.rss - base.rss) / float64(held))
		}
		if base.anon >= 0 && end.anon >= 0 {
			res.ServerAnonRSSBytesPerConn = f64((end.anon - base.anon) / float64(held))
		}
		if base.heap >= 0 && end.heap >= 0 {
			res.ServerHeapBytesPerConn = f64((end.heap - base.heap) / float64(held))
		}
		if base.stack >= 0 && end.stack >= 0 {
			res.ServerStackBytesPerConn = f64((end.stack - base.stack) / float64(held))
		}
		if base.goroutines >= 0 && end.goroutines >= 0 {
			res.ServerGoroutinesPerConn = f64((end.goroutines - base.goroutines) / float64(held))
		}
		res.BenchRSSBytesPerConn = f64((benchRSS - benchBase) / float64(held))
	}
	if end.peakRSS >= 0 {
		res.ServerPeakRSSBytes = f64(end.peakRSS)
	}
	if base.cpu >= 0 && end.cpu >= 0 {
		res.ServerCPUSeconds = f64(end.cpu - base.cpu)
		if loaded.cpu >= 0 {
			// The hold alone (heartbeats), apart from connecting.
			e.logf("conns: server CPU %.2f s connecting, %.2f s holding", loaded.cpu-base.cpu, end.cpu-loaded.cpu)
		}
	}
	res.BenchCPUSeconds = f64(benchCPU)
	res.Counters = map[string]int64{"pongs": pongs}
	res.FirstError = firstErr
	return res, nil
}
