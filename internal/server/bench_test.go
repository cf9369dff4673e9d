package server_test

import (
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/courier-im/courier/internal/servertest"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

// BenchmarkAcceptToDeliver measures the whole server: senders send over
// their WebSockets (one message in flight each, waiting for Accepted, which
// comes only once the message is fsync'd), receivers ack what is delivered,
// delivery receipts flow back to the senders, who ack them too. It reports
// delivered messages per second and the send→deliver latency.
//
//	go test -run '^$' -bench AcceptToDeliver -benchtime 20000x ./internal/server/
func BenchmarkAcceptToDeliver(b *testing.B) {
	for _, pairs := range []int{1, 16, 64} {
		b.Run(fmt.Sprintf("pairs=%d", pairs), func(b *testing.B) {
			benchPairs(b, pairs)
		})
	}
}

func benchPairs(b *testing.B, pairs int) {
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
	start := time.Now()
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
			for n := range per[i] {
				id := fmt.Sprint(i, "-", n)
				mu.Lock()
				sentAt[id] = time.Now()
				mu.Unlock()
				fid := c.nextID.Add(1)
				c.write(&pb.ClientFrame{Id: fid, Body: &pb.ClientFrame_Send{Send: &pb.Send{ClientMsgId: id, To: to,
					Payloads: []*pb.DevicePayload{{Device: dev(to, 1), Payload: payload}}}}})
				for {
					f := c.next(30 * time.Second)
					if d := f.GetDeliver(); d != nil { // a receipt: ack it
						c.write(&pb.ClientFrame{Body: &pb.ClientFrame_Ack{Ack: &pb.Ack{Seqs: []uint64{d.Seq}}}})
						continue
					}
					if f.Id == fid {
						if f.GetAccepted() == nil {
							b.Errorf("send: %v", f)
						}
						break
					}
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	slices.Sort(lat)
	q := func(p float64) float64 { return float64(lat[int(p*float64(len(lat)-1))].Microseconds()) / 1000 }
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "msgs/s")
	b.ReportMetric(q(0.50), "p50_ms")
	b.ReportMetric(q(0.99), "p99_ms")
}
