// Command mqtt-pairs measures an MQTT broker the way `courier bench pairs`
// measures courier: M sender/receiver pairs, QoS 1, a closed loop of K
// publishes in flight per sender (or a fixed total rate), for T seconds;
// delivered/s, send→deliver latency p50/p99/p99.9, lost and duplicates,
// and, given the broker's pid, its CPU per message from /proc.
//
// It exists so that the reference figures issue 4 compares courier with
// (mosquitto, nats-server's MQTT) can be measured on the same machine, on
// the same day, as courier's own: on a shared VM whose speed changes by
// ±40 % from hour to hour, only figures taken side by side compare.
//
//	mosquitto -c CONF &   # e.g. listener 18830 127.0.0.1, persistence false
//	go run ./cmd/mqtt-pairs --broker tcp://127.0.0.1:18830 --pid $(pgrep -n mosquitto) --pairs 100 --inflight 8
//
// A sender counts a message accepted on its PUBACK; a receiver records the
// delivery (the payload carries the message's id and send time) and the
// client library then sends the broker its PUBACK. Lost is accepted but
// never delivered by the end of a drain wait.
package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/HdrHistogram/hdrhistogram-go"
	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/courier-im/courier/internal/bench"
)

type options struct {
	broker   string
	pid      int
	pairs    int
	inflight int
	size     int
	rate     float64
	duration time.Duration
	json     bool
}

func main() {
	var o options
	flag.StringVar(&o.broker, "broker", "tcp://127.0.0.1:1883", "the broker's `URL`")
	flag.IntVar(&o.pid, "pid", 0, "the broker's process id, for its CPU per message (0: not measured)")
	flag.IntVar(&o.pairs, "pairs", 100, "sender/receiver pairs")
	flag.IntVar(&o.inflight, "inflight", 8, "publishes in flight per sender (closed loop)")
	flag.IntVar(&o.size, "size", 64, "payload `bytes` (at least 16)")
	flag.Float64Var(&o.rate, "rate", 0, "fixed total publishes per second instead of a closed loop")
	flag.DurationVar(&o.duration, "duration", 10*time.Second, "measured phase")
	flag.BoolVar(&o.json, "json", false, "print one JSON object")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	res, err := run(ctx, o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "mqtt-pairs:", err)
		os.Exit(1)
	}
	if o.json {
		b, _ := json.Marshal(res)
		fmt.Println(string(b))
	} else {
		b, _ := json.MarshalIndent(res, "", "  ")
		fmt.Println(string(b))
	}
	if res.Lost != 0 || res.Duplicates != 0 {
		os.Exit(1)
	}
}

type result struct {
	Broker            string   `json:"broker"`
	Params            string   `json:"params"`
	DurationSec       float64  `json:"duration_sec"`
	Accepted          int64    `json:"accepted"`
	Delivered         int64    `json:"delivered"`
	AcceptedPerSec    float64  `json:"accepted_per_sec"`
	DeliveredPerSec   float64  `json:"delivered_per_sec"`
	P50Ms             float64  `json:"p50_ms"`
	P99Ms             float64  `json:"p99_ms"`
	P999Ms            float64  `json:"p999_ms"`
	MaxMs             float64  `json:"max_ms"`
	Lost              int64    `json:"lost"`
	Duplicates        int64    `json:"duplicates"`
	ServerCPUUsPerMsg *float64 `json:"server_cpu_us_per_msg"`
	BenchCPUUsPerMsg  *float64 `json:"bench_cpu_us_per_msg"`
	Skipped           int64    `json:"rate_skipped_saturated,omitempty"`
}

// pair is one sender and its receiver, on a topic of their own.
type pair struct {
	topic    string
	send     mqtt.Client
	recv     mqtt.Client
	next     atomic.Uint64 // message ids, from 1
	inflight atomic.Int64
	tally    tally
}

// tally is one pair's ledger: which messages were accepted (PUBACKed) and
// delivered, in whichever order the two were seen.
type tally struct {
	mu       sync.Mutex
	accepted map[uint64]bool // id → delivered
	early    map[uint64]bool // delivered before its PUBACK was seen
	dups     int64
}

func newTally() tally { return tally{accepted: map[uint64]bool{}, early: map[uint64]bool{}} }

// accept records id's PUBACK.
func (t *tally) accept(id uint64) {
	t.mu.Lock()
	if t.early[id] {
		delete(t.early, id)
		t.accepted[id] = true
	} else {
		t.accepted[id] = false
	}
	t.mu.Unlock()
}

// deliver records id's delivery and reports whether it was the first.
func (t *tally) deliver(id uint64) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	switch done, ok := t.accepted[id]; {
	case ok && done, !ok && t.early[id]:
		t.dups++
		return false
	case ok:
		t.accepted[id] = true
	default:
		t.early[id] = true
	}
	return true
}

// lost counts accepted messages not delivered; duplicates, deliveries
// seen again.
func (t *tally) lost() (lost, duplicates int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, done := range t.accepted {
		if !done {
			lost++
		}
	}
	return lost, t.dups
}

