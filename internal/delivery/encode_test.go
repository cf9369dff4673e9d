package delivery

import (
	"bytes"
	"math"
	"math/rand/v2"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/courier-im/courier/internal/ident"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

// messageItems must produce exactly what proto.Marshal produces for the
// envelope with each payload, so that stored messages do not depend on how
// they were encoded.
func TestMessageItemsMatchMarshal(t *testing.T) {
	if f := (&pb.Envelope{}).ProtoReflect().Descriptor().Fields().ByName("payload"); f.Number() != envelopePayloadField || f.Kind() != protoreflect.BytesKind {
		t.Fatalf("Envelope.payload is field %d of kind %v", f.Number(), f.Kind())
	}
	env := &pb.Envelope{Kind: pb.EnvelopeKind_ENVELOPE_KIND_MESSAGE, ServerId: "01KAR7Q1X6N2Z8M3VJ4T0E5W9C", Sender: "alice",
		SenderDevice: 3, ServerTimeMs: 1700000000000, ClientMsgId: "c-1", To: "bob"}
	payloads := []Payload{
		{Device: ident.Device{User: "bob", ID: 1}, Data: []byte("x")},
		{Device: ident.Device{User: "bob", ID: 2}, Data: nil},
		{Device: ident.Device{User: "alice", ID: 1}, Data: bytes.Repeat([]byte{9}, 70000)},
		{Device: ident.Device{User: "alice", ID: 2}, Data: []byte{}},
	}
	items, err := messageItems(env, payloads)
	if err != nil {
		t.Fatal(err)
	}
	if len(items) != len(payloads) {
		t.Fatalf("%d items for %d payloads", len(items), len(payloads))
	}
	for i, p := range payloads {
		e := proto.Clone(env).(*pb.Envelope)
		e.Payload = p.Data
		want, err := proto.Marshal(e)
		if err != nil {
			t.Fatal(err)
		}
		if items[i].Device != p.Device || !bytes.Equal(items[i].Data, want) {
			t.Fatalf("payload %d: encoding differs from proto.Marshal", i)
		}
	}
	// Appending to one item must not overwrite the next one's bytes.
	before := bytes.Clone(items[1].Data)
	_ = append(items[0].Data, 0xff)
	if !bytes.Equal(items[1].Data, before) {
		t.Fatal("items share spare capacity")
	}
	env.Receipt = &pb.Receipt{}
	if _, err := messageItems(env, payloads); err == nil {
		t.Fatal("an envelope with a receipt was accepted")
	}
}

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
