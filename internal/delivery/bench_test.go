package delivery_test

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/courier-im/courier/internal/auth/authtest"
	"github.com/courier-im/courier/internal/delivery"
	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox/pebble"
	"github.com/courier-im/courier/internal/metrics"
)

type nopNotifier struct{}

func (nopNotifier) Notify(ident.Device) {}

// BenchmarkSendFanout measures Service.Send, durable on a real disk, of a
// 64-byte payload to every device of a recipient with K devices (the
// fan-out of one message), from 1 or 16 concurrent senders. One op is one
// send; the account store is in memory, so this is the mailbox and the
// envelope encoding.
//
//	go test -run '^$' -bench SendFanout -benchmem -count 6 ./internal/delivery/
func BenchmarkSendFanout(b *testing.B) {
	for _, devices := range []int{1, 32} {
		for _, senders := range []int{1, 16} {
			b.Run(fmt.Sprintf("devices=%d/senders=%d", devices, senders), func(b *testing.B) {
				benchSend(b, devices, senders)
			})
		}
	}
}

func benchSend(b *testing.B, devices, senders int) {
	ctx := context.Background()
	accts := authtest.New()
	for range devices {
		if _, _, err := accts.Register("bob"); err != nil {
			b.Fatal(err)
		}
	}
	for i := range senders {
		if _, _, err := accts.Register(fmt.Sprint("s", i)); err != nil {
			b.Fatal(err)
		}
	}
	mb, err := pebble.Open(b.TempDir(), pebble.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer mb.Close()
	svc := delivery.New(delivery.Config{Mailbox: mb, Accounts: accts, Notifier: nopNotifier{},
		Metrics: metrics.New(prometheus.NewRegistry())})
	payloads := make([]delivery.Payload, devices)
	for i := range payloads {
		payloads[i] = delivery.Payload{Device: ident.Device{User: "bob", ID: uint32(i + 1)}, Data: make([]byte, 64)}
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	b.ReportAllocs()
	b.ResetTimer()
	for w := range senders {
		wg.Go(func() {
			from := ident.Device{User: fmt.Sprint("s", w), ID: 1}
			for {
				n := next.Add(1)
				if n > int64(b.N) {
					return
				}
				if _, err := svc.Send(ctx, delivery.SendRequest{From: from, ClientMsgID: fmt.Sprint(n), To: "bob", Payloads: payloads}); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
}
