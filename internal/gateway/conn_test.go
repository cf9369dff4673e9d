package gateway

import (
	"bytes"
	"context"
	"fmt"
	"testing"
	"time"
	"unsafe"

	"github.com/coder/websocket"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/courier-im/courier/internal/ident"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

// Hostile frames that are well within the frame limit but costly to
// handle naively must be answered quickly, with one MALFORMED error.
func TestCostlyFramesRefusedCheaply(t *testing.T) {
	fx := newFrameFixture(t)
	defer fx.close()

	// Unsubscribing scans the connection's subscriptions for every name,
	// under the gateway's lock: a frame naming 200000 users on a
	// connection watching 1024 held it for about 75 ms (200 million
	// comparisons) before the list was bounded.
	many := make([]string, 200_000)
	for i := range many {
		many[i] = fmt.Sprint("u", i)
	}
	unsub, _ := proto.Marshal(&pb.ClientFrame{Id: 1, Body: &pb.ClientFrame_Subscribe{Subscribe: &pb.Subscribe{Users: []string{"bob"}, Unsubscribe: many}}})
	watching := fx.watcher(t, many[:maxWatching])
	start := time.Now()
	watching.frame(websocket.MessageBinary, unsub)
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("unsubscribing 200000 names on a connection watching 1024 took %v", d)
	}
	if r := <-watching.gr.out; r.GetError().GetCode() != pb.ErrorCode_ERROR_CODE_MALFORMED || r.Id != 1 {
		t.Errorf("unsubscribe 200000: %v", r)
	}
	fx.g.unregister(watching)
	subMany, _ := proto.Marshal(&pb.ClientFrame{Id: 2, Body: &pb.ClientFrame_Subscribe{Subscribe: &pb.Subscribe{Users: many[:maxWatching+1]}}})
	// Unknown fields of nested groups, as deep as the frame limit allows:
	// decoding must not recurse without bound.
	nested := []byte{0x08, 0x03} // id 3
	nested = append(nested, bytes.Repeat(protowire.AppendTag(nil, 20, protowire.StartGroupType), 500_000)...)
	ackMany, _ := proto.Marshal(&pb.ClientFrame{Id: 4, Body: &pb.ClientFrame_Ack{Ack: &pb.Ack{Seqs: make([]uint64, 100_000)}}})
	for name, frame := range map[string][]byte{"unsubscribe 200000": unsub, "subscribe 1025": subMany, "nested groups": nested, "ack 100000": ackMany} {
		if len(frame) > fx.g.cfg.MaxFrame {
			t.Fatalf("%s: %d bytes, over the frame limit: the test would not reach the handler", name, len(frame))
		}
		start := time.Now()
		out, closed := fx.run(t, websocket.MessageBinary, frame)
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("%s: took %v", name, d)
		}
		checkFrameReplies(t, websocket.MessageBinary, frame, out, closed)
		if len(out) != 1 || out[0].GetError().GetCode() != pb.ErrorCode_ERROR_CODE_MALFORMED || out[0].Id == 0 {
			t.Errorf("%s: got %v, want one Error{MALFORMED} with the frame's id", name, out)
		}
	}
}

// watcher returns a registered connection of alice.1 subscribed to the
// presence of users, which it creates.
func (fx *frameFixture) watcher(t *testing.T, users []string) *conn {
	t.Helper()
	for _, u := range users {
		if _, _, err := fx.accts.Register(u); err != nil {
			t.Fatal(err)
		}
	}
	c := newConn(fx.g, fx.alice, nil)
	c.gr.out = make(chan *pb.ServerFrame, 4*maxWatching)
	fx.g.register(c)
	sub, _ := proto.Marshal(&pb.ClientFrame{Id: 100, Body: &pb.ClientFrame_Subscribe{Subscribe: &pb.Subscribe{Users: users}}})
	c.frame(websocket.MessageBinary, sub)
	for range users {
		if p := <-c.gr.out; p.GetPresence() == nil {
			t.Fatalf("subscribe: %v", p)
		}
	}
	if r := <-c.gr.out; r.GetOk() == nil || len(*c.watching) != len(users) {
		t.Fatalf("subscribe: %v, watching %d", r, len(*c.watching))
	}
	return c
}

// The gateway keeps a user's connections in one chain (Gateway.users): a
// device's connection is found in it, replaced in place when the device
// connects again, and removed from any place; the user is online while
// one is left, and typing reaches each of them and no one else.
func TestConnectionsOfAUser(t *testing.T) {
	fx := newFrameFixture(t)
	defer fx.close()
	g := fx.g
	ctx := context.Background()
	alice := func(id uint32) ident.Device { return ident.Device{User: "alice", ID: id} }
	connect := func(dev ident.Device) *conn {
		c := newConn(g, dev, nil)
		if !g.register(c) {
			t.Fatal("gateway closed")
		}
		return c
	}
	check := func(step string, want map[uint32]*conn) {
		t.Helper()
		g.mu.Lock()
		for id, c := range map[uint32]*conn{1: nil, 2: nil, 3: nil} {
			if w := want[id]; w != nil {
				c = w
			}
			if got := g.connLocked(alice(id)); got != c {
				t.Errorf("%s: alice.%d has connection %p, want %p", step, id, got, c)
			}
		}
		g.mu.Unlock()
		if got := g.Connections(); got != len(want)+1 { // bob's too
			t.Errorf("%s: %d connections, want %d", step, got, len(want)+1)
		}
		p, err := g.presenceOf(ctx, "alice")
		if err != nil {
			t.Fatal(err)
		}
		if p.Online != (len(want) > 0) {
			t.Errorf("%s: alice online %v with %d connections", step, p.Online, len(want))
		}
	}
	bob := connect(ident.Device{User: "bob", ID: 1})
	defer g.unregister(bob)
	c1, c2, c3 := connect(alice(1)), connect(alice(2)), connect(alice(3))
	check("three devices", map[uint32]*conn{1: c1, 2: c2, 3: c3})

	g.typing(bob.dev, "alice", true)
	for _, c := range []*conn{c1, c2, c3} {
		if len(c.gr.out) != 1 || (<-c.gr.out).GetTyping() == nil {
			t.Errorf("alice.%d did not get bob's typing once", c.dev.ID)
		}
	}
	if len(bob.gr.out) != 0 {
		t.Error("typing to alice reached bob")
	}

	c2b := connect(alice(2)) // in the middle of the chain
	if !c2.closing.Load() {
		t.Error("the superseded connection of alice.2 is not closing")
	}
	check("alice.2 again", map[uint32]*conn{1: c1, 2: c2b, 3: c3})
	g.unregister(c2) // superseded: changes nothing
	check("superseded one gone", map[uint32]*conn{1: c1, 2: c2b, 3: c3})
	g.unregister(c2b)
	check("alice.2 gone", map[uint32]*conn{1: c1, 3: c3})
	g.unregister(c3)
	check("alice.3 gone", map[uint32]*conn{1: c1})
	g.unregister(c1)
	check("all gone", nil)
	g.mu.Lock()
	if _, ok := g.users["alice"]; ok {
		t.Error("a user with no connection is still in the map")
	}
	g.mu.Unlock()
}

// An idle connection on the epoll transport is its conn alone (with its
// user name and a slot in the gateway's map): keep it within the 288-byte
// allocation size class.
func TestConnSize(t *testing.T) {
	if unsafe.Sizeof(uintptr(0)) != 8 {
		t.Skip("sizes are for 64-bit platforms")
	}
	if n := unsafe.Sizeof(conn{}); n > 288 {
		t.Errorf("conn is %d bytes, more than 288: an idle connection takes the next size class", n)
	}
}
