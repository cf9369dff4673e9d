package server_test

import (
	"fmt"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/courier-im/courier/internal/servertest"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

// BenchmarkAcceptToDeliver measures the whole server: senders send
// 64-byte payloads over their WebSockets (inflight messages in flight each,
// a new one sent for each Accepted, which comes only once the message is
// fsync'd), receivers ack what is delivered, delivery receipts flow back to
// the senders, who ack them too. It reports delivered messages per second,
// the send→deliver latency, and the CPU time the process (server and load
// generator together) used per message.
//
//	go test -run '^$' -bench AcceptToDeliver -benchtime 20000x ./internal/server/
func BenchmarkAcceptToDeliver(b *testing.B) {
	for _, c := range []struct{ pairs, inflight int }{{1, 1}, {16, 1}, {64, 1}, {100, 1}, {100, 8}} {
		b.Run(fmt.Sprintf("pairs=%d/inflight=%d", c.pairs, c.inflight), func(b *testing.B) {
			benchPairs(b, c.pairs, c.inflight)
		})
	}
}

// cpuTime is the CPU time (user and system) the process has used.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func benchPairs(b *testing.B, pairs, inflight int) {
	s := servertest.Start(b)
	senders := make([]*wsClient, pairs)
	receivers := make([]*wsClient, pairs)
	for i := range pairs {
		a := register(b, s.URL, fmt.Sprint("s", i))
		r := register(b, s.URL, fmt.Sprint("r", i))
		senders[i], receivers[i] = dial(b, s.URL, a), dial(b, s.URL, r)
		senders[i].until(isSynced)
		receivers[i].until(isSynced)
	}
	per := make([]int, pairs)
	for i := range b.N {
		per[i%pairs]++
	}
	var mu sync.Mutex
	sentAt := map[string]time.Time{}
	lat := make([]time.Duration, 0, b.N)
	var wg sync.WaitGroup
	b.ResetTimer()
	start, cpu0 := time.Now(), cpuTime(b)
	for i := range pairs {
		wg.Add(2)
		go func() { // receiver
			defer wg.Done()
			c := receivers[i]
			for got := 0; got < per[i]; {
				f := c.next(30 * time.Second)
				d := f.GetDeliver()
				if d == nil {
					continue
				}
				now := time.Now()
				mu.Lock()
				lat = append(lat, now.Sub(sentAt[d.Envelope.ClientMsgId]))
				mu.Unlock()
				c.write(&pb.ClientFrame{Body: &pb.ClientFrame_Ack{Ack: &pb.Ack{Seqs: []uint64{d.Seq}}}})
				got++
			}
		}()
		go func() { // sender
			defer wg.Done()
			c := senders[i]
			to := fmt.Sprint("r", i)
			payload := make([]byte, 64)
			sent := 0
			send := func() {
				id := fmt.Sprint(i, "-", sent)
				sent++
				mu.Lock()
				sentAt[id] = time.Now()
				mu.Unlock()
				c.write(&pb.ClientFrame{Id: c.nextID.Add(1), Body: &pb.ClientFrame_Send{Send: &pb.Send{ClientMsgId: id, To: to,
					Payloads: []*pb.DevicePayload{{Device: dev(to, 1), Payload: payload}}}}})
			}
			for sent < min(inflight, per[i]) {
				send()
			}
			for accepted := 0; accepted < per[i]; {
				f := c.next(30 * time.Second)
				if d := f.GetDeliver(); d != nil { // a receipt: ack it
					c.write(&pb.ClientFrame{Body: &pb.ClientFrame_Ack{Ack: &pb.Ack{Seqs: []uint64{d.Seq}}}})
					continue
				}
				if f.Id == 0 {
					continue
				}
				if f.GetAccepted() == nil {
					b.Errorf("send: %v", f)
				}
				accepted++
				if sent < per[i] {
					send()
				}
			}
		}()
	}
	wg.Wait()
	elapsed, cpu := time.Since(start), cpuTime(b)-cpu0
	b.StopTimer()
	slices.Sort(lat)
	q := func(p float64) float64 { return float64(lat[int(p*float64(len(lat)-1))].Microseconds()) / 1000 }
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "msgs/s")
	b.ReportMetric(q(0.50), "p50_ms")
	b.ReportMetric(q(0.99), "p99_ms")
	b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu_us/msg")
}
