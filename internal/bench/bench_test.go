package bench

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/courier-im/courier/internal/server"
	"github.com/courier-im/courier/internal/servertest"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

// The test binary stands in for the courier binary in child processes:
// with COURIER_BENCH_TEST_ROLE=serve it runs a server the way `courier
// serve --addr A --data D --log-json` does (so the bench's child-server
// path, /proc figures and restart included, is what is tested), and with
// =worker it is a conns worker.
func TestMain(m *testing.M) {
	switch os.Getenv("COURIER_BENCH_TEST_ROLE") {
	case "serve":
		if err := testServe(os.Args[1:]); err != nil {
			fmt.Fprintln(os.Stderr, "test server:", err)
			os.Exit(1)
		}
		os.Exit(0)
	case "worker":
		if err := RunWorker(context.Background(), os.Stdin, os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, "test worker:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func testServe(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	addr := fs.String("addr", "127.0.0.1:0", "")
	data := fs.String("data", "", "")
	transport := fs.String("transport", "", "")
	maxMembers := fs.Int("max-group-members", 0, "")
	watermark := fs.Float64("admit-watermark", 0, "")
	fs.Bool("log-json", false, "")
	if len(args) == 0 || args[0] != "serve" {
		return fmt.Errorf("want serve, got %q", args)
	}
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, nil))
	srv, err := server.New(server.Config{Addr: *addr, DataDir: *data, Logger: log, MinFreeBytes: 1, Transport: *transport,
		MaxGroupMembers: *maxMembers, AdmitWatermark: *watermark})
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	return srv.Run(ctx, func(a net.Addr) { log.Info("courier serving", "addr", a.String()) })
}

// childOptions makes Run start this test binary as the server (and as
// conns workers).
func childOptions(t *testing.T) Options {
	t.Helper()
	return Options{
		ServerCmd: []string{"env", "COURIER_BENCH_TEST_ROLE=serve", os.Args[0]},
		WorkerCmd: []string{os.Args[0]},
		WorkerEnv: []string{"COURIER_BENCH_TEST_ROLE=worker"},
		Log:       testLog{t},
	}
}

type testLog struct{ t *testing.T }

func (l testLog) Write(p []byte) (int, error) {
	l.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func runOK(t *testing.T, scenario string, o Options, wantConns int64) *Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	res, err := Run(ctx, scenario, o)
	if err != nil {
		t.Fatalf("%s: %v", scenario, err)
	}
	var b strings.Builder
	res.WriteTable(&b)
	t.Logf("%s:\n%s", scenario, b.String())
	if err := res.OK(wantConns); err != nil {
		t.Fatal(err)
	}
	if len(res.Counters) > 0 {
		for k, v := range res.Counters {
			if strings.HasPrefix(k, "not_") || strings.HasPrefix(k, "protocol_") || strings.HasPrefix(k, "undecodable") || strings.HasPrefix(k, "round_incomplete") {
				t.Errorf("%s: counter %s = %d", scenario, k, v)
			}
		}
	}
	return res
}

func TestConnsAcrossWorkers(t *testing.T) {
	t.Parallel()
	o := childOptions(t)
	o.N, o.PerProcess, o.Duration, o.Ping = 12, 5, time.Second, 200*time.Millisecond
	res := runOK(t, "conns", o, 12)
	if *res.Workers != 3 {
		t.Errorf("bench processes = %d, want 3", *res.Workers)
	}
	if res.ServerRSSBytesPerConn == nil || res.ServerHeapBytesPerConn == nil {
		t.Errorf("missing per-connection server figures: rss %v heap %v", res.ServerRSSBytesPerConn, res.ServerHeapBytesPerConn)
	}
	if res.Counters["pongs"] == 0 {
		t.Error("no heartbeat was answered")
	}
}

func TestConnsInProcess(t *testing.T) {
	t.Parallel()
	o := childOptions(t)
	o.N, o.Duration = 20, 500*time.Millisecond
	runOK(t, "conns", o, 20)
}

