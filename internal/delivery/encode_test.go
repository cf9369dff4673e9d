package delivery

import (
	"bytes"
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
