package delivery_test

import (
	"context"
	"fmt"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/accounts/cache"
	"github.com/courier-im/courier/internal/accounts/sqlite"
	"github.com/courier-im/courier/internal/auth/authtest"
	"github.com/courier-im/courier/internal/delivery"
	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox"
	"github.com/courier-im/courier/internal/mailbox/pebble"
	"github.com/courier-im/courier/internal/metrics"
	pb "github.com/courier-im/courier/proto/courier/v1"
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

// BenchmarkGroupSend measures Service.Send of one group message, durable
// on a real disk, to a group of a sender and members other users of one
// device each: the storing half of a group fan-out (the devices are told
// by a notifier that does nothing). One op is one group send; the group
// is in SQLite, as on a single node, and the device lists in the device
// cache, as the server serves them.
//
//	go test -run '^$' -bench GroupSend -benchmem ./internal/delivery/
func BenchmarkGroupSend(b *testing.B) {
	for _, members := range []int{256, 1024} {
		b.Run(fmt.Sprintf("members=%d", members), func(b *testing.B) { benchGroupSend(b, members) })
	}
}

// benchGroup makes a group of members+1 users ("m0", its creator, and
// m1…), each with one device, in a SQLite store, and returns the device
// lists, the group store, the group and the members' names.
func benchGroup(b *testing.B, members int) (*authtest.Store, *sqlite.Store, accounts.Group, []string) {
	ctx := context.Background()
	accts := authtest.New()
	gs, err := sqlite.Open(filepath.Join(b.TempDir(), "accounts.db"), sqlite.Options{MaxGroupMembers: members + 1})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { gs.Close() })
	names := make([]string, members)
	for i := range members + 1 {
		name := fmt.Sprint("m", i)
		if _, _, err := accts.Register(name); err != nil {
			b.Fatal(err)
		}
		if _, _, err := gs.CreateUser(ctx, name, "", []byte{1}); err != nil {
			b.Fatal(err)
		}
		if i > 0 {
			names[i-1] = name
		}
	}
	ch, err := gs.CreateGroup(ctx, "m0", names)
	if err != nil {
		b.Fatal(err)
	}
	return accts, gs, ch.Group, names
}

func benchGroupSend(b *testing.B, members int) {
	ctx := context.Background()
	accts, gs, group, _ := benchGroup(b, members)
	mb, err := pebble.Open(b.TempDir(), pebble.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer mb.Close()
	devs, err := cache.New(accts, cache.Options{})
	if err != nil {
		b.Fatal(err)
	}
	svc := delivery.New(delivery.Config{Mailbox: mb, Accounts: devs, Groups: gs, Notifier: nopNotifier{},
		Metrics: metrics.New(prometheus.NewRegistry())})
	from := ident.Device{User: "m0", ID: 1}
	payload := make([]byte, 64)
	b.ReportAllocs()
	b.ResetTimer()
	for n := range b.N {
		if _, err := svc.Send(ctx, delivery.SendRequest{From: from, ClientMsgID: fmt.Sprint(n), Group: group.ID,
			GroupVersion: group.Version, Payload: payload}); err != nil {
			b.Fatal(err)
		}
	}
}

// singleAcks is the Pebble store without its ManyDeleteAppender: every
// ack is a write of its own, as before acks were combined.
type singleAcks struct {
	mailbox.Store
	mailbox.Sequencer
	mailbox.DeleteAppender
}

// BenchmarkGroupAcks measures the acks of one group message by all of its
// 1,024 members' devices at once (each acks from its own goroutine, as
// connections do), each ack a write with its DELIVERED receipt to the
// sender, on a Pebble store on disk (fsync'd): combined into shared writes
// (the store's StartDeleteAppendMany) or one write each. ns/ack is the
// wall time of a round over its 1,024 acks.
//
//	go test -run '^$' -bench GroupAcks -benchtime 20x ./internal/delivery/
func BenchmarkGroupAcks(b *testing.B) {
	for _, combined := range []bool{false, true} {
		name := "single"
		if combined {
			name = "combined"
		}
		b.Run(name, func(b *testing.B) { benchGroupAcks(b, 1024, combined) })
	}
}

func benchGroupAcks(b *testing.B, members int, combined bool) {
	ctx := context.Background()
	accts, gs, group, names := benchGroup(b, members)
	mb, err := pebble.Open(b.TempDir(), pebble.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer mb.Close()
	var store mailbox.Store = mb
	if !combined {
		store = singleAcks{mb, mb, mb}
	}
	svc := delivery.New(delivery.Config{Mailbox: store, Accounts: accts, Groups: gs, Notifier: nopNotifier{},
		Metrics: metrics.New(prometheus.NewRegistry())})
	from := ident.Device{User: "m0", ID: 1}
	payload := make([]byte, 64)
	b.ReportAllocs()
	b.ResetTimer()
	var acking time.Duration
	for n := range b.N {
		b.StopTimer()
		acc, err := svc.Send(ctx, delivery.SendRequest{From: from, ClientMsgID: fmt.Sprint(n), Group: group.ID,
			GroupVersion: group.Version, Payload: payload})
		if err != nil {
			b.Fatal(err)
		}
		env := &pb.Envelope{Kind: pb.EnvelopeKind_ENVELOPE_KIND_MESSAGE, ServerId: acc.ServerID, Sender: "m0", SenderDevice: 1,
			ClientMsgId: fmt.Sprint(n), Group: group.ID}
		start := make(chan struct{})
		var wg sync.WaitGroup
		for _, name := range names {
			wg.Go(func() {
				<-start
				// Each member's device holds one entry per message sent.
				d := []delivery.Delivered{{Seq: uint64(n + 1), Envelope: env}}
				if err := svc.Ack(ctx, ident.Device{User: name, ID: 1}, d); err != nil {
					b.Error(err)
				}
			})
		}
		b.StartTimer()
		t0 := time.Now()
		close(start)
		wg.Wait()
		acking += time.Since(t0)
	}
	b.ReportMetric(float64(acking.Nanoseconds())/float64(b.N*members), "ns/ack")
}
