package pebble

import (
	"fmt"
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox"
)

// benchStore opens a store on a real disk: in $COURIER_BENCH_DIR if set
// (to measure a particular device), else in the test's temporary directory.
func benchStore(b *testing.B) *Store {
	b.Helper()
	dir := b.TempDir()
	if base := os.Getenv("COURIER_BENCH_DIR"); base != "" {
		var err error
		if dir, err = os.MkdirTemp(base, "mailbox-bench-"); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { os.RemoveAll(dir) })
	}
	s, err := Open(dir, Options{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { s.Close() })
	return s
}

// payload is the size of a typical encrypted envelope.
var payload = make([]byte, 256)

// BenchmarkAppend measures durable (fsynced) appends: one op is one
// Append of a batch. With several writers, Pebble's group commit shares
// each WAL sync among the batches waiting for it.
func BenchmarkAppend(b *testing.B) {
	type layout struct {
		name string
		// dev returns the device of item j of writer w's batches.
		dev func(w, j int) ident.Device
	}
	own := layout{"own-devices", func(w, j int) ident.Device {
		return ident.Device{User: fmt.Sprintf("user%d", w), ID: uint32(j + 1)}
	}}
	// Every writer appends to the same devices, as senders to one busy
	// group chat do: seq allocation for those devices is contended.
	shared := layout{"shared-devices", func(w, j int) ident.Device {
		return ident.Device{User: "group", ID: uint32(j + 1)}
	}}
	for _, batch := range []int{1, 64} {
		for _, writers := range []int{1, 64} {
			layouts := []layout{own}
			if writers > 1 {
				layouts = append(layouts, shared)
			}
			for _, l := range layouts {
				name := fmt.Sprintf("batch=%d/writers=%d", batch, writers)
				if writers > 1 {
					name += "/" + l.name
				}
				b.Run(name, func(b *testing.B) {
					benchAppend(b, batch, writers, l.dev)
				})
			}
		}
	}
}