func TestPairsClosedLoop(t *testing.T) {
	t.Parallel()
	o := childOptions(t)
	o.Pairs, o.Inflight, o.Duration = 3, 4, time.Second
	res := runOK(t, "pairs", o, 0)
	if *res.Delivered == 0 || *res.Delivered != *res.Accepted {
		t.Errorf("delivered %d, accepted %d", *res.Delivered, *res.Accepted)
	}
	if *res.ReceiptsSeen != *res.Delivered {
		t.Errorf("receipts %d for %d deliveries", *res.ReceiptsSeen, *res.Delivered)
	}
	if res.P99Ms == nil || res.ServerCPUUsPerMsg == nil {
		t.Errorf("missing latency or CPU figures")
	}
	// Every accepted message waited for a WAL fsync of the server's.
	if res.ServerWALFsyncs == nil || *res.ServerWALFsyncs == 0 || res.ServerWALFsyncsSlow == nil || res.ServerWALFsyncMeanMs == nil || *res.ServerWALFsyncMeanMs <= 0 {
		t.Errorf("missing WAL fsync figures: %v, %v, %v", res.ServerWALFsyncs, res.ServerWALFsyncsSlow, res.ServerWALFsyncMeanMs)
	}
}

// TestDisk measures writes and syncs in a directory, and leaves nothing
// behind in it.
func TestDisk(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	res := runOK(t, "disk", Options{Dir: dir, Duration: 300 * time.Millisecond, Log: testLog{t}}, 0)
	if res.DiskSyncs == nil || *res.DiskSyncs == 0 || res.DiskSyncsPerSec == nil || *res.DiskSyncsPerSec <= 0 {
		t.Errorf("no syncs: %v, %v", res.DiskSyncs, res.DiskSyncsPerSec)
	}
	if res.P50Ms == nil || res.MaxMs == nil || *res.P50Ms > *res.MaxMs || res.DiskStalls == nil {
		t.Errorf("latency figures p50 %v max %v stalls %v", res.P50Ms, res.MaxMs, res.DiskStalls)
	}
	if ents, err := os.ReadDir(dir); err != nil || len(ents) != 0 {
		t.Errorf("left in %s: %v (%v)", dir, ents, err)
	}
}

// TestWALFsyncsFromMetrics reads the slow-fsync count from a histogram
// as the server writes it: above the largest bound not over 100 ms.
func TestWALFsyncsFromMetrics(t *testing.T) {
	m := map[string]float64{
		`courier_mailbox_wal_fsync_seconds_bucket{le="0.043865333106187024"}`: 90,
		`courier_mailbox_wal_fsync_seconds_bucket{le="0.09527111042761806"}`:  95,
		`courier_mailbox_wal_fsync_seconds_bucket{le="0.17718749304469372"}`:  98,
		`courier_mailbox_wal_fsync_seconds_bucket{le="+Inf"}`:                 100,
		`courier_mailbox_wal_fsync_seconds_count`:                             100,
	}
	if n, slow := walFsyncs(m); n != 100 || slow != 5 {
		t.Errorf("walFsyncs = %v, %v; want 100, 5", n, slow)
	}
	if n, slow := walFsyncs(map[string]float64{"go_goroutines": 3}); n != -1 || slow != -1 {
		t.Errorf("without the histogram: %v, %v", n, slow)
	}
}

// TestPairsRemoteServer runs against a server given by URL (an in-process
// one here), whose figures come from its /metrics.
func TestPairsRemoteServer(t *testing.T) {
	t.Parallel()
	s := servertest.Start(t)
	res := runOK(t, "pairs", Options{Server: s.URL, Pairs: 2, Rate: 200, Duration: time.Second, Log: testLog{t}}, 0)
	if *res.Delivered == 0 {
		t.Error("nothing delivered")
	}
	if res.ServerCPUSeconds == nil {
		t.Error("no server CPU figure from /metrics")
	}
}

// TestFanout runs both ways of reaching the devices: one group send per
// round (the default), and K 1:1 sends.
func TestFanout(t *testing.T) {
	t.Parallel()
	for _, via := range []string{ViaGroup, ViaDirect} {
		t.Run(via, func(t *testing.T) {
			t.Parallel()
			o := childOptions(t)
			o.K, o.Duration, o.Via = 8, 300*time.Millisecond, via
			res := runOK(t, "fanout", o, 0)
			if *res.Rounds == 0 || *res.Delivered != *res.Rounds*8 || *res.Accepted != *res.Delivered {
				t.Errorf("%d delivered, %d accepted in %d rounds of 8", *res.Delivered, *res.Accepted, *res.Rounds)
			}
			if *res.ReceiptsSeen != *res.Delivered {
				t.Errorf("receipts %d for %d deliveries", *res.ReceiptsSeen, *res.Delivered)
			}
			if !strings.Contains(res.Params, "via="+via) || res.LastDeliveryP99 == nil || res.ServerCPUUsPerMsg == nil {
				t.Errorf("params %q, last delivery p99 %v, CPU per message %v", res.Params, res.LastDeliveryP99, res.ServerCPUUsPerMsg)
			}
			// The group's creation is told to all 9 members' devices, as
			// GROUP_UPDATEs that are neither messages nor lost.
			if got := res.Counters["group_updates_acked"]; (via == ViaGroup) != (got >= 9) {
				t.Errorf("group updates acked: %d", got)
			}
		})
	}
}

