package gateway

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/coder/websocket"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"

	"github.com/courier-im/courier/internal/auth"
	"github.com/courier-im/courier/internal/auth/authtest"
	"github.com/courier-im/courier/internal/delivery"
	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox/pebble"
	"github.com/courier-im/courier/internal/metrics"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

// frameFixture is a gateway on in-memory backends (accounts in memory, a
// Pebble mailbox on an in-memory file system) with users alice (devices 1
// and 2) and bob, and messages from bob waiting in alice.1's mailbox so
// that acks have something to act on.
type frameFixture struct {
	accts *authtest.Store
	g     *Gateway
	svc   *delivery.Service
	mb    *pebble.Store
	alice ident.Device
	runs  int
	sent  int
}

func newFrameFixture(tb testing.TB) *frameFixture {
	tb.Helper()
	accts := authtest.New()
	for _, u := range []string{"alice", "alice", "bob"} {
		if _, _, err := accts.Register(u); err != nil {
			tb.Fatal(err)
		}
	}
	mb, err := pebble.Open("mailbox", pebble.Options{FS: vfs.NewMem()})
	if err != nil {
		tb.Fatal(err)
	}
	m := metrics.New(prometheus.NewRegistry())
	fx := &frameFixture{accts: accts, mb: mb, alice: ident.Device{User: "alice", ID: 1}}
	var n notifyTo
	fx.svc = delivery.New(delivery.Config{Mailbox: mb, Accounts: accts, Notifier: &n, Metrics: m})
	fx.g = New(Config{Accounts: accts, Mailbox: mb, Delivery: fx.svc, Auth: &auth.Authenticator{Accounts: accts},
		Metrics: m, WriteTimeout: time.Second})
	n.g = fx.g
	return fx
}

type notifyTo struct{ g *Gateway }

func (n *notifyTo) Notify(d ident.Device) { n.g.Notify(d) }

func (fx *frameFixture) close() {
	fx.g.Shutdown(context.Background())
	fx.mb.Close()
}

// refill keeps a few messages from bob waiting for alice.1.
func (fx *frameFixture) refill(tb testing.TB) {
	ctx := context.Background()
	entries, err := fx.mb.Read(ctx, fx.alice, 0, 16)
	if err != nil {
		tb.Fatal(err)
	}
	for i := len(entries); i < 16; i++ {
		fx.sent++
		_, err := fx.svc.Send(ctx, delivery.SendRequest{
			From: ident.Device{User: "bob", ID: 1}, ClientMsgID: fmt.Sprint("refill-", fx.sent), To: "alice",
			Payloads: []delivery.Payload{
				{Device: ident.Device{User: "alice", ID: 1}, Data: []byte("hello")},
				{Device: ident.Device{User: "alice", ID: 2}, Data: []byte("hello")},
			}})
		if err != nil {
			tb.Fatal(err)
		}
	}
}

// run hands one message to a fresh connection of alice.1, exactly as its
// reader would after reading it from the socket, and returns the frames the
// connection queued for its writer, and whether it closed itself.
func (fx *frameFixture) run(tb testing.TB, typ websocket.MessageType, data []byte) ([]*pb.ServerFrame, bool) {
	fx.refill(tb)
	c := newConn(fx.g, fx.alice, nil)
	// Room for every frame one client frame can cause (a Subscribe of
	// 1024 users answers with 1024 Presence frames), so that nothing needs
	// to drain the queue while the frame is handled.
	c.gr.out = make(chan *pb.ServerFrame, 4*maxWatching)
	if !fx.g.register(c) {
		tb.Fatal("gateway closed")
	}
	// Mark what is waiting as delivered on this connection, as the writer
	// does before it writes an entry.
	entries, err := fx.mb.Read(context.Background(), fx.alice, 0, 16)
	if err != nil {
		tb.Fatal(err)
	}
	for _, e := range entries {
		env := new(pb.Envelope)
		if err := proto.Unmarshal(e.Data, env); err != nil {
			tb.Fatal(err)
		}
		env.Payload = nil
		c.setInflight(e.Seq, env)
	}
	c.frame(typ, data)
	fx.g.unregister(c)
	c.cancel()
	var out []*pb.ServerFrame
	for len(c.gr.out) > 0 {
		out = append(out, <-c.gr.out)
	}
	return out, c.closing.Load()
}

