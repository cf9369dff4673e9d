package gateway

import (
	"bytes"
	"fmt"
	"testing"
	"time"

	"github.com/coder/websocket"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

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
	if r := <-watching.out; r.GetError().GetCode() != pb.ErrorCode_ERROR_CODE_MALFORMED || r.Id != 1 {
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
	c.out = make(chan *pb.ServerFrame, 4*maxWatching)
	fx.g.register(c)
	sub, _ := proto.Marshal(&pb.ClientFrame{Id: 100, Body: &pb.ClientFrame_Subscribe{Subscribe: &pb.Subscribe{Users: users}}})
	c.frame(websocket.MessageBinary, sub)
	for range users {
		if p := <-c.out; p.GetPresence() == nil {
			t.Fatalf("subscribe: %v", p)
		}
	}
	if r := <-c.out; r.GetOk() == nil || len(c.watching) != len(users) {
		t.Fatalf("subscribe: %v, watching %d", r, len(c.watching))
	}
	return c
}