// TestFanoutGroupLimit: a server whose member limit is below the group
// the bench needs says so, and how to raise it.
func TestFanoutGroupLimit(t *testing.T) {
	t.Parallel()
	s := servertest.Start(t) // the default limit
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	_, err := Run(ctx, "fanout", Options{Server: s.URL, K: 1100, Log: testLog{t}})
	if err == nil || !strings.Contains(err.Error(), "--max-group-members") {
		t.Errorf("fanout of 1100 against a server allowing 1024 members: %v", err)
	}
}

func TestDrain(t *testing.T) {
	t.Parallel()
	o := childOptions(t)
	o.Pending = 300
	res := runOK(t, "drain", o, 0)
	if *res.Delivered != 300 || res.DrainMs == nil {
		t.Errorf("delivered %d, drain %v", *res.Delivered, res.DrainMs)
	}
}

// TestTransportEpoll runs pairs and a drain against a child server on the
// epoll transport (Options.Transport, `--transport`).
func TestTransportEpoll(t *testing.T) {
	t.Parallel()
	o := childOptions(t)
	o.Transport = "epoll"
	o.Pairs, o.Inflight, o.Duration = 3, 4, time.Second
	res := runOK(t, "pairs", o, 0)
	if !strings.Contains(res.Server, "--transport epoll") {
		t.Errorf("server %q: not started with --transport epoll", res.Server)
	}
	if *res.Delivered == 0 || *res.ReceiptsSeen != *res.Delivered {
		t.Errorf("delivered %d, receipts %d", *res.Delivered, *res.ReceiptsSeen)
	}
	o.Pending = 300
	res = runOK(t, "drain", o, 0)
	if *res.Delivered != 300 || res.DrainMs == nil {
		t.Errorf("drain: delivered %d, drain %v", *res.Delivered, res.DrainMs)
	}
}

// TestServerProcs runs pairs against a child server limited to one core
// (Options.ServerProcs, `--server-procs`), and checks that the server
// reports running with it. The bench runs on one event loop
// (Options.Pollers, `--pollers`), and reports it.
func TestServerProcs(t *testing.T) {
	t.Parallel()
	o := childOptions(t)
	o.ServerProcs = 1
	o.Pollers = 1
	o.Pairs, o.Inflight, o.Duration = 2, 2, time.Second
	res := runOK(t, "pairs", o, 0)
	if !strings.Contains(res.Server, "GOMAXPROCS=1 ") {
		t.Errorf("server %q: not started with GOMAXPROCS=1", res.Server)
	}
	if res.ServerProcs == nil || *res.ServerProcs != 1 {
		t.Errorf("server_procs %v, want 1", res.ServerProcs)
	}
	if res.BenchPollers == nil || *res.BenchPollers != 1 {
		t.Errorf("bench_pollers %v, want 1", res.BenchPollers)
	}
	if *res.Delivered == 0 || *res.ReceiptsSeen != *res.Delivered {
		t.Errorf("delivered %d, receipts %d", *res.Delivered, *res.ReceiptsSeen)
	}
}

func TestStormRestart(t *testing.T) {
	t.Parallel()
	o := childOptions(t)
	o.N, o.Duration = 10, 60*time.Second
	res := runOK(t, "storm", o, 0)
	if res.BackDrainedMs == nil || *res.Redelivered != 10 {
		t.Errorf("back and drained %v, redelivered %v", res.BackDrainedMs, res.Redelivered)
	}
}

