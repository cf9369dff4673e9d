package bench

import (
	"bytes"
	"math/rand/v2"
	"testing"

	"google.golang.org/protobuf/proto"

	pb "github.com/courier-im/courier/proto/courier/v1"
)

// fastOf is what decodeFast should read from f, which proto decoded.
func fastOf(f *pb.ServerFrame) (fastFrame, bool) {
	switch b := f.Body.(type) {
	case *pb.ServerFrame_Accepted:
		return fastFrame{id: f.Id, body: frameAcceptedField}, true
	case *pb.ServerFrame_Deliver:
		return fastFrame{id: f.Id, body: frameDeliverField, deliver: deliveryOf(b.Deliver)}, true
	}
	return fastFrame{}, false
}

func sameFast(a, b fastFrame) bool {
	return a.id == b.id && a.body == b.body && a.deliver.seq == b.deliver.seq && a.deliver.kind == b.deliver.kind &&
		bytes.Equal(a.deliver.payload, b.deliver.payload) && a.deliver.group == b.deliver.group &&
		a.deliver.receipt == b.deliver.receipt && a.deliver.receipts == b.deliver.receipts
}

// randomFrame is a ServerFrame the server could send, the bench's two
// hot ones most of the time.
func randomFrame(r *rand.Rand) *pb.ServerFrame {
	f := &pb.ServerFrame{Id: r.Uint64N(3) * r.Uint64()}
	switch r.IntN(5) {
	case 0:
		f.Body = &pb.ServerFrame_Accepted{Accepted: &pb.Accepted{ServerId: "s1", ServerTimeMs: r.Int64(), Duplicate: r.IntN(2) == 0}}
	case 1, 2, 3:
		e := &pb.Envelope{Kind: pb.EnvelopeKind(r.IntN(5)), ServerId: "m-1", Sender: "bob", SenderDevice: r.Uint32(),
			ServerTimeMs: r.Int64(), ClientMsgId: "c", To: "alice"}
		if r.IntN(2) == 0 {
			e.Payload = make([]byte, r.IntN(100))
			for i := range e.Payload {
				e.Payload[i] = byte(r.Uint32())
			}
		}
		if r.IntN(3) == 0 {
			e.Group = "g1"
		}
		if r.IntN(2) == 0 {
			rc := &pb.Receipt{Type: pb.ReceiptType(r.IntN(3))}
			for range r.IntN(4) {
				rc.Messages = append(rc.Messages, &pb.MessageRef{ServerId: "m", ClientMsgId: "c", By: "alice", ByDevice: 1})
			}
			e.Receipt = rc
		}
		d := &pb.Deliver{Seq: r.Uint64()}
		if r.IntN(8) > 0 {
			d.Envelope = e
		}
		f.Body = &pb.ServerFrame_Deliver{Deliver: d}
	default:
		f.Body = &pb.ServerFrame_Synced{Synced: &pb.Synced{Pending: r.Uint64()}}
	}
	return f
}

// TestDecodeFast checks the bench's own decoding of Accepted and Deliver
// frames against proto's, on frames like the server's, and that it takes
// every such frame (the others go to proto).
func TestDecodeFast(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for i := range 5000 {
		f := randomFrame(r)
		b, err := proto.Marshal(f)
		if err != nil {
			t.Fatal(err)
		}
		want, hot := fastOf(f)
		var got fastFrame
		ok := decodeFast(b, &got)
		if ok != hot {
			t.Fatalf("frame %d (%v): decodeFast took it: %v", i, f, ok)
		}
		if ok && !sameFast(got, want) {
			t.Fatalf("frame %d (%v):\ngot  %+v\nwant %+v", i, f, got, want)
		}
	}
	// Left to proto: a body given twice (proto merges them), a group
	// (wire type 3), a truncated frame.
	acc, _ := proto.Marshal(&pb.ServerFrame{Id: 1, Body: &pb.ServerFrame_Accepted{Accepted: &pb.Accepted{ServerId: "s"}}})
	del, _ := proto.Marshal(&pb.ServerFrame{Body: &pb.ServerFrame_Deliver{Deliver: &pb.Deliver{Seq: 1, Envelope: &pb.Envelope{Payload: []byte("x")}}}})
	for name, b := range map[string][]byte{
		"two bodies": append(append([]byte{}, acc...), del...),
		"group":      append(append([]byte{}, acc...), 0x1b, 0x1c),
		"truncated":  del[:len(del)-1],
	} {
		var got fastFrame
		if decodeFast(b, &got) {
			t.Errorf("%s: decodeFast took it (%+v)", name, got)
		}
	}
}

// FuzzDecodeFast checks that decodeFast never panics and, where it takes
// a frame that proto decodes too, reads what proto reads.
func FuzzDecodeFast(f *testing.F) {
	r := rand.New(rand.NewPCG(3, 4))
	for range 20 {
		b, _ := proto.Marshal(randomFrame(r))
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var got fastFrame
		if !decodeFast(b, &got) {
			return
		}
		var pf pb.ServerFrame
		if proto.Unmarshal(b, &pf) != nil {
			return // invalid UTF-8 in a string the bench skips, say
		}
		want, hot := fastOf(&pf)
		if !hot || !sameFast(got, want) {
			t.Fatalf("decodeFast %+v; proto %v", got, &pf)
		}
	})
}

func BenchmarkDecodeDeliver(b *testing.B) {
	frame, _ := proto.Marshal(&pb.ServerFrame{Body: &pb.ServerFrame_Deliver{Deliver: &pb.Deliver{Seq: 12345, Envelope: &pb.Envelope{
		Kind: pb.EnvelopeKind_ENVELOPE_KIND_MESSAGE, ServerId: "01JEXAMPLE0000000000000000", Sender: "bnxnmhsc6-s1", SenderDevice: 1,
		ServerTimeMs: 1733616000000, ClientMsgId: "c-1", To: "bnxnmhsc6-r1", Payload: make([]byte, 64)}}}})
	b.Run("proto", func(b *testing.B) {
		b.ReportAllocs()
		f := new(pb.ServerFrame)
		for b.Loop() {
			f.Reset()
			if err := proto.Unmarshal(frame, f); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("fast", func(b *testing.B) {
		b.ReportAllocs()
		var f fastFrame
		for b.Loop() {
			if !decodeFast(frame, &f) {
				b.Fatal("not taken")
			}
		}
	})
}
