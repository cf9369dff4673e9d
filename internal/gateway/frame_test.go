package gateway

import (
	"bytes"
	"testing"

	"google.golang.org/protobuf/proto"

	pb "github.com/courier-im/courier/proto/courier/v1"
)

// appendDeliver must produce exactly the bytes proto.Marshal produces, so
// that any protobuf implementation decodes it.
func TestAppendDeliverMatchesMarshal(t *testing.T) {
	for _, env := range []*pb.Envelope{
		{},
		{Kind: pb.EnvelopeKind_ENVELOPE_KIND_MESSAGE, ServerId: "01ABC", Sender: "alice", SenderDevice: 1, ServerTimeMs: 1700000000000, ClientMsgId: "c", To: "bob", Payload: bytes.Repeat([]byte{7}, 70000)},
		{Kind: pb.EnvelopeKind_ENVELOPE_KIND_RECEIPT, Receipt: &pb.Receipt{Type: pb.ReceiptType_RECEIPT_TYPE_READ, Messages: []*pb.MessageRef{{ServerId: "x"}}}},
	} {
		for _, seq := range []uint64{1, 127, 128, 1 << 40} {
			data, err := proto.Marshal(env)
			if err != nil {
				t.Fatal(err)
			}
			want, err := proto.MarshalOptions{Deterministic: true}.Marshal(&pb.ServerFrame{Body: &pb.ServerFrame_Deliver{Deliver: &pb.Deliver{Seq: seq, Envelope: env}}})
			if err != nil {
				t.Fatal(err)
			}
			if got := appendDeliver(nil, seq, data); !bytes.Equal(got, want) {
				t.Fatalf("seq %d: appendDeliver differs from proto.Marshal", seq)
			}
		}
	}
}

func BenchmarkAppendDeliver(b *testing.B) {
	env, _ := proto.Marshal(&pb.Envelope{Kind: pb.EnvelopeKind_ENVELOPE_KIND_MESSAGE, ServerId: "01KAR7Q1X6N2Z8M3VJ4T0E5W9C", Sender: "alice", SenderDevice: 1, ServerTimeMs: 1700000000000, ClientMsgId: "0123456789abcdef", To: "bob", Payload: make([]byte, 64)})
	var buf []byte
	b.ReportAllocs()
	for b.Loop() {
		buf = appendDeliver(buf[:0], 12345, env)
	}
}
