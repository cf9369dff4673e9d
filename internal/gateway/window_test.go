package gateway

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/coder/websocket"
	"google.golang.org/protobuf/proto"

	"github.com/courier-im/courier/internal/delivery"
	"github.com/courier-im/courier/internal/ident"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

// TestWindowRefillsOnAck fills a device's window (4 entries) over and
// over: a sender stores 200 messages while the device acks what it has
// in batches of random size, some while the window is full and some
// while it is not. Every message must arrive, once and in order: the pump
// stops on a full window and only an ack that finds it stopped there
// wakes it (windowStillFull), so an ack that made room unseen would leave
// the rest waiting for good.
func TestWindowRefillsOnAck(t *testing.T) {
	for _, transport := range []string{TransportGoroutine, TransportEpoll} {
		t.Run(transport, func(t *testing.T) {
			const window = 4
			fx := newSocketFixture(t, transport, window, true)
			svc, alice := fx.svc, fx.alice
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			ws := fx.dial(ctx, t)
			read := func() *pb.ServerFrame { t.Helper(); return readFrame(ctx, t, ws) }
			if read().GetHello() == nil {
				t.Fatal("first frame is not Hello")
			}
			if read().GetSynced() == nil {
				t.Fatal("second frame is not Synced")
			}

			const total = 200
			bob := ident.Device{User: "bob", ID: 1}
			sent := make(chan error, 1)
			go func() {
				for i := range total {
					if _, err := svc.Send(ctx, delivery.SendRequest{From: bob, ClientMsgID: fmt.Sprint("w/", i), To: "alice",
						Payloads: []delivery.Payload{{Device: alice, Data: []byte(fmt.Sprint(i))}}}); err != nil {
						sent <- err
						return
					}
				}
				sent <- nil
			}()

			rng := rand.New(rand.NewPCG(1, uint64(len(transport))))
			var unacked []uint64
			var last uint64
			got := 0
			for got < total {
				f := read()
				if f.GetOk() != nil || f.GetSynced() != nil {
					continue
				}
				d := f.GetDeliver()
				if d == nil {
					t.Fatalf("unexpected frame %v", f)
				}
				if d.Seq <= last || string(d.Envelope.GetPayload()) != fmt.Sprint(got) {
					t.Fatalf("delivery %d: seq %d (after %d), payload %q", got, d.Seq, last, d.Envelope.GetPayload())
				}
				last = d.Seq
				got++
				unacked = append(unacked, d.Seq)
				// Ack a random part of what is held: 1 to all of it.
				if k := 1 + rng.IntN(len(unacked)); rng.IntN(3) > 0 || len(unacked) == window {
					b, err := proto.Marshal(&pb.ClientFrame{Id: d.Seq, Body: &pb.ClientFrame_Ack{Ack: &pb.Ack{Seqs: unacked[:k]}}})
					if err != nil {
						t.Fatal(err)
					}
					if err := ws.Write(ctx, websocket.MessageBinary, b); err != nil {
						t.Fatal(err)
					}
					unacked = append(unacked[:0], unacked[k:]...)
				}
			}
			if err := <-sent; err != nil {
				t.Fatal(err)
			}
		})
	}
}