func TestBadOptions(t *testing.T) {
	if _, err := Run(context.Background(), "nope", Options{Server: "http://127.0.0.1:1"}); err == nil || !strings.Contains(err.Error(), "unknown scenario") {
		t.Errorf("unknown scenario: %v", err)
	}
	if _, err := Run(context.Background(), "pairs", Options{Server: "http://127.0.0.1:1", Size: 8}); err == nil {
		t.Error("size 8 accepted")
	}
	if _, err := Run(context.Background(), "pairs", Options{Server: "ftp://x"}); err == nil {
		t.Error("ftp URL accepted")
	}
	if _, err := Run(context.Background(), "pairs", Options{ServerCmd: []string{"false"}, Transport: "threads"}); err == nil || !strings.Contains(err.Error(), "--transport") {
		t.Errorf("unknown transport: %v", err)
	}
	if _, err := Run(context.Background(), "fanout", Options{Server: "http://127.0.0.1:1", Via: "carrier-pigeon"}); err == nil || !strings.Contains(err.Error(), "--via") {
		t.Errorf("unknown --via: %v", err)
	}
	if _, err := Run(context.Background(), "pairs", Options{Server: "http://127.0.0.1:1", Transport: "epoll"}); err == nil || !strings.Contains(err.Error(), "child server only") {
		t.Errorf("--transport with --server: %v", err)
	}
	if _, err := Run(context.Background(), "pairs", Options{Server: "http://127.0.0.1:1", ServerProcs: 1}); err == nil || !strings.Contains(err.Error(), "child server only") {
		t.Errorf("--server-procs with --server: %v", err)
	}
	if _, err := Run(context.Background(), "pairs", Options{ServerCmd: []string{"false"}, ServerProcs: -1}); err == nil || !strings.Contains(err.Error(), "--server-procs") {
		t.Errorf("--server-procs -1: %v", err)
	}
	if _, err := Run(context.Background(), "pairs", Options{ServerCmd: []string{"false"}, Pollers: -1}); err == nil || !strings.Contains(err.Error(), "--pollers") {
		t.Errorf("--pollers -1: %v", err)
	}
	if _, err := Run(context.Background(), "disk", Options{Server: "http://127.0.0.1:1"}); err == nil || !strings.Contains(err.Error(), "--server") {
		t.Errorf("disk with --server: %v", err)
	}
	if _, err := Run(context.Background(), "disk", Options{Dir: filepath.Join(t.TempDir(), "missing")}); err == nil || !strings.Contains(err.Error(), "--dir") {
		t.Errorf("disk in a missing directory: %v", err)
	}
	notDir := filepath.Join(t.TempDir(), "file")
	os.WriteFile(notDir, nil, 0o600)
	if _, err := Run(context.Background(), "disk", Options{Dir: notDir}); err == nil || !strings.Contains(err.Error(), "not a directory") {
		t.Errorf("disk in a file: %v", err)
	}
	// Nothing listens on port 1: account creation fails with an error,
	// not a hang or a result.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := Run(ctx, "pairs", Options{Server: "http://127.0.0.1:1", Pairs: 1}); err == nil {
		t.Error("run against no server succeeded")
	}
}

func TestWireHelpers(t *testing.T) {
	p := appendPayload(nil, 7<<32|9, 1234, 64)
	if len(p) != 64 {
		t.Fatalf("payload length %d", len(p))
	}
	if k, ts, ok := parsePayload(p); !ok || k != 7<<32|9 || ts != 1234 {
		t.Errorf("parsePayload = %x %d %v", k, ts, ok)
	}
	if _, _, ok := parsePayload(p[:10]); ok {
		t.Error("short payload parsed")
	}
	// A masked frame round-trips through the parser (which unmasks), in
	// two pieces to exercise the partial-frame buffer.
	for _, n := range []int{0, 5, 125, 126, 300, 70000} {
		msg, err := proto.Marshal(&pb.ServerFrame{Body: &pb.ServerFrame_Error{Error: &pb.Error{
			Code: pb.ErrorCode_ERROR_CODE_INTERNAL, Message: strings.Repeat("x", n), RetryAfterMs: int64(n + 1)}}})
		if err != nil {
			t.Fatal(err)
		}
		f := appendFrame(nil, opBinary, msg)
		c := &client{r: &run{lat: newLatencies(), counters: map[string]int64{}}}
		c.parseLocked(f[:len(f)/2])
		if c.rbuf == nil {
			t.Errorf("frame of %d: half a frame not kept", len(msg))
		}
		c.parseLocked(f[len(f)/2:])
		if c.r.counters["error_ERROR_CODE_INTERNAL"] != 1 || c.hintMs.Load() != int64(n+1) || c.rbuf != nil {
			t.Errorf("frame of %d: counters %v hint %d rbuf %d", len(msg), c.r.counters, c.hintMs.Load(), len(c.rbuf))
		}
	}
	// A text frame is a protocol error.
	c := &client{r: &run{lat: newLatencies(), counters: map[string]int64{}}}
	c.parseLocked(appendFrame(nil, opText, []byte("hi")))
	if c.r.counters["protocol_errors"] != 1 {
		t.Errorf("text frame: counters %v", c.r.counters)
	}
}

