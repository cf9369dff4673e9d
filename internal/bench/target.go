package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// target is the server under test: a child process the bench started
// (`courier serve` on embedded defaults in a temporary directory), or a
// server given by URL.
//
// A child process, rather than a server inside the bench's own process, so
// that what /proc says about it (VmRSS, VmHWM, utime+stime) is the
// server's alone: the bench's own connections, buffers and CPU would
// otherwise be counted as the server's. With --server, the figures come
// from the server's /metrics (process_resident_memory_bytes,
// process_cpu_seconds_total), which are the whole server process's too.
type target struct {
	base     string // http://host:port
	hostport string
	loopback bool // IPv4 loopback: spread the sources over 127.0.0.x

	// Child only.
	argv      []string // command that runs the courier binary
	transport string   // serve --transport, if set
	procs     int      // GOMAXPROCS in its environment, if positive
	extra     []string // more serve flags
	dir       string   // temporary directory (data and server.log)
	cmd       *exec.Cmd
	exited    chan struct{}
	logFile   *os.File
	mu        sync.Mutex
}

func remoteTarget(raw string) (*target, error) {
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("--server %q: want a URL like http://127.0.0.1:8080", raw)
	}
	if u.Scheme == "https" {
		return nil, fmt.Errorf("--server %q: the bench speaks plain http and ws (benchmark on loopback or a private network)", raw)
	}
	hp := u.Host
	if u.Port() == "" {
		hp = net.JoinHostPort(u.Hostname(), "80")
	}
	ip := net.ParseIP(u.Hostname())
	return &target{base: "http://" + hp, hostport: hp, loopback: (ip != nil && ip.To4() != nil && ip.IsLoopback()) || u.Hostname() == "localhost"}, nil
}

// childConfig is how a child server is run, besides its flags.
type childConfig struct {
	transport string // serve --transport, if set
	procs     int    // GOMAXPROCS, if positive
}

// startChild runs `argv... serve --addr 127.0.0.1:0 --data DIR --log-json
// [--transport T] [extra...]` (with GOMAXPROCS=N in its environment if
// c.procs is set) and waits for its "courier serving" line to learn the
// address.
func startChild(ctx context.Context, argv []string, c childConfig, extra ...string) (*target, error) {
	dir, err := os.MkdirTemp("", "courier-bench-*")
	if err != nil {
		return nil, err
	}
	t := &target{argv: argv, transport: c.transport, procs: c.procs, extra: extra, dir: dir, loopback: true}
	if err := t.start(ctx, "127.0.0.1:0"); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	return t, nil
}

func (t *target) start(ctx context.Context, addr string) error {
	args := append(append([]string(nil), t.argv[1:]...), "serve", "--addr", addr,
		"--data", filepath.Join(t.dir, "data"), "--log-json")
	if t.transport != "" {
		args = append(args, "--transport", t.transport)
	}
	args = append(args, t.extra...)
	cmd := exec.Command(t.argv[0], args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL} // never outlive the bench
	if t.procs > 0 {
		cmd.Env = append(os.Environ(), "GOMAXPROCS="+strconv.Itoa(t.procs))
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return err
	}
	logf, err := os.OpenFile(filepath.Join(t.dir, "server.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start server %s: %w", t.argv[0], err)
	}
	addrCh := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := sc.Bytes()
			logf.Write(line)
			logf.Write([]byte{'\n'})
			if !strings.Contains(string(line), "courier serving") {
				continue
			}
			var rec struct {
				Addr string `json:"addr"`
			}
			if json.Unmarshal(line, &rec) == nil && rec.Addr != "" {
				select {
				case addrCh <- rec.Addr:
				default:
				}
			}
		}
		io.Copy(logf, stderr)
	}()
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	select {
	case a := <-addrCh:
		t.mu.Lock()
		t.cmd, t.exited, t.logFile = cmd, exited, logf
		t.hostport, t.base = a, "http://"+a
		t.mu.Unlock()
		return nil
	case <-exited:
		logf.Close()
		tail, _ := os.ReadFile(filepath.Join(t.dir, "server.log"))
		return fmt.Errorf("server exited before serving: %s", lastLines(string(tail), 5))
	case <-time.After(60 * time.Second):
		cmd.Process.Kill()
		<-exited
		logf.Close()
		return errors.New("server did not log \"courier serving\" within 60 s")
	case <-ctx.Done():
		cmd.Process.Kill()
		<-exited
		logf.Close()
		return ctx.Err()
	}
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

func (t *target) pid() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.cmd == nil {
		return 0
	}
	return t.cmd.Process.Pid
}

// stopChild stops the child server gracefully (SIGTERM; it tells its
// clients to reconnect) and waits for it to exit.
func (t *target) stopChild() {
	t.mu.Lock()
	cmd, exited, logf := t.cmd, t.exited, t.logFile
	t.cmd = nil
	t.mu.Unlock()
	if cmd == nil {
		return
	}
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(60 * time.Second):
		cmd.Process.Kill()
		<-exited
	}
	logf.Close()
}

