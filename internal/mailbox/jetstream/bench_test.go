package jetstream

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox"
	"github.com/nats-io/nats.go"
)

// BenchmarkAppend measures durable appends to an R1 stream on an
// in-process server with sync_interval: always (what courier requires) and
// with the server's default (fsync every 2 minutes), for batches of 1 and 8
// items (each to its own device) from 1 and 64 concurrent appenders. It
// reports appends/s (batches) and items/s (256-byte items); these appends
// carry no key.
// BenchmarkAppendKeyed does the same with an idempotency key.
func BenchmarkAppend(b *testing.B)      { benchAppend(b, false) }
func BenchmarkAppendKeyed(b *testing.B) { benchAppend(b, true) }

func benchAppend(b *testing.B, keyed bool) {
	for _, always := range []bool{true, false} {
		syncName := "sync=always"
		if !always {
			syncName = "sync=default"
		}
		b.Run(syncName, func(b *testing.B) {
			srv := startServer(b, serverConfig{name: "bench", dir: b.TempDir(), port: -1, syncAlwy: always})
			defer srv.Shutdown()
			for _, batch := range []int{1, 8} {
				for _, conc := range []int{1, 64} {
					b.Run(fmt.Sprintf("batch=%d/appenders=%d", batch, conc), func(b *testing.B) {
						nc := connect(b, srv.ClientURL())
						defer nc.Close()
						runAppends(b, nc, 1, batch, conc, keyed)
					})
				}
			}
		})
	}
}

// BenchmarkAppendDurable is the send path as courier uses it: single-item
// appends to an R1 file stream with sync_interval: always, keyed (every
// send carries an idempotency key) and not, from 1, 16 and 64 concurrent
// appenders on one Store.
func BenchmarkAppendDurable(b *testing.B) {
	srv := startServer(b, serverConfig{name: "bench", dir: b.TempDir(), port: -1, syncAlwy: true})
	defer srv.Shutdown()
	for _, keyed := range []bool{true, false} {
		for _, conc := range []int{1, 16, 64} {
			b.Run(fmt.Sprintf("keyed=%v/appenders=%d", keyed, conc), func(b *testing.B) {
				nc := connect(b, srv.ClientURL())
				defer nc.Close()
				runAppends(b, nc, 1, 1, conc, keyed)
			})
		}
	}
}

// BenchmarkAppendR3 is BenchmarkAppend on an R3 stream of a 3-node
// in-process cluster (sync_interval: always on every node), keyed and not.
func BenchmarkAppendR3(b *testing.B) {
	c := startCluster(b, 3)
	for _, keyed := range []bool{false, true} {
		for _, batch := range []int{1, 8} {
			for _, conc := range []int{1, 64} {
				b.Run(fmt.Sprintf("keyed=%v/batch=%d/appenders=%d", keyed, batch, conc), func(b *testing.B) {
					runAppends(b, c.nc, 3, batch, conc, keyed)
				})
			}
		}
	}
}

func runAppends(b *testing.B, nc *nats.Conn, replicas, batch, conc int, keyed bool) {
	stream, prefix := uniqueNames()
	st := mustOpen(b, nc, Options{Stream: stream, SubjectPrefix: prefix, Replicas: replicas})
	defer st.Close()
	data := make([]byte, 256)
	var next atomic.Int64
	var failed atomic.Value
	var wg sync.WaitGroup
	b.ResetTimer()
	start := time.Now()
	for w := range conc {
		wg.Go(func() {
			items := make([]mailbox.Item, batch)
			for {
				i := next.Add(1)
				if i > int64(b.N) {
					return
				}
				for j := range items {
					items[j] = mailbox.Item{Device: ident.Device{User: fmt.Sprint("u", w), ID: uint32(j + 1)}, Data: data}
				}
				bt := mailbox.Batch{Items: items}
				if keyed {
					bt.Key = fmt.Sprint("k-", i)
				}
				if _, err := st.Append(context.Background(), bt); err != nil {
					failed.Store(err)
					return
				}
			}
		})
	}
	wg.Wait()
	el := time.Since(start)
	b.StopTimer()
	if err, _ := failed.Load().(error); err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(b.N)/el.Seconds(), "appends/s")
	b.ReportMetric(float64(b.N*batch)/el.Seconds(), "items/s")
}
