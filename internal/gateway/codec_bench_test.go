package gateway

import (
	"testing"

	"google.golang.org/protobuf/proto"

	pb "github.com/courier-im/courier/proto/courier/v1"
)

// The frame codec on the hot path, per message: decoding a Send from the
// sender, encoding its Accepted, decoding the receiver's Ack (Deliver is
// BenchmarkAppendDeliver). The decoders run both ways: proto.Unmarshal
// and the gateway's decodeClientFrame (decode.go).
//
//	go test -run '^$' -bench 'DecodeSend|EncodeAccepted|DecodeAck|AppendDeliver' -benchmem -count 6 ./internal/gateway/

func BenchmarkDecodeSend(b *testing.B) {
	data, err := proto.Marshal(&pb.ClientFrame{Id: 12345, Body: &pb.ClientFrame_Send{Send: &pb.Send{
		ClientMsgId: "0123456789abcdef", To: "bob",
		Payloads: []*pb.DevicePayload{{Device: &pb.DeviceAddress{User: "bob", Device: 1}, Payload: make([]byte, 64)}}}}})
	if err != nil {
		b.Fatal(err)
	}
	benchDecode(b, data)
}

// benchDecode measures proto.Unmarshal (what the gateway used) against
// decodeClientFrame (what it uses) on one frame.
func benchDecode(b *testing.B, data []byte) {
	b.Run("proto", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			var f pb.ClientFrame
			if err := proto.Unmarshal(data, &f); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("gateway", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := decodeClientFrame(data); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func BenchmarkDecodeAck(b *testing.B) {
	data, err := proto.Marshal(&pb.ClientFrame{Id: 7, Body: &pb.ClientFrame_Ack{Ack: &pb.Ack{Seqs: []uint64{123456}}}})
	if err != nil {
		b.Fatal(err)
	}
	benchDecode(b, data)
}

func BenchmarkEncodeAccepted(b *testing.B) {
	b.Run("proto", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			f := &pb.ServerFrame{Id: 12345, Body: &pb.ServerFrame_Accepted{Accepted: &pb.Accepted{
				ServerId: "01KAR7Q1X6N2Z8M3VJ4T0E5W9C", ServerTimeMs: 1700000000000}}}
			if _, err := proto.Marshal(f); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("gateway", func(b *testing.B) { // into a batch, as answerAccepted does
		b.ReportAllocs()
		buf := make([]byte, 0, 4<<10)
		for b.Loop() {
			const id, sid, ms = 12345, "01KAR7Q1X6N2Z8M3VJ4T0E5W9C", 1700000000000
			buf = appendAcceptedFrame(appendFrameHeader(buf[:0], acceptedFrameSize(id, sid, ms, false)), id, sid, ms, false)
		}
	})
}