func TestLedger(t *testing.T) {
	var l ledger
	s := l.newStream()
	n0, n1 := l.take(s), l.take(s)
	l.markAccepted(s, n0)
	l.markAccepted(s, n1)
	l.markAccepted(s, n1) // a duplicate Accepted counts once
	if l.accepted.Load() != 2 {
		t.Fatalf("accepted %d", l.accepted.Load())
	}
	if !l.markDelivered(uint64(s.id)<<32|uint64(n0), 1) {
		t.Fatal("first delivery not first")
	}
	if got := l.lost(false); got != 1 {
		t.Errorf("lost %d, want 1", got)
	}
	l.markDelivered(uint64(s.id)<<32|uint64(n0), 1) // same connection: duplicate
	l.markDelivered(uint64(s.id)<<32|uint64(n0), 2) // new connection, not acked: redelivery
	l.markConfirmed(uint64(s.id)<<32 | uint64(n0))
	l.markDelivered(uint64(s.id)<<32|uint64(n0), 3) // after a confirmed ack: duplicate
	l.markDelivered(uint64(s.id)<<32|99, 1)         // never sent
	if l.duplicates.Load() != 2 || l.redelivered.Load() != 1 || l.unexpected.Load() != 1 {
		t.Errorf("duplicates %d redelivered %d unexpected %d", l.duplicates.Load(), l.redelivered.Load(), l.unexpected.Load())
	}
	if got := l.lost(true); got != 1 {
		t.Errorf("lost (confirm) %d, want 1", got)
	}
}

func TestBackoffMirrorsSDK(t *testing.T) {
	b := backoff{min: 250 * time.Millisecond, max: 30 * time.Second}
	for attempt, ceiling := range []time.Duration{250 * time.Millisecond, 500 * time.Millisecond, time.Second, 2 * time.Second} {
		for range 200 {
			if d := b.delay(attempt, 0); d < 0 || d > ceiling {
				t.Fatalf("attempt %d: delay %v outside [0, %v]", attempt, d, ceiling)
			}
		}
	}
	for range 200 {
		if d := b.delay(20, 0); d > 30*time.Second {
			t.Fatalf("delay %v above the cap", d)
		}
		if d := b.delay(0, 4*time.Second); d < 4*time.Second || d > 6*time.Second {
			t.Fatalf("hint 4s: delay %v outside [4s, 6s]", d)
		}
	}
}

// TestGroupLedger: a group message is one payload for every member, and
// each receiving device accounts for it in its own stream; GROUP_UPDATEs
// are acked and never counted as messages.
func TestGroupLedger(t *testing.T) {
	r := &run{lat: newLatencies(), counters: map[string]int64{}}
	a := &client{r: r, epoch: 1, groupStream: r.ledger.newStream()}
	b := &client{r: r, epoch: 1, groupStream: r.ledger.newStream()}
	outsider := &client{r: r, epoch: 1}
	s := &sender{group: "g", fan: []*stream{a.groupStream, b.groupStream}}
	n := s.take(&r.ledger)
	s.accepted(&r.ledger, n)
	if r.ledger.sent.Load() != 2 || r.ledger.accepted.Load() != 2 {
		t.Fatalf("one group message to 2 devices: sent %d, accepted %d", r.ledger.sent.Load(), r.ledger.accepted.Load())
	}
	msg := func(seq uint64) *pb.Deliver {
		return &pb.Deliver{Seq: seq, Envelope: &pb.Envelope{Kind: pb.EnvelopeKind_ENVELOPE_KIND_MESSAGE, Group: "g",
			Payload: appendPayload(nil, uint64(n), time.Now().UnixNano(), payloadHeader)}}
	}
	a.deliverLocked(msg(1))
	if got := r.ledger.lost(false); got != 1 {
		t.Errorf("delivered to one of two: lost %d, want 1", got)
	}
	b.deliverLocked(msg(1))
	a.deliverLocked(msg(2)) // again on the same connection
	outsider.deliverLocked(msg(1))
	a.deliverLocked(&pb.Deliver{Seq: 3, Envelope: &pb.Envelope{Kind: pb.EnvelopeKind_ENVELOPE_KIND_GROUP_UPDATE, Group: "g",
		GroupUpdate: &pb.GroupUpdate{Group: "g", Version: 2}}})
	l := &r.ledger
	if l.delivered.Load() != 2 || l.duplicates.Load() != 1 || l.unexpected.Load() != 1 || l.lost(false) != 0 {
		t.Errorf("delivered %d duplicates %d unexpected %d lost %d", l.delivered.Load(), l.duplicates.Load(), l.unexpected.Load(), l.lost(false))
	}
	if r.groupUpdates.Load() != 1 || len(a.acks) != 3 || a.acks[2] != 3 {
		t.Errorf("group updates %d; acks %v, want the update's seq 3 among them", r.groupUpdates.Load(), a.acks)
	}
}
