package gateway

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/coder/websocket"
	"google.golang.org/protobuf/proto"

	"github.com/courier-im/courier/internal/delivery"
	"github.com/courier-im/courier/internal/ident"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

// TestBatchedWritesOverSockets drives a real connection on each transport,
// where frames are written in batches (evwrite.go, cork.go): the pending
// entries come before Synced, a pipelined burst of sends is answered
// once each, in frame order, even when its last frame asks for no reply
// (id 0: the batch must still be written), and a ping sent after the
// burst is answered.
func TestBatchedWritesOverSockets(t *testing.T) {
	for _, transport := range []string{TransportGoroutine, TransportEpoll} {
		t.Run(transport, func(t *testing.T) {
			fx := newSocketFixture(t, transport, 0, false)
			svc, alice := fx.svc, fx.alice

			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			bob := ident.Device{User: "bob", ID: 1}
			const pending = 150 // more than one mailbox read
			for i := range pending {
				if _, err := svc.Send(ctx, delivery.SendRequest{From: bob, ClientMsgID: fmt.Sprint("p", i), To: "alice",
					Payloads: []delivery.Payload{{Device: alice, Data: []byte("pending")}}}); err != nil {
					t.Fatal(err)
				}
			}

			ws := fx.dial(ctx, t)
			write := func(f *pb.ClientFrame) {
				t.Helper()
				b, err := proto.Marshal(f)
				if err != nil {
					t.Fatal(err)
				}
				if err := ws.Write(ctx, websocket.MessageBinary, b); err != nil {
					t.Fatal(err)
				}
			}
			read := func() *pb.ServerFrame { t.Helper(); return readFrame(ctx, t, ws) }
			if read().GetHello() == nil {
				t.Fatal("first frame is not Hello")
			}
			var seqs []uint64
			for {
				f := read()
				if s := f.GetSynced(); s != nil {
					if s.Pending != pending {
						t.Errorf("Synced.pending = %d, want %d", s.Pending, pending)
					}
					break
				}
				d := f.GetDeliver()
				if d == nil {
					t.Fatalf("before Synced: %v", f)
				}
				if len(seqs) > 0 && d.Seq <= seqs[len(seqs)-1] {
					t.Fatalf("seq %d after %d", d.Seq, seqs[len(seqs)-1])
				}
				seqs = append(seqs, d.Seq)
				if len(seqs)%64 == 0 { // open the window as a client does
					write(&pb.ClientFrame{Id: 0, Body: &pb.ClientFrame_Ack{Ack: &pb.Ack{Seqs: seqs[len(seqs)-64:]}}})
				}
			}
			if len(seqs) != pending {
				t.Fatalf("%d entries before Synced, want %d", len(seqs), pending)
			}

			const burst = 40
			for i := range burst + 1 {
				id := uint64(1000 + i)
				if i == burst {
					id = 0 // no reply wanted
				}
				write(&pb.ClientFrame{Id: id, Body: &pb.ClientFrame_Send{Send: &pb.Send{ClientMsgId: fmt.Sprint("b", i), To: "bob",
					Payloads: []*pb.DevicePayload{{Device: &pb.DeviceAddress{User: "bob", Device: 1}, Payload: []byte("hi")}}}}})
			}
			for i := range burst {
				f := read()
				if f.GetAccepted() == nil || f.Id != uint64(1000+i) {
					t.Fatalf("reply %d: %v, want Accepted for %d", i, f, 1000+i)
				}
			}
			write(&pb.ClientFrame{Id: 7, Body: &pb.ClientFrame_Ping{Ping: &pb.Ping{ClientTimeMs: 1}}})
			for {
				f := read()
				if f.GetPong() != nil && f.Id == 7 {
					break
				}
				if f.GetDeliver() == nil { // delivery receipts may come first
					t.Fatalf("waiting for Pong: %v", f)
				}
			}
		})
	}
}