// restart stops the child and starts it again on the same port and data.
func (t *target) restart(ctx context.Context) error {
	t.stopChild()
	var err error
	for range 50 { // the port may linger for a moment
		if err = t.start(ctx, t.hostport); err == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return err
}

func (t *target) close() {
	if t.argv == nil {
		return
	}
	t.stopChild()
	os.RemoveAll(t.dir)
}

func (t *target) describe() string {
	if pid := t.pid(); pid != 0 {
		cmd := "courier serve"
		if t.procs > 0 {
			cmd = "GOMAXPROCS=" + strconv.Itoa(t.procs) + " " + cmd
		}
		if t.transport != "" {
			cmd += " --transport " + t.transport
		}
		return fmt.Sprintf("child %s (pid %d) at %s", cmd, pid, t.base)
	}
	return t.base
}

// stats is a sample of the server's resource use. A negative value is
// unknown.
type stats struct {
	rss, anon, peakRSS, cpu, heap, stack, goroutines float64
	// walSyncs counts the fsyncs of the server's mailbox WAL, walSlow
	// those that took longer than walSlowBound (from its
	// courier_mailbox_wal_fsync_seconds histogram; -1 when it has none).
	walSyncs, walSlow float64
	walSeconds        float64 // their total time
}

// walSlowBound is the largest bound of the server's WAL fsync histogram
// that a slow fsync is counted above: the largest not above 100 ms.
const walSlowBound = 0.1

var scrapeClient = &http.Client{Timeout: 5 * time.Second}

// sample reads the server's figures: /proc for a child, /metrics always
// (Go heap and goroutines; RSS and CPU too when there is no child).
func (t *target) sample() stats {
	s := stats{rss: -1, anon: -1, peakRSS: -1, cpu: -1, heap: -1, stack: -1, goroutines: -1, walSyncs: -1, walSlow: -1, walSeconds: -1}
	if pid := t.pid(); pid != 0 {
		if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid)); err == nil {
			s.rss = procKB(string(st), "VmRSS:")
			// Anonymous memory alone: without the binary's pages,
			// which the first connections page in once for all.
			s.anon = procKB(string(st), "RssAnon:")
			s.peakRSS = procKB(string(st), "VmHWM:")
		}
		if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
			s.cpu = procCPU(string(st))
		}
	}
	m := t.metrics()
	if v, ok := m["go_memstats_heap_inuse_bytes"]; ok {
		s.heap = v
	}
	if v, ok := m["go_memstats_stack_inuse_bytes"]; ok {
		s.stack = v
	}
	if v, ok := m["go_goroutines"]; ok {
		s.goroutines = v
	}
	s.walSyncs, s.walSlow = walFsyncs(m)
	if v, ok := m["courier_mailbox_wal_fsync_seconds_sum"]; ok {
		s.walSeconds = v
	}
	if s.rss < 0 {
		if v, ok := m["process_resident_memory_bytes"]; ok {
			s.rss = v
		}
	}
	if s.cpu < 0 {
		if v, ok := m["process_cpu_seconds_total"]; ok {
			s.cpu = v
		}
	}
	return s
}

// walFsyncs reads the WAL fsync histogram from scraped metrics: the count,
// and how many took longer than the largest bucket bound not above
// walSlowBound. Both are -1 if the server has no such histogram.
func walFsyncs(m map[string]float64) (count, slow float64) {
	const name = "courier_mailbox_wal_fsync_seconds"
	count, ok := m[name+"_count"]
	if !ok {
		return -1, -1
	}
	bound, below := -1.0, 0.0
	for k, v := range m {
		le, ok := strings.CutPrefix(k, name+`_bucket{le="`)
		if !ok {
			continue
		}
		b, err := strconv.ParseFloat(strings.TrimSuffix(le, `"}`), 64)
		if err != nil || b > walSlowBound || b <= bound {
			continue
		}
		bound, below = b, v
	}
	if bound < 0 {
		return count, -1
	}
	return count, count - below
}

// metrics scrapes the samples of /metrics: an unlabelled one by its name,
// a labelled one by its name and labels as written (name{k="v"}).
func (t *target) metrics() map[string]float64 {
	out := map[string]float64{}
	resp, err := scrapeClient.Get(t.base + "/metrics")
	if err != nil {
		return out
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return out
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ') // label values may hold spaces; the value cannot
		if i < 0 {
			continue
		}
		if v, err := strconv.ParseFloat(line[i+1:], 64); err == nil {
			out[line[:i]] = v
		}
	}
	return out
}

func procKB(status, field string) float64 {
	for line := range strings.SplitSeq(status, "\n") {
		if rest, ok := strings.CutPrefix(line, field); ok {
			f := strings.Fields(rest)
			if len(f) > 0 {
				if v, err := strconv.ParseFloat(f[0], 64); err == nil {
					return v * 1024
				}
			}
		}
	}
	return -1
}

// ProcessCPU returns the CPU time (user and system) process pid has used,
// in seconds, from /proc, or -1 if it cannot be read. cmd/mqtt-pairs
// measures reference brokers with it as the bench measures a child server.
func ProcessCPU(pid int) float64 {
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil || pid <= 0 {
		return -1
	}
	return procCPU(string(st))
}

// procCPU returns utime+stime in seconds from /proc/PID/stat (fields 14
// and 15, in clock ticks of 1/100 s on Linux).
func procCPU(stat string) float64 {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return -1
	}
	f := strings.Fields(stat[i+1:]) // f[0] is field 3 (state)
	if len(f) < 13 {
		return -1
	}
	ut, err1 := strconv.ParseFloat(f[11], 64)
	st, err2 := strconv.ParseFloat(f[12], 64)
	if err1 != nil || err2 != nil {
		return -1
	}
	return (ut + st) / 100
}
