package checker_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/accounts/sqlite"
	"github.com/courier-im/courier/internal/checker"
	"github.com/courier-im/courier/internal/server"
	"github.com/courier-im/courier/internal/servertest"
)

// The SIGKILL tests run the server in a child process: this test binary,
// re-executed with childEnv naming the data directory.
const childEnv = "COURIER_CHECKER_CHILD_DATA"

// childClusterEnv, if set, holds the child's server.ClusterConfig as JSON.
const childClusterEnv = "COURIER_CHECKER_CHILD_CLUSTER"

func TestMain(m *testing.M) {
	if dir := os.Getenv(childEnv); dir != "" {
		cfg := server.Config{DataDir: dir, Addr: os.Getenv("COURIER_CHECKER_CHILD_ADDR"),
			Logger: servertest.Logger(), MinFreeBytes: 1}
		var err error
		if c := os.Getenv(childClusterEnv); c != "" {
			err = json.Unmarshal([]byte(c), &cfg.Cluster)
		}
		var srv *server.Server
		if err == nil {
			srv, err = server.New(cfg)
		}
		if err == nil {
			err = srv.Run(context.Background(), nil)
		}
		if err != nil {
			fmt.Println("ERROR", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// startChild starts a child server on a fresh data directory; it is killed
// when the test ends. env is added to the child's environment.
func startChild(t *testing.T, env ...string) *checker.Process {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	p, err := checker.StartProcess(ctx, t.TempDir(), func(dir, addr string) *exec.Cmd {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(append(os.Environ(), env...), childEnv+"="+dir, "COURIER_CHECKER_CHILD_ADDR="+addr)
		return cmd
	}, testWriter{t})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Stop)
	return p
}

// testWriter logs a child's output lines through t.Logf.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Logf("child: %s", bytes.TrimRight(b, "\n"))
	return len(b), nil
}

// addDevice adds a device to user in the account store next to a running
// child server.
func addDevice(dir string) func(ctx context.Context, user string) (uint32, string, error) {
	var mu sync.Mutex
	return func(ctx context.Context, user string) (uint32, string, error) {
		mu.Lock()
		defer mu.Unlock()
		st, err := sqlite.Open(filepath.Join(dir, "accounts.db"), sqlite.Options{})
		if err != nil {
			return 0, "", err
		}
		defer st.Close()
		cred, hash := accounts.NewCredential()
		d, err := st.AddDevice(ctx, user, "checker", hash)
		if err != nil {
			return 0, "", err
		}
		return d.ID, cred, nil
	}
}

// runAgainst runs a conversation against a child server and fails the test
// on any violation.
// If history is not nil, it is set to the driver's History before the run.
func runAgainst(t *testing.T, p *checker.Process, cfg checker.Config, history **checker.History) *checker.Result {
	t.Helper()
	cfg.Server = p.URL()
	cfg.AddDevice = addDevice(p.Dir)
	cfg.Logf = t.Logf
	d, err := checker.NewDriver(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if history != nil {
		*history = d.History()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	res, err := d.Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Violations) > 0 {
		var buf bytes.Buffer
		checker.Report(&buf, res.Violations)
		t.Fatalf("seed %d:\n%s", cfg.Seed, buf.String())
	}
	if !res.Quiesced {
		t.Fatal("not every accepted message was delivered in time")
	}
	st := res.Stats
	if st.Accepted != cfg.Messages || st.Sends != cfg.Messages {
		t.Errorf("stats %+v: want %d sends and acceptances", st, cfg.Messages)
	}
	if st.Duplicates != 0 {
		t.Errorf("stats %+v: duplicates shown", st)
	}
	t.Logf("stats %+v, %d reconnects, %d reads, %v", st, res.Reconnects, res.Reads, res.Elapsed.Round(time.Millisecond))
	return res
}

// TestCheckerSIGKILL kills the server with SIGKILL at random moments of a
// conversation, restarting it on the same data and port each time: every
// accepted message must still reach every device it is owed to, once, in
// order, with receipts only moving forward.
func TestCheckerSIGKILL(t *testing.T) {
	if testing.Short() {
		t.Skip("SIGKILL test skipped in -short mode")
	}
	t.Parallel()
	p := startChild(t)
	const kills = 3
	runAgainst(t, p, checker.Config{
		Users:          6,
		DevicesPerUser: 2,
		Messages:       400,
		Seed:           3,
		ReconnectRate:  0.05,
		ReadRate:       0.3,
		Duration:       90 * time.Second,
		Faults:         kills,
		Fault:          p.KillFault(3, 50*time.Millisecond),
	}, nil)
	if p.Kills() != kills {
		t.Errorf("%d kills, want %d", p.Kills(), kills)
	}
}

// TestCheckerSlowAndStalledReaders has two devices that never ack while the
// others converse (their handlers block, so the server's window of unacked
// entries fills and the rest waits in their mailboxes), and two that read
// slowly. At the peak of the backlog the server's heap and goroutines must
// not have grown with it; then the stalled devices reconnect and ack, and
// every message must be delivered exactly once.
func TestCheckerSlowAndStalledReaders(t *testing.T) {
	if testing.Short() {
		t.Skip("child-process test skipped in -short mode")
	}
	t.Parallel()
	p := startChild(t)
	const (
		stalled = 2
		window  = 256 // the gateway's unacked entries per connection
	)
	names := []string{"go_memstats_heap_inuse_bytes", "go_goroutines"}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	before, err := p.Metrics(ctx, names...)
	if err != nil {
		t.Fatal(err)
	}
	var hist *checker.History
	peaked := false
	runAgainst(t, p, checker.Config{
		Users:          6,
		DevicesPerUser: 2,
		Messages:       1200,
		Seed:           4,
		ReconnectRate:  0.02,
		ReadRate:       0.2,
		Duration:       90 * time.Second,
		Stalled:        stalled,
		SlowReaders:    2,
		SlowDelay:      time.Millisecond,
		BodySize:       1024,
		StalledPeak: func(ctx context.Context) error {
			peaked = true
			owed := hist.Outstanding()
			peak, err := p.Metrics(ctx, names...)
			if err != nil {
				return err
			}
			t.Logf("at the peak: %d deliveries owed; heap in use %.1f → %.1f MiB, goroutines %v → %v",
				owed, before[names[0]]/(1<<20), peak[names[0]]/(1<<20), before[names[1]], peak[names[1]])
			// The backlog must be well past what the window lets out.
			if owed < stalled*window {
				t.Errorf("only %d deliveries owed at the peak; the test needs more than %d", owed, stalled*window)
			}
			// Loose bounds: a few goroutines per connection (12 devices),
			// and a heap that does not hold the backlog many times over.
			if g := peak[names[1]] - before[names[1]]; g > 12*6+50 {
				t.Errorf("goroutines grew by %v with %d deliveries owed", g, owed)
			}
			if h := peak[names[0]] - before[names[0]]; h > 64<<20 {
				t.Errorf("heap in use grew by %.1f MiB with %d deliveries owed", h/(1<<20), owed)
			}
			return nil
		},
	}, &hist)
	if !peaked {
		t.Error("StalledPeak was not called")
	}
}

// TestProcessStartFailures checks that a child that exits at once, or
// never answers, is reported with its output rather than waited on.
func TestProcessStartFailures(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err := checker.StartProcess(ctx, t.TempDir(), func(dir, addr string) *exec.Cmd {
		return exec.Command("sh", "-c", "echo cannot open the data directory; exit 3")
	}, nil)
	if err == nil || !strings.Contains(err.Error(), "cannot open the data directory") {
		t.Errorf("child exiting at once: %v", err)
	}
	p := &checker.Process{Dir: t.TempDir(), Addr: "127.0.0.1:1", ReadyTimeout: 300 * time.Millisecond,
		Command: func(dir, addr string) *exec.Cmd { return exec.Command("sleep", "60") }}
	if err := p.Start(ctx); err == nil || !strings.Contains(err.Error(), "not answering") {
		t.Errorf("child never answering: %v", err)
	}
	if err := p.Kill(); err == nil {
		t.Error("Kill of a process that is not running succeeded")
	}
}
