package checker

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Process is a courier server running as a child process on a data
// directory and a loopback port, which can be killed with SIGKILL and
// started again on the same data and port: the crash half of a checker run
// (the Driver is the conversation half; KillFault joins them).
type Process struct {
	// Command returns the command that runs a server with its data in dir,
	// listening on addr (host:port). It is called for every start.
	Command func(dir, addr string) *exec.Cmd
	// Dir is the data directory, kept across kills.
	Dir string
	// Addr is the listening address; StartProcess picks a free loopback
	// port and keeps it across kills.
	Addr string
	// Output, if set, gets the child's standard output and error.
	Output io.Writer
	// ReadyTimeout bounds the wait for a (re)started child to answer
	// GET /v1/health; 0 means 30 s.
	ReadyTimeout time.Duration

	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{}
	kills  int
}

// errExited is a child that exited before it answered.
var errExited = errors.New("server exited while starting")

// StartProcess starts a server through command on dir, on a free loopback
// port, and waits until it answers.
func StartProcess(ctx context.Context, dir string, command func(dir, addr string) *exec.Cmd, output io.Writer) (*Process, error) {
	addr, err := freeLoopbackAddr()
	if err != nil {
		return nil, err
	}
	p := &Process{Command: command, Dir: dir, Addr: addr, Output: output}
	if err := p.Start(ctx); err != nil {
		return nil, err
	}
	return p, nil
}

// freeLoopbackAddr returns a loopback address whose port was free a moment
// ago.
func freeLoopbackAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	addr := ln.Addr().String()
	return addr, ln.Close()
}

// URL is the server's base URL.
func (p *Process) URL() string { return "http://" + p.Addr }

// Kills is how many times the server was killed.
func (p *Process) Kills() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.kills
}

// Start starts the server (which must not be running) and waits until it
// answers GET /v1/health with 200. A child that exits first, or does not
// answer within ReadyTimeout, is an error. The port was ours a moment ago;
// a child that fails to listen on it because the killed one's socket is
// still being torn down is started again, a few times.
func (p *Process) Start(ctx context.Context) error {
	var err error
	for attempt := 0; attempt < 5; attempt++ {
		if err = p.start(ctx); err == nil || ctx.Err() != nil || !errors.Is(err, errExited) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(200 * time.Millisecond):
		}
	}
	return err
}

func (p *Process) start(ctx context.Context) error {
	p.mu.Lock()
	if p.cmd != nil {
		p.mu.Unlock()
		return errors.New("checker: server process already running")
	}
	cmd := p.Command(p.Dir, p.Addr)
	out := p.Output
	if out == nil {
		out = io.Discard
	}
	// The child's output goes through a pipe we drain, so that a child
	// killed while writing never blocks on us.
	r, w := io.Pipe()
	cmd.Stdout, cmd.Stderr = w, w
	if err := cmd.Start(); err != nil {
		p.mu.Unlock()
		return fmt.Errorf("checker: start server: %w", err)
	}
	exited := make(chan struct{})
	var tail lastLines
	go func() {
		sc := bufio.NewScanner(r)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			tail.add(sc.Text())
			fmt.Fprintln(out, sc.Text())
		}
		io.Copy(io.Discard, r)
	}()
	go func() {
		cmd.Wait()
		w.Close()
		close(exited)
	}()
	p.cmd, p.exited = cmd, exited
	p.mu.Unlock()

	timeout := p.ReadyTimeout
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	rctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	hc := &http.Client{Timeout: time.Second}
	for {
		req, _ := http.NewRequestWithContext(rctx, "GET", p.URL()+"/v1/health", nil)
		resp, err := hc.Do(req)
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-exited:
			p.mu.Lock()
			p.cmd = nil
			p.mu.Unlock()
			return fmt.Errorf("checker: %w (%v): %s", errExited, cmd.ProcessState, tail.String())
		case <-rctx.Done():
			p.Stop()
			return fmt.Errorf("checker: server not answering on %s after %v: %s", p.Addr, timeout, tail.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Kill kills the server with SIGKILL and waits until it is gone.
func (p *Process) Kill() error {
	p.mu.Lock()
	cmd, exited := p.cmd, p.exited
	p.cmd = nil
	p.mu.Unlock()
	if cmd == nil {
		return errors.New("checker: server process not running")
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		return fmt.Errorf("checker: kill server: %w", err)
	}
	<-exited
	if st, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !st.Signaled() || st.Signal() != syscall.SIGKILL {
		return fmt.Errorf("checker: server ended with %v before it was killed", cmd.ProcessState)
	}
	p.mu.Lock()
	p.kills++
	p.mu.Unlock()
	return nil
}

// Stop kills the server if it is running (for clean-up; a no-op
// otherwise).
func (p *Process) Stop() {
	p.mu.Lock()
	cmd, exited := p.cmd, p.exited
	p.cmd = nil
	p.mu.Unlock()
	if cmd != nil {
		cmd.Process.Kill()
		<-exited
	}
}

// KillFault returns a Config.Fault hook that waits a random moment of up
// to maxDelay (the other devices going on sending meanwhile), kills the
// server with SIGKILL, and starts it again on the same data and port.
func (p *Process) KillFault(seed uint64, maxDelay time.Duration) func(ctx context.Context, n int) error {
	rng := mrand.New(mrand.NewPCG(seed, 0x6b696c6c))
	return func(ctx context.Context, n int) error {
		if maxDelay > 0 {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(time.Duration(rng.Int64N(int64(maxDelay)))):
			}
		}
		if err := p.Kill(); err != nil {
			return err
		}
		return p.Start(ctx)
	}
}

// Metrics reads the server's GET /metrics and returns the unlabelled
// samples whose names are given (Prometheus text format), as floats.
func (p *Process) Metrics(ctx context.Context, names ...string) (map[string]float64, error) {
	return ScrapeMetrics(ctx, p.URL(), names...)
}

// ScrapeMetrics reads base+"/metrics" and returns the unlabelled samples
// named (a missing one is an error).
func ScrapeMetrics(ctx context.Context, base string, names ...string) (map[string]float64, error) {
	req, err := http.NewRequestWithContext(ctx, "GET", base+"/metrics", nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("checker: GET /metrics: %s", resp.Status)
	}
	want := map[string]bool{}
	for _, n := range names {
		want[n] = true
	}
	got := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		name, val, ok := strings.Cut(sc.Text(), " ")
		if !ok || !want[name] {
			continue
		}
		v, err := strconv.ParseFloat(strings.TrimSpace(val), 64)
		if err != nil {
			return nil, fmt.Errorf("checker: metric %s: %w", name, err)
		}
		got[name] = v
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	for _, n := range names {
		if _, ok := got[n]; !ok {
			return nil, fmt.Errorf("checker: metric %s not exported", n)
		}
	}
	return got, nil
}

// lastLines keeps the last few lines of a child's output, for errors.
type lastLines struct {
	mu    sync.Mutex
	lines []string
}

func (l *lastLines) add(s string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lines = append(l.lines, s)
	if len(l.lines) > 10 {
		l.lines = l.lines[1:]
	}
}

func (l *lastLines) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.lines) == 0 {
		return "(no output)"
	}
	return strings.Join(l.lines, " | ")
}