func run(ctx context.Context, o options) (*result, error) {
	if o.size < 16 {
		return nil, fmt.Errorf("--size %d: at least 16 bytes (message id and send time)", o.size)
	}
	if o.pairs < 1 || o.inflight < 1 {
		return nil, errors.New("--pairs and --inflight: at least 1")
	}
	runID := strconv.FormatInt(time.Now().UnixNano(), 36)
	hist := hdrhistogram.New(1, int64(10*time.Minute/time.Microsecond), 3)
	var histMu sync.Mutex
	var delivered atomic.Int64
	pairs := make([]*pair, o.pairs)
	connect := func(id string, onLost func()) (mqtt.Client, error) {
		co := mqtt.NewClientOptions().AddBroker(o.broker).SetClientID(id).SetCleanSession(true).
			SetAutoReconnect(false).SetConnectTimeout(10 * time.Second).SetOrderMatters(true).
			SetMaxResumePubInFlight(o.inflight).SetConnectionLostHandler(func(mqtt.Client, error) { onLost() })
		c := mqtt.NewClient(co)
		t := c.Connect()
		if !t.WaitTimeout(15*time.Second) || t.Error() != nil {
			return nil, fmt.Errorf("connecting %s to %s: %v", id, o.broker, t.Error())
		}
		return c, nil
	}
	var connLost atomic.Int64
	lost := func() { connLost.Add(1) }
	for i := range pairs {
		p := &pair{topic: fmt.Sprintf("courier-bench/%s/%d", runID, i), tally: newTally()}
		pairs[i] = p
		var err error
		if p.recv, err = connect(fmt.Sprintf("r%s-%d", runID, i), lost); err != nil {
			return nil, err
		}
		if p.send, err = connect(fmt.Sprintf("s%s-%d", runID, i), lost); err != nil {
			return nil, err
		}
		t := p.recv.Subscribe(p.topic, 1, func(_ mqtt.Client, m mqtt.Message) {
			b := m.Payload()
			if len(b) < 16 {
				return
			}
			id := binary.BigEndian.Uint64(b)
			sent := time.Unix(0, int64(binary.BigEndian.Uint64(b[8:])))
			us := max(time.Since(sent).Microseconds(), 1)
			histMu.Lock()
			_ = hist.RecordValue(us)
			histMu.Unlock()
			if p.tally.deliver(id) {
				delivered.Add(1)
			}
		})
		if !t.WaitTimeout(15*time.Second) || t.Error() != nil {
			return nil, fmt.Errorf("subscribing %s: %v", p.topic, t.Error())
		}
	}
	defer func() {
		for _, p := range pairs {
			p.send.Disconnect(100)
			p.recv.Disconnect(100)
		}
	}()

	var accepted atomic.Int64
	publish := func(p *pair) {
		id := p.next.Add(1)
		payload := make([]byte, o.size)
		binary.BigEndian.PutUint64(payload, id)
		binary.BigEndian.PutUint64(payload[8:], uint64(time.Now().UnixNano()))
		p.inflight.Add(1)
		t := p.send.Publish(p.topic, 1, false, payload)
		t.WaitTimeout(30 * time.Second)
		p.inflight.Add(-1)
		if t.Error() != nil {
			return
		}
		accepted.Add(1)
		p.tally.accept(id)
	}

	cpu0, bench0 := bench.ProcessCPU(o.pid), bench.ProcessCPU(os.Getpid())
	start := time.Now()
	phase, cancel := context.WithTimeout(ctx, o.duration)
	defer cancel()
	var wg sync.WaitGroup
	var skipped atomic.Int64
	if o.rate <= 0 {
		for _, p := range pairs {
			for range o.inflight {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for phase.Err() == nil {
						publish(p)
					}
				}()
			}
		}
	} else {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tick := time.NewTicker(time.Millisecond)
			defer tick.Stop()
			var issued int64
			for {
				select {
				case <-phase.Done():
					return
				case now := <-tick.C:
					for due := int64(o.rate*now.Sub(start).Seconds()) - issued; due > 0; due-- {
						p := pairs[issued%int64(len(pairs))]
						issued++
						if p.inflight.Load() >= 64 {
							skipped.Add(1)
							continue
						}
						wg.Add(1)
						go func() { defer wg.Done(); publish(p) }()
					}
				}
			}
		}()
	}
	<-phase.Done()
	elapsed := time.Since(start).Seconds()
	cpu1, bench1 := bench.ProcessCPU(o.pid), bench.ProcessCPU(os.Getpid())
	nDelivered := delivered.Load()
	wg.Wait()
	// Drain: wait for every accepted message to arrive.
	deadline := time.Now().Add(30 * time.Second)
	for delivered.Load() < accepted.Load() && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	res := &result{
		Broker:          o.broker,
		Params:          fmt.Sprintf("pairs=%d inflight=%d size=%d rate=%v qos=1", o.pairs, o.inflight, o.size, o.rate),
		DurationSec:     elapsed,
		Accepted:        accepted.Load(),
		Delivered:       delivered.Load(),
		AcceptedPerSec:  float64(accepted.Load()) / elapsed,
		DeliveredPerSec: float64(nDelivered) / elapsed,
		Skipped:         skipped.Load(),
	}
	histMu.Lock()
	res.P50Ms = float64(hist.ValueAtQuantile(50)) / 1000
	res.P99Ms = float64(hist.ValueAtQuantile(99)) / 1000
	res.P999Ms = float64(hist.ValueAtQuantile(99.9)) / 1000
	res.MaxMs = float64(hist.Max()) / 1000
	histMu.Unlock()
	for _, p := range pairs {
		l, d := p.tally.lost()
		res.Lost += l
		res.Duplicates += d
	}
	if cpu0 >= 0 && cpu1 >= 0 && nDelivered > 0 {
		v := (cpu1 - cpu0) * 1e6 / float64(nDelivered)
		res.ServerCPUUsPerMsg = &v
	}
	if bench0 >= 0 && bench1 >= 0 && nDelivered > 0 {
		v := (bench1 - bench0) * 1e6 / float64(nDelivered)
		res.BenchCPUUsPerMsg = &v
	}
	if n := connLost.Load(); n > 0 {
		return res, fmt.Errorf("%d connections lost during the run", n)
	}
	return res, nil
}