// checkFrameReplies checks what the protocol promises about the replies to
// one client frame: the connection stays open; a frame with a non-zero id
// gets exactly one reply, with that id and of the right kind; a frame with
// id 0 gets no reply but Error{MALFORMED}; an undecodable frame gets exactly
// one Error{MALFORMED}; anything else is an event (Presence, Typing).
func checkFrameReplies(t testing.TB, typ websocket.MessageType, data []byte, out []*pb.ServerFrame, closed bool) {
	t.Helper()
	if closed {
		t.Fatalf("the connection closed itself on frame %x", data)
	}
	var f pb.ClientFrame
	if typ != websocket.MessageBinary || proto.Unmarshal(data, &f) != nil {
		if len(out) != 1 || out[0].GetError().GetCode() != pb.ErrorCode_ERROR_CODE_MALFORMED {
			t.Fatalf("undecodable frame %x: want one Error{MALFORMED}, got %v", data, out)
		}
		if typ == websocket.MessageBinary && out[0].Id != frameID(data) {
			t.Fatalf("undecodable frame %x: error has id %d, the frame's id is %d", data, out[0].Id, frameID(data))
		}
		return
	}
	var replies, malformed int
	for _, r := range out {
		if r.Id != 0 {
			if r.Id != f.Id {
				t.Fatalf("frame %v: reply %v carries another id", &f, r)
			}
			replies++
			if !replyFits(&f, r) {
				t.Fatalf("frame %v: reply %v is not an answer to it", &f, r)
			}
			continue
		}
		switch r.Body.(type) {
		case *pb.ServerFrame_Presence, *pb.ServerFrame_Typing:
		case *pb.ServerFrame_Error:
			if f.Id != 0 || r.GetError().GetCode() != pb.ErrorCode_ERROR_CODE_MALFORMED {
				t.Fatalf("frame %v: unexpected error frame %v", &f, r)
			}
			malformed++
		default:
			t.Fatalf("frame %v: unexpected frame %v with id 0", &f, r)
		}
	}
	if f.Id != 0 && replies != 1 {
		t.Fatalf("frame %v: %d replies, want exactly one: %v", &f, replies, out)
	}
	if malformed > 1 {
		t.Fatalf("frame %v: %d errors: %v", &f, malformed, out)
	}
}

// replyFits reports whether r is a possible answer to f.
func replyFits(f *pb.ClientFrame, r *pb.ServerFrame) bool {
	switch f.Body.(type) {
	case *pb.ClientFrame_Send:
		return r.GetAccepted() != nil || r.GetRefused() != nil
	case *pb.ClientFrame_Ping:
		return r.GetPong() != nil
	case nil:
		return r.GetError().GetCode() == pb.ErrorCode_ERROR_CODE_MALFORMED
	default:
		return r.GetOk() != nil || r.GetError() != nil
	}
}

// clientFrameSeeds are real frames of every kind (valid, refused and
// malformed), the starting points of FuzzClientFrame; the same inputs are
// committed in testdata/fuzz/FuzzClientFrame.
func clientFrameSeeds() [][]byte {
	frames := []*pb.ClientFrame{
		{Id: 1, Body: &pb.ClientFrame_Send{Send: &pb.Send{ClientMsgId: "m1", To: "bob", Payloads: []*pb.DevicePayload{
			{Device: &pb.DeviceAddress{User: "bob", Device: 1}, Payload: []byte("ciphertext for bob.1")},
			{Device: &pb.DeviceAddress{User: "alice", Device: 2}, Payload: []byte("ciphertext for alice.2")}}}}},
		{Id: 2, Body: &pb.ClientFrame_Send{Send: &pb.Send{ClientMsgId: "m2", To: "bob", Payloads: []*pb.DevicePayload{
			{Device: &pb.DeviceAddress{User: "bob", Device: 1}, Payload: []byte("stale: alice.2 is missing")}}}}},
		{Body: &pb.ClientFrame_Send{Send: &pb.Send{ClientMsgId: "m3", To: "alice", Payloads: []*pb.DevicePayload{
			{Device: &pb.DeviceAddress{User: "alice", Device: 2}, Payload: []byte("note to self, id 0")}}}}},
		{Id: 3, Body: &pb.ClientFrame_Ack{Ack: &pb.Ack{Seqs: []uint64{1}}}},
		{Id: 4, Body: &pb.ClientFrame_Ack{Ack: &pb.Ack{Seqs: []uint64{1, 2, 3, 4, 5, 6, 7, 8, 1 << 40}}}},
		{Body: &pb.ClientFrame_Ack{Ack: &pb.Ack{Seqs: []uint64{9}}}},
		{Id: 5, Body: &pb.ClientFrame_Read{Read: &pb.Read{Sender: "bob", Messages: []*pb.MessageRef{
			{ServerId: "01KAR7Q1X6N2Z8M3VJ4T0E5W9C", ClientMsgId: "refill-1"}}}}},
		{Id: 6, Body: &pb.ClientFrame_Subscribe{Subscribe: &pb.Subscribe{Users: []string{"bob", "alice"}}}},
		{Id: 7, Body: &pb.ClientFrame_Subscribe{Subscribe: &pb.Subscribe{Users: []string{"bob"}, Unsubscribe: []string{"alice"}}}},
		{Id: 8, Body: &pb.ClientFrame_Subscribe{Subscribe: &pb.Subscribe{Users: []string{"nobody"}}}},
		{Id: 9, Body: &pb.ClientFrame_Typing{Typing: &pb.Typing{To: "bob", Typing: true}}},
		{Id: 10, Body: &pb.ClientFrame_Typing{Typing: &pb.Typing{To: "alice"}}},
		{Id: 11, Body: &pb.ClientFrame_Ping{Ping: &pb.Ping{ClientTimeMs: 1700000000000}}},
		{Body: &pb.ClientFrame_Ping{Ping: &pb.Ping{}}},
		{Id: 12},
		{},
	}
	var seeds [][]byte
	for _, f := range frames {
		b, err := proto.Marshal(f)
		if err != nil {
			panic(err)
		}
		seeds = append(seeds, b)
	}
	send, _ := proto.Marshal(frames[0])
	seeds = append(seeds,
		send[:len(send)-5],                   // truncated, id readable
		[]byte{0xff, 0xff, 0xff, 0xff, 0x0f}, // not protobuf
		[]byte{0x08, 0x2a, 0x12, 0x80},       // id 42, then a body cut short
	)
	return seeds
}