func benchAppend(b *testing.B, batch, writers int, dev func(w, j int) ident.Device) {
	s := benchStore(b)
	var next atomic.Int64
	var wg sync.WaitGroup
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	for w := range writers {
		wg.Go(func() {
			items := make([]mailbox.Item, batch)
			for j := range items {
				items[j] = mailbox.Item{Device: dev(w, j), Data: payload}
			}
			for next.Add(1) <= int64(b.N) {
				if _, err := s.Append(ctx, mailbox.Batch{Items: items}); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start).Seconds()
	b.StopTimer()
	b.ReportMetric(float64(b.N)/elapsed, "appends/s")
	b.ReportMetric(float64(b.N*batch)/elapsed, "entries/s")
}

// fill appends n entries to d in batches.
func fill(b *testing.B, s *Store, d ident.Device, n int) {
	b.Helper()
	for n > 0 {
		items := make([]mailbox.Item, min(n, 256))
		for i := range items {
			items[i] = mailbox.Item{Device: d, Data: payload}
		}
		if _, err := s.Append(ctx, mailbox.Batch{Items: items}); err != nil {
			b.Fatal(err)
		}
		n -= len(items)
	}
}

// BenchmarkRead measures reading pages of 100 entries from a mailbox of
// 10,000.
func BenchmarkRead(b *testing.B) {
	const held, page = 10000, 100
	s := benchStore(b)
	d := ident.Device{User: "reader", ID: 1}
	fill(b, s, d, held)
	rng := rand.New(rand.NewPCG(1, 2))
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	for b.Loop() {
		es, err := s.Read(ctx, d, uint64(rng.IntN(held-page)), page)
		if err != nil || len(es) != page {
			b.Fatalf("Read = %d entries, %v", len(es), err)
		}
	}
	elapsed := time.Since(start).Seconds()
	b.ReportMetric(float64(b.N*page)/elapsed, "entries/s")
}

// BenchmarkDelete measures acknowledging entries one at a time, oldest
// first, as a device working through its backlog does.
func BenchmarkDelete(b *testing.B) {
	s := benchStore(b)
	d := ident.Device{User: "acker", ID: 1}
	fill(b, s, d, b.N)
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	for i := range b.N {
		got, err := s.Delete(ctx, d, []uint64{uint64(i + 1)})
		if err != nil || len(got) != 1 {
			b.Fatalf("Delete = %d entries, %v", len(got), err)
		}
	}
	elapsed := time.Since(start).Seconds()
	b.ReportMetric(float64(b.N)/elapsed, "deletes/s")
}

// BenchmarkAppendSend measures appends shaped like the server's: one
// 64-byte entry with an idempotency key (a send) or two entries without
// (a DELIVERED receipt to two devices), from many concurrent writers, as
// 100 connected senders make them. One op is one Append.
//
//	go test -run '^$' -bench AppendSend -benchtime 20000x -count 6 ./internal/mailbox/pebble/
func BenchmarkAppendSend(b *testing.B) {
	small := make([]byte, 64)
	for _, writers := range []int{1, 16, 100} {
		b.Run(fmt.Sprintf("writers=%d", writers), func(b *testing.B) {
			s := benchStore(b)
			var next atomic.Int64
			var wg sync.WaitGroup
			b.ReportAllocs()
			b.ResetTimer()
			start := time.Now()
			for w := range writers {
				wg.Go(func() {
					to := ident.Device{User: fmt.Sprintf("r%d", w), ID: 1}
					back := []mailbox.Item{
						{Device: ident.Device{User: fmt.Sprintf("s%d", w), ID: 1}, Data: small},
						{Device: ident.Device{User: fmt.Sprintf("s%d", w), ID: 2}, Data: small},
					}
					for {
						n := next.Add(1)
						if n > int64(b.N) {
							return
						}
						batch := mailbox.Batch{Key: fmt.Sprint("send/", w, "/", n), Receipt: small[:20], Items: []mailbox.Item{{Device: to, Data: small}}}
						if n%2 == 0 {
							batch = mailbox.Batch{Items: back}
						}
						if _, err := s.Append(ctx, batch); err != nil {
							b.Error(err)
							return
						}
					}
				})
			}
			wg.Wait()
			b.StopTimer()
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "appends/s")
		})
	}
}

// BenchmarkAck measures acknowledgements shaped like the server's: one
// 64-byte entry acked, giving a DELIVERED receipt to the sender's two
// devices, from concurrent ackers. "two-ops" is the receipt's Append then
// the Delete (what internal/delivery does on a store without
// mailbox.DeleteAppender); "delete-append" is one StartDeleteAppend and its
// Wait. One op is one ack.
//
//	go test -run '^$' -bench Ack -benchtime 20000x -count 6 ./internal/mailbox/pebble/
func BenchmarkAck(b *testing.B) {
	small := make([]byte, 64)
	for _, mode := range []string{"two-ops", "delete-append"} {
		for _, writers := range []int{1, 16} {
			b.Run(fmt.Sprintf("%s/writers=%d", mode, writers), func(b *testing.B) {
				s := benchStore(b)
				per := b.N/writers + 1
				for w := range writers {
					d := ident.Device{User: fmt.Sprintf("r%d", w), ID: 1}
					for left := per; left > 0; {
						items := make([]mailbox.Item, min(left, 256))
						for i := range items {
							items[i] = mailbox.Item{Device: d, Data: small}
						}
						if _, err := s.Append(ctx, mailbox.Batch{Items: items}); err != nil {
							b.Fatal(err)
						}
						left -= len(items)
					}
				}
				var wg sync.WaitGroup
				b.ReportAllocs()
				commits, fsyncs, cpu := s.groupsCommitted.Load(), walFsyncs(b, s), cpuTime(b)
				b.ResetTimer()
				start := time.Now()
				for w := range writers {
					wg.Go(func() {
						d := ident.Device{User: fmt.Sprintf("r%d", w), ID: 1}
						back := []mailbox.Item{
							{Device: ident.Device{User: fmt.Sprintf("s%d", w), ID: 1}, Data: small},
							{Device: ident.Device{User: fmt.Sprintf("s%d", w), ID: 2}, Data: small},
						}
						then := func([]mailbox.Entry) ([]mailbox.Item, error) { return back, nil }
						// Each acker takes its share of b.N, acking its
						// device's entries oldest first.
						share := uint64(b.N / writers)
						if w < b.N%writers {
							share++
						}
						for seq := uint64(1); seq <= share; seq++ {
							if err := benchAckOne(s, mode, d, seq, back, then); err != nil {
								b.Error(err)
								return
							}
						}
					})
				}
				wg.Wait()
				b.StopTimer()
				b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "acks/s")
				b.ReportMetric(float64(cpuTime(b)-cpu)/float64(time.Microsecond)/float64(b.N), "cpu-µs/op")
				b.ReportMetric(float64(s.groupsCommitted.Load()-commits)/float64(b.N), "commits/op")
				b.ReportMetric(float64(walFsyncs(b, s)-fsyncs)/float64(b.N), "fsyncs/op")
			})
		}
	}
}

func benchAckOne(s *Store, mode string, d ident.Device, seq uint64, back []mailbox.Item, then func([]mailbox.Entry) ([]mailbox.Item, error)) error {
	if mode == "two-ops" {
		if _, err := s.Append(ctx, mailbox.Batch{Items: back}); err != nil {
			return err
		}
		got, err := s.Delete(ctx, d, []uint64{seq})
		if err == nil && len(got) != 1 {
			err = fmt.Errorf("Delete(%d) removed %d entries", seq, len(got))
		}
		return err
	}
	got, p, err := s.StartDeleteAppend(ctx, mailbox.DeleteAppend{Device: d, Seqs: []uint64{seq}, Then: then})
	if err != nil {
		return err
	}
	if len(got) != 1 {
		return fmt.Errorf("StartDeleteAppend(%d) removed %d entries", seq, len(got))
	}
	_, err = p.Wait(ctx)
	return err
}

// cpuTime is the CPU time (user and system) the process has used so far,
// background goroutines included.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// walFsyncs is the number of WAL fsyncs Pebble has made.
func walFsyncs(b *testing.B, s *Store) uint64 {
	var m dto.Metric
	if err := s.db.Metrics().LogWriter.FsyncLatency.Write(&m); err != nil {
		b.Fatal(err)
	}
	return m.GetHistogram().GetSampleCount()
}

// BenchmarkMessageCycle measures the mailbox work of one 1:1 message as
// the server does it, per message: the send's durable append with its
// idempotency key, the receiver's ack (the entry's delete and the
// DELIVERED receipt to the sender, one batch), and the sender's ack of the
// receipt (a plain delete). Pairs of devices run concurrently, so the
// appends share fsyncs as the server's do; the run is long enough for
// memtable flushes and compactions to take their share. cpu-µs/msg is the
// whole process's CPU time per message.
func BenchmarkMessageCycle(b *testing.B) {
	for _, pairs := range []int{64} {
		b.Run(fmt.Sprintf("pairs=%d", pairs), func(b *testing.B) {
			s := benchStore(b)
			body := make([]byte, 120) // an envelope of a 64-byte payload
			receipt := make([]byte, 60)
			var keys atomic.Uint64
			var wg sync.WaitGroup
			b.ReportAllocs()
			cpu := cpuTime(b)
			m0 := s.db.Metrics()
			b.ResetTimer()
			start := time.Now()
			for p := range pairs {
				wg.Go(func() {
					snd := ident.Device{User: fmt.Sprintf("sender%d", p), ID: 1}
					rcv := ident.Device{User: fmt.Sprintf("receiver%d", p), ID: 1}
					back := []mailbox.Item{{Device: snd, Data: receipt}}
					then := func([]mailbox.Entry) ([]mailbox.Item, error) { return back, nil }
					share := b.N / pairs
					if p < b.N%pairs {
						share++
					}
					for range share {
						key := fmt.Sprintf("%s/%d/%016x", snd.User, snd.ID, keys.Add(1)*0x9e3779b97f4a7c15)
						res, err := s.Append(ctx, mailbox.Batch{Key: key, KeyIsNew: true, Items: []mailbox.Item{{Device: rcv, Data: body}}})
						if err != nil {
							b.Error(err)
							return
						}
						got, pend, err := s.StartDeleteAppend(ctx, mailbox.DeleteAppend{Device: rcv, Seqs: res.Seqs, Then: then})
						if err == nil && len(got) != 1 {
							err = fmt.Errorf("ack removed %d entries", len(got))
						}
						if err != nil {
							b.Error(err)
							return
						}
						r, err := pend.Wait(ctx)
						if err != nil {
							b.Error(err)
							return
						}
						if got, err := s.Delete(ctx, snd, r.Seqs); err != nil || len(got) != 1 {
							b.Errorf("receipt ack: %d entries, %v", len(got), err)
							return
						}
					}
				})
			}
			wg.Wait()
			b.StopTimer()
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "msgs/s")
			b.ReportMetric(float64(cpuTime(b)-cpu)/float64(time.Microsecond)/float64(b.N), "cpu-µs/msg")
			// What every message puts through the WAL and the memtable,
			// and so through the flushes: steadier than CPU time, which
			// this VM measures with ±20 % noise.
			m1 := s.db.Metrics()
			b.ReportMetric(float64(m1.WAL.BytesIn-m0.WAL.BytesIn)/float64(b.N), "wal-B/msg")
			b.ReportMetric(float64(m1.Flush.Count-m0.Flush.Count)*1e5/float64(b.N), "flushes/100k-msgs")
		})
	}
}
