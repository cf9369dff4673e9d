package delivery

import (
	"bytes"
	"math"
	"math/rand/v2"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	pb "github.com/courier-im/courier/proto/courier/v1"
)

// TestReceiptEncoding checks appendReceiptEnvelope against proto.Marshal,
// byte for byte, on receipts of every shape: defaults left out, large and
// negative numbers, multi-byte strings, no messages and many.
func TestReceiptEncoding(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	str := func() string {
		switch rng.IntN(4) {
		case 0:
			return ""
		case 1:
			return "bob"
		case 2:
			return "01KAR7Q1X6N2Z8M3VJ4T0E5W9C"
		}
		return strings.Repeat("é€", rng.IntN(80))
	}
	num := func() uint64 {
		switch rng.IntN(4) {
		case 0:
			return 0
		case 1:
			return uint64(rng.IntN(200))
		case 2:
			return math.MaxUint32
		}
		return rng.Uint64()
	}
	cases := []*pb.Envelope{
		{Kind: pb.EnvelopeKind_ENVELOPE_KIND_RECEIPT},
		{Kind: pb.EnvelopeKind_ENVELOPE_KIND_RECEIPT, Receipt: &pb.Receipt{}},
		{Kind: pb.EnvelopeKind(-1), ServerTimeMs: -5, Receipt: &pb.Receipt{Type: pb.ReceiptType(-2), Messages: []*pb.MessageRef{{}}}},
	}
	for range 2000 {
		env := &pb.Envelope{
			Kind: pb.EnvelopeKind(rng.IntN(3)), ServerId: str(), Sender: str(), SenderDevice: uint32(num()),
			ServerTimeMs: int64(num()), ClientMsgId: str(), To: str(),
		}
		if rng.IntN(8) > 0 {
			env.Receipt = &pb.Receipt{Type: pb.ReceiptType(rng.IntN(3))}
			for range rng.IntN(5) {
				env.Receipt.Messages = append(env.Receipt.Messages, &pb.MessageRef{
					ServerId: str(), ClientMsgId: str(), By: str(), ByDevice: uint32(num())})
			}
			if rng.IntN(20) == 0 {
				for range 600 {
					env.Receipt.Messages = append(env.Receipt.Messages, &pb.MessageRef{ServerId: str(), ClientMsgId: str()})
				}
			}
		}
		cases = append(cases, env)
	}
	for i, env := range cases {
		want, err := proto.Marshal(env)
		if err != nil {
			t.Fatal(err)
		}
		if n := receiptEnvelopeSize(env); n != len(want) {
			t.Fatalf("case %d: size %d, proto's %d", i, n, len(want))
		}
		got := appendReceiptEnvelope([]byte("prefix"), env)
		if !bytes.Equal(got[6:], want) || string(got[:6]) != "prefix" {
			t.Fatalf("case %d: %x\nwant %x", i, got[6:], want)
		}
		if !receiptStringsValid(env) {
			t.Fatalf("case %d: valid strings reported invalid", i)
		}
	}
	bad := &pb.Envelope{To: "bob", Receipt: &pb.Receipt{Messages: []*pb.MessageRef{{ClientMsgId: "\xff"}}}}
	if receiptStringsValid(bad) {
		t.Error("a receipt naming a non-UTF-8 client id reported valid")
	}
	if _, err := proto.Marshal(bad); err == nil {
		t.Error("proto.Marshal took a non-UTF-8 string (the check mirrors it)")
	}
}

// BenchmarkEncodeReceipt measures a DELIVERED receipt envelope of one
// message reference, by proto.Marshal and by appendReceiptEnvelope.
//
//	go test -run '^$' -bench EncodeReceipt -benchmem ./internal/delivery/
func BenchmarkEncodeReceipt(b *testing.B) {
	env := &pb.Envelope{Kind: pb.EnvelopeKind_ENVELOPE_KIND_RECEIPT, ServerId: "01KAR7Q1X6N2Z8M3VJ4T0E5W9C", Sender: "bob",
		SenderDevice: 1, ServerTimeMs: 1700000000000, To: "alice", Receipt: &pb.Receipt{Type: pb.ReceiptType_RECEIPT_TYPE_DELIVERED,
			Messages: []*pb.MessageRef{{ServerId: "01KAR7Q1X6N2Z8M3VJ4T0E5W9D", ClientMsgId: "0123456789abcdef"}}}}
	b.Run("proto", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := proto.Marshal(env); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("delivery", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if !receiptStringsValid(env) {
				b.Fatal("invalid")
			}
			_ = appendReceiptEnvelope(make([]byte, 0, receiptEnvelopeSize(env)), env)
		}
	})
}