// FuzzClientFrame feeds arbitrary messages through the decode and dispatch
// path of a connection (conn.frame, backed by a real delivery service and
// mailbox) and checks that it never panics, never closes the connection,
// and answers every frame as the protocol says.
func FuzzClientFrame(f *testing.F) {
	for _, s := range clientFrameSeeds() {
		f.Add(s, false)
	}
	f.Add([]byte(`{"send":{}}`), true)
	var fx *frameFixture
	f.Cleanup(func() {
		if fx != nil {
			fx.close()
		}
	})
	f.Fuzz(func(t *testing.T, data []byte, text bool) {
		// Start afresh now and then, so that what the runs store (sends,
		// receipts) does not pile up in memory.
		if fx == nil || fx.runs >= 5000 {
			if fx != nil {
				fx.close()
			}
			fx = newFrameFixture(t)
		}
		fx.runs++
		if len(data) > fx.g.cfg.MaxFrame {
			return // the reader closes the connection before decoding
		}
		typ := websocket.MessageBinary
		if text {
			typ = websocket.MessageText
		}
		out, closed := fx.run(t, typ, data)
		checkFrameReplies(t, typ, data, out, closed)
	})
}

// TestClientFrameSeeds checks the harness itself: the seeds get the
// replies a real connection gives them.
func TestClientFrameSeeds(t *testing.T) {
	fx := newFrameFixture(t)
	defer fx.close()
	kinds := map[string]int{}
	for _, s := range clientFrameSeeds() {
		out, closed := fx.run(t, websocket.MessageBinary, s)
		checkFrameReplies(t, websocket.MessageBinary, s, out, closed)
		for _, r := range out {
			kinds[fmt.Sprintf("%T", r.Body)]++
		}
	}
	for _, k := range []string{"*courierv1.ServerFrame_Accepted", "*courierv1.ServerFrame_Refused", "*courierv1.ServerFrame_Ok",
		"*courierv1.ServerFrame_Error", "*courierv1.ServerFrame_Presence", "*courierv1.ServerFrame_Pong", "*courierv1.ServerFrame_Typing"} {
		if kinds[k] == 0 {
			t.Errorf("no seed produced a %s (got %v)", k, kinds)
		}
	}
	// Acks of delivered entries delete them and tell bob.
	before, _ := fx.mb.Read(context.Background(), ident.Device{User: "bob", ID: 1}, 0, 1000)
	entries, _ := fx.mb.Read(context.Background(), fx.alice, 0, 2)
	ack, _ := proto.Marshal(&pb.ClientFrame{Id: 99, Body: &pb.ClientFrame_Ack{Ack: &pb.Ack{Seqs: []uint64{entries[0].Seq, entries[1].Seq}}}})
	out, _ := fx.run(t, websocket.MessageBinary, ack)
	if len(out) != 1 || out[0].GetOk() == nil {
		t.Fatalf("ack: %v", out)
	}
	after, _ := fx.mb.Read(context.Background(), ident.Device{User: "bob", ID: 1}, 0, 1000)
	if len(after) != len(before)+1 {
		t.Fatalf("bob has %d entries after the ack, had %d: want one DELIVERED receipt more", len(after), len(before))
	}
	left, _ := fx.mb.Read(context.Background(), fx.alice, 0, 16)
	for _, e := range left {
		if e.Seq == entries[0].Seq || e.Seq == entries[1].Seq {
			t.Fatalf("acked entry %d still in the mailbox", e.Seq)
		}
	}
}

func TestFrameID(t *testing.T) {
	for _, tc := range []struct {
		in   []byte
		want uint64
	}{
		{nil, 0},
		{[]byte{0x08, 0x2a}, 42},
		{[]byte{0x08, 0x2a, 0x12, 0x80}, 42},                   // body cut short after the id
		{[]byte{0x12, 0x00, 0x08, 0x07, 0xff}, 7},              // id after an empty body, then junk
		{[]byte{0x08, 0x01, 0x08, 0x02}, 2},                    // the last id wins, as in proto.Unmarshal
		{[]byte{0xff, 0xff, 0xff, 0xff, 0x0f}, 0},              // not protobuf
		{[]byte{0x0a, 0x01, 0x00}, 0},                          // field 1 with the wrong wire type
		{[]byte{0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, 0},  // id cut short
		{[]byte{0x08, 0x2a, 0x12, 0x05, 0x01, 0x02, 0x03}, 42}, // body longer than the frame
	} {
		if got := frameID(tc.in); got != tc.want {
			t.Errorf("frameID(%x) = %d, want %d", tc.in, got, tc.want)
		}
	}
}
