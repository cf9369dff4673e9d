package server_test

import (
	"context"
	"fmt"
	"os"
	"runtime/pprof"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"google.golang.org/protobuf/proto"

	"github.com/courier-im/courier/internal/gateway"
	"github.com/courier-im/courier/internal/server"
	"github.com/courier-im/courier/internal/servertest"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

// BenchmarkGroupFanout is the micro-benchmark of the group fan-out hot
// path: a sender and fanoutK receivers, all online over real WebSockets to
// an in-process server, are one group; each operation is one group send,
// and it ends when every receiver has the message (Accepted included).
// Receivers ack each delivery, and the sender acks the DELIVERED receipts
// that come back, as real clients do. It reports the time to the last
// delivery (p50, p99), the time to Accepted (p50: the copies are durable
// then) and the CPU time of the whole process (server and
// clients) per delivered copy. $COURIER_FANOUT_CPUPROFILE names a file
// for a CPU profile of the sends alone (-cpuprofile would also hold the
// set-up: 1025 registrations, the group's creation and its updates).
//
//	COURIER_FANOUT_CPUPROFILE=/tmp/fanout.prof go test -run '^$' -bench GroupFanout/transport=goroutine -benchtime 100x ./internal/server/
func BenchmarkGroupFanout(b *testing.B) {
	for _, tr := range []string{gateway.TransportGoroutine, gateway.TransportEpoll} {
		b.Run("transport="+tr, func(b *testing.B) { benchGroupFanout(b, tr, fanoutK) })
	}
}

// fanoutK is the group's receiving devices: the 1024.
const fanoutK = 1024

func benchGroupFanout(b *testing.B, transport string, k int) {
	s := servertest.Start(b, func(c *server.Config) {
		c.Transport = transport
		c.MaxGroupMembers = k + 1
		c.MaxConnsPerAddr = -1 // every client is on 127.0.0.1
	})
	owner := register(b, s.URL, "owner")
	recv := make([]account, k)
	var wg sync.WaitGroup
	next := atomic.Int64{}
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := int(next.Add(1) - 1); i < k; i = int(next.Add(1) - 1) {
				recv[i] = register(b, s.URL, "r"+strconv.Itoa(i))
			}
		}()
	}
	wg.Wait()
	if b.Failed() {
		return
	}
	var g groupJSON
	for i := 0; i < k; i += 500 {
		names := make([]string, 0, 500)
		for _, a := range recv[i:min(i+500, k)] {
			names = append(names, a.User)
		}
		var status, want int
		if i == 0 {
			status, want = doJSON(b, s.URL, "POST", "/v1/groups", owner, map[string]any{"members": names}, &g), 201
		} else {
			status, want = doJSON(b, s.URL, "POST", "/v1/groups/"+g.ID+"/members", owner, map[string]any{"users": names}, &g), 200
		}
		if status != want {
			b.Fatalf("group of %d members: status %d", i+len(names), status)
		}
	}

	stop := make(chan struct{})
	var stopOnce sync.Once
	halt := func() { stopOnce.Do(func() { close(stop) }) }
	defer halt()
	// got[n] counts the receivers that have message n; the receiver that
	// completes it records the time.
	rounds := b.N
	got := make([]atomic.Int64, rounds)
	lastAt := make([]atomic.Int64, rounds)
	complete := make(chan int, rounds)
	var synced sync.WaitGroup
	var readers sync.WaitGroup
	for _, a := range recv {
		c := dial(b, s.URL, a)
		synced.Add(1)
		readers.Add(1)
		go func() {
			defer readers.Done()
			up := false
			for {
				var f *pb.ServerFrame
				select {
				case f = <-c.frames:
				case <-c.done:
					return
				case <-stop:
					return
				}
				if f.GetSynced() != nil && !up {
					up = true
					synced.Done()
				}
				d := f.GetDeliver()
				if d == nil {
					continue
				}
				if !ackQuietly(c, d.Seq, stop) {
					return
				}
				if d.Envelope.GetKind() != pb.EnvelopeKind_ENVELOPE_KIND_MESSAGE {
					continue // the group's GROUP_UPDATEs
				}
				n, err := strconv.Atoi(d.Envelope.ClientMsgId)
				if err != nil || n < 0 || n >= rounds {
					b.Errorf("unexpected message %q", d.Envelope.ClientMsgId)
					continue
				}
				if got[n].Add(1) == int64(k) {
					lastAt[n].Store(time.Now().UnixNano())
					complete <- n
				}
			}
		}()
	}
	snd := dial(b, s.URL, owner)
	accepted := make(chan *pb.ServerFrame, 1)
	readers.Add(1)
	go func() { // the sender: acks receipts and group updates, passes Accepted on
		defer readers.Done()
		for {
			var f *pb.ServerFrame
			select {
			case f = <-snd.frames:
			case <-snd.done:
				return
			case <-stop:
				return
			}
			if d := f.GetDeliver(); d != nil {
				if !ackQuietly(snd, d.Seq, stop) {
					return
				}
				continue
			}
			if f.Id != 0 && f.GetOk() == nil {
				accepted <- f
			}
		}
	}()
	synced.Wait()
	time.Sleep(200 * time.Millisecond) // the acks of the group updates

	payload := make([]byte, 64)
	times := make([]time.Duration, 0, rounds)
	acceptedIn := make([]time.Duration, 0, rounds)
	if path := os.Getenv("COURIER_FANOUT_CPUPROFILE"); path != "" {
		f, err := os.Create(path)
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			b.Fatal(err)
		}
		defer pprof.StopCPUProfile()
	}
	b.ResetTimer()
	start, cpu0 := time.Now(), cpuTime(b)
	for n := range rounds {
		t0 := time.Now()
		snd.write(&pb.ClientFrame{Id: snd.nextID.Add(1), Body: &pb.ClientFrame_Send{Send: &pb.Send{
			ClientMsgId: strconv.Itoa(n), Group: g.ID, GroupVersion: g.Version, Payload: payload}}})
		select {
		case f := <-accepted:
			if f.GetAccepted() == nil {
				b.Fatalf("group send %d: %v", n, f)
			}
			acceptedIn = append(acceptedIn, time.Since(t0))
		case <-time.After(30 * time.Second):
			b.Fatalf("group send %d: no answer in 30 s", n)
		}
		select {
		case m := <-complete:
			if m != n {
				b.Fatalf("message %d complete during round %d", m, n)
			}
		case <-time.After(30 * time.Second):
			b.Fatalf("message %d: %d of %d receivers after 30 s", n, got[n].Load(), k)
		}
		times = append(times, time.Duration(lastAt[n].Load()-t0.UnixNano()))
	}
	elapsed, cpu := time.Since(start), cpuTime(b)-cpu0
	b.StopTimer()
	pprof.StopCPUProfile()
	halt()
	readers.Wait()
	slices.Sort(times)
	slices.Sort(acceptedIn)
	q := func(d []time.Duration, p float64) float64 { return float64(d[int(p*float64(len(d)-1))]) / 1e6 }
	b.ReportMetric(q(acceptedIn, 0.5), "accepted-p50-ms")
	b.ReportMetric(q(times, 0.5), "last-p50-ms")
	b.ReportMetric(q(times, 0.99), "last-p99-ms")
	b.ReportMetric(float64(rounds*k)/elapsed.Seconds(), "deliveries/s")
	b.ReportMetric(float64(cpu.Microseconds())/float64(rounds*k), "cpu-µs/delivery")
}

// ackQuietly acks seq; a write that fails once the benchmark is over is
// not an error. It reports whether the connection is still usable.
func ackQuietly(c *wsClient, seq uint64, stop <-chan struct{}) bool {
	data, err := proto.Marshal(&pb.ClientFrame{Body: &pb.ClientFrame_Ack{Ack: &pb.Ack{Seqs: []uint64{seq}}}})
	if err != nil {
		panic(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.ws.Write(ctx, websocket.MessageBinary, data); err != nil {
		select {
		case <-stop:
		default:
			c.t.Error(fmt.Errorf("%s: ack: %w", c.a.User, err))
		}
		return false
	}
	return true
}
