package gateway

import (
	"context"
	"fmt"
	"runtime"
	"testing"
	"time"

	"github.com/coder/websocket"
	"google.golang.org/protobuf/proto"

	"github.com/courier-im/courier/internal/delivery"
	"github.com/courier-im/courier/internal/ident"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

// A device may send many frames without waiting for the replies: the reader
// orders each send and moves on while earlier ones are still being made
// durable. Every send must be answered, with its own id, in frame order,
// and the messages must reach every addressed mailbox in the order they
// were sent, acks included in the flow.
func TestPipelinedSendsKeepOrder(t *testing.T) {
	fx := newFrameFixture(t)
	defer fx.close()
	c := newConn(fx.g, fx.alice, nil)
	const n = 3 * maxPipelined // more than fit: the reader must wait for room
	c.gr.out = make(chan *pb.ServerFrame, n+16)
	if !fx.g.register(c) {
		t.Fatal("gateway closed")
	}
	defer fx.g.unregister(c)
	defer c.cancel()

	// Another sender to the same mailboxes, so that appends interleave.
	bob := ident.Device{User: "bob", ID: 1}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range 50 {
			if _, err := fx.svc.Send(context.Background(), sendFrom(bob, fmt.Sprint("bob-", i))); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	for i := range n {
		f := &pb.ClientFrame{Id: uint64(i + 1), Body: &pb.ClientFrame_Send{Send: &pb.Send{ClientMsgId: fmt.Sprint("m", i), To: "bob",
			Payloads: []*pb.DevicePayload{
				{Device: &pb.DeviceAddress{User: "bob", Device: 1}, Payload: []byte("for bob")},
				{Device: &pb.DeviceAddress{User: "alice", Device: 2}, Payload: []byte("for alice.2")},
			}}}}
		if i%10 == 5 { // an ack now and then, of nothing delivered: answered Ok
			f = &pb.ClientFrame{Id: uint64(i + 1), Body: &pb.ClientFrame_Ack{Ack: &pb.Ack{Seqs: []uint64{1 << 40}}}}
		}
		data, err := proto.Marshal(f)
		if err != nil {
			t.Fatal(err)
		}
		c.startFrame(websocket.MessageBinary, data)
	}
	c.pipe.wait()
	<-done
	for i := range n {
		r := <-c.gr.out
		if r.Id != uint64(i+1) {
			t.Fatalf("reply %d has id %d: replies out of frame order", i+1, r.Id)
		}
		if i%10 == 5 {
			if r.GetOk() == nil {
				t.Fatalf("ack %d: %v", r.Id, r)
			}
		} else if r.GetAccepted() == nil || r.GetAccepted().Duplicate {
			t.Fatalf("send %d: %v", r.Id, r)
		}
	}
	for _, d := range []ident.Device{{User: "bob", ID: 1}, {User: "alice", ID: 2}} {
		entries, err := fx.mb.Read(context.Background(), d, 0, 10*n)
		if err != nil {
			t.Fatal(err)
		}
		next := 0
		for _, e := range entries {
			var env pb.Envelope
			if err := proto.Unmarshal(e.Data, &env); err != nil {
				t.Fatal(err)
			}
			if env.Sender != "alice" {
				continue
			}
			for next%10 == 5 {
				next++
			}
			if env.ClientMsgId != fmt.Sprint("m", next) {
				t.Fatalf("%v: message %s where m%d was due: mailbox order differs from frame order", d, env.ClientMsgId, next)
			}
			next++
		}
		if next < n-1 {
			t.Fatalf("%v: %d of alice's messages found", d, next)
		}
	}
}

// sendFrom is a message from dev to alice's two devices.
func sendFrom(dev ident.Device, id string) delivery.SendRequest {
	return delivery.SendRequest{From: dev, ClientMsgID: id, To: "alice", Payloads: []delivery.Payload{
		{Device: ident.Device{User: "alice", ID: 1}, Data: []byte("hi")},
		{Device: ident.Device{User: "alice", ID: 2}, Data: []byte("hi")},
	}}
}

// acquire waits while maxPipelined frames are in the pipeline, takes the
// place a finished tail frees, and gives up once the connection closes,
// whether it was waiting then or comes later.
func TestPipelineAcquireWaitsAndGivesUpOnClose(t *testing.T) {
	var p pipeline
	for range maxPipelined {
		if !p.acquire() {
			t.Fatal("acquire failed with room in the pipeline")
		}
	}
	got := make(chan bool, 1)
	go func() { got <- p.acquire() }()
	// The waiter has reached its wait once the condition variable exists.
	deadline := time.Now().Add(10 * time.Second)
	for {
		p.mu.Lock()
		waiting := p.cond != nil
		p.mu.Unlock()
		if waiting {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("acquire did not wait with the pipeline full")
		}
		runtime.Gosched()
	}
	select {
	case ok := <-got:
		t.Fatalf("acquire returned %v with the pipeline full", ok)
	default:
	}
	// One tail finishes: its place goes to the waiter.
	if p.then(func() {}) {
		go p.run(nil)
	}
	if !<-got {
		t.Fatal("acquire gave up although a place was freed")
	}
	p.wait()
	// Full again: a waiter gives up when the connection closes.
	go func() { got <- p.acquire() }()
	p.close()
	if <-got {
		t.Fatal("acquire took a place in a closed pipeline")
	}
	if p.acquire() {
		t.Fatal("acquire after close took a place")
	}
}
