package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/courier-im/courier/internal/bench"
)

const benchUsage = `usage: courier bench SCENARIO [flags]

Measures a courier server over its real protocol and checks that nothing is
lost or duplicated. Without --server it starts a child 'courier serve' on
embedded defaults in a temporary directory (its RSS and CPU come from /proc).

scenarios:
  conns    hold N authenticated idle connections (-n) with heartbeats
  pairs    M sender/receiver pairs (--pairs), closed loop (--inflight) or --rate
  fanout   one sender to K online devices (-k): one group send per round to a
           group of the sender and K users (--via group), or K 1:1 sends
           (--via direct)
  drain    a device with P pending messages (--pending) connects
  storm    N connected devices (-n) all dropped at once reconnect with backoff
  disk     no server: how long a write and fdatasync take in --dir, the wait
           every accepted message has (a disk whose syncs stall bounds the
           latency tail of any durable server on it)

flags:
`

func runBench(ctx context.Context, args []string) error {
	if len(args) > 0 && args[0] == "conns-worker" { // hidden: a conns worker process
		return bench.RunWorker(ctx, os.Stdin, os.Stdout)
	}
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), benchUsage)
		fs.PrintDefaults()
	}
	if len(args) == 0 || strings.HasPrefix(args[0], "-") {
		fs.Usage()
		return flag.ErrHelp
	}
	scenario := args[0]
	var o bench.Options
	fs.StringVar(&o.Server, "server", "", "base `URL` of the server under test (default: start a child courier serve)")
	fs.StringVar(&o.Transport, "transport", "", "the child server's gateway `transport`: goroutine or epoll (default: its own default, or $COURIER_TRANSPORT)")
	fs.IntVar(&o.ServerProcs, "server-procs", 0, "the child server's GOMAXPROCS: `cores` its Go code may use at once (default: the runtime's, every core or $GOMAXPROCS)")
	fs.IntVar(&o.Pollers, "pollers", 0, "event `loops` for the bench's own connections (default: one per core; 1 leaves more of a small machine to the server)")
	fs.DurationVar(&o.Duration, "duration", 0, "measured phase (default 10s; storm: longest wait for all back, default 60s)")
	jsonOut := fs.Bool("json", false, "print one JSON object instead of a table")
	fs.IntVar(&o.N, "n", 1000, "conns, storm: connections")
	fs.IntVar(&o.Pairs, "pairs", 100, "pairs: sender/receiver pairs")
	fs.IntVar(&o.Inflight, "inflight", 1, "pairs: sends in flight per sender (closed loop)")
	fs.IntVar(&o.Size, "size", 64, "payload `bytes` (at least 16)")
	fs.Float64Var(&o.Rate, "rate", 0, "pairs: fixed total sends per second instead of a closed loop")
	fs.IntVar(&o.K, "k", 1024, "fanout: online receiving devices")
	fs.StringVar(&o.Via, "via", bench.ViaGroup, "fanout: how the sender reaches them: group (one group send; a child server allows K+1 members) or direct (K 1:1 sends)")
	fs.IntVar(&o.Pending, "pending", 10000, "drain: pending messages")
	fs.DurationVar(&o.Ping, "ping", 30*time.Second, "heartbeat interval per connection")
	fs.IntVar(&o.PerProcess, "per-process", 18500, "conns: connections per bench process before worker processes are used")
	fs.IntVar(&o.DialConcurrency, "dial-concurrency", 64, "concurrent connection handshakes")
	fs.BoolVar(&o.StormClose, "storm-close", false, "storm: drop the connections from the bench's side instead of restarting the child server")
	fs.StringVar(&o.Dir, "dir", "", "disk: `directory` on the disk to measure (default: the temporary directory, where a child server keeps its data)")
	quiet := fs.Bool("quiet", false, "no progress lines on stderr")
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("finding this binary (to start the server and workers): %w", err)
	}
	o.ServerCmd = []string{exe}
	o.WorkerCmd = []string{exe}
	if !*quiet {
		o.Log = os.Stderr
	}
	res, err := bench.Run(ctx, scenario, o)
	if err != nil {
		return err
	}
	if *jsonOut {
		err = res.WriteJSON(os.Stdout)
	} else {
		err = res.WriteTable(os.Stdout)
	}
	if err != nil {
		return err
	}
	want := int64(0)
	if scenario == "conns" {
		want = int64(o.N)
	}
	return res.OK(want)
}
