package gateway

import (
	"bytes"
	"testing"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	pb "github.com/courier-im/courier/proto/courier/v1"
)

func payload(user string, dev uint32, data []byte) *pb.DevicePayload {
	return &pb.DevicePayload{Device: &pb.DeviceAddress{User: user, Device: dev}, Payload: data}
}

// fastFrames are frames of the kinds the hand decoder takes.
func fastFrames() []*pb.ClientFrame {
	big := bytes.Repeat([]byte{7}, 70000)
	var many []*pb.DevicePayload
	for i := range 5 {
		many = append(many, payload("bob", uint32(i+1), []byte{byte(i), 1, 2}))
	}
	var seqs []uint64
	for i := range 300 {
		seqs = append(seqs, uint64(i)<<20+1)
	}
	return []*pb.ClientFrame{
		{Id: 12345, Body: &pb.ClientFrame_Send{Send: &pb.Send{ClientMsgId: "0123456789abcdef", To: "bob",
			Payloads: []*pb.DevicePayload{payload("bob", 1, make([]byte, 64))}, FirstAttempt: true}}},
		{Body: &pb.ClientFrame_Send{Send: &pb.Send{ClientMsgId: "m", To: "bob",
			Payloads: []*pb.DevicePayload{payload("bob", 1, []byte("x")), payload("alice", 2, []byte("y"))}}}},
		{Id: 1, Body: &pb.ClientFrame_Send{Send: &pb.Send{ClientMsgId: "m2", To: "bob", Payloads: many}}},
		{Id: 2, Body: &pb.ClientFrame_Send{Send: &pb.Send{ClientMsgId: "g", Group: "grp", GroupVersion: 9, Payload: big}}},
		{Id: 3, Body: &pb.ClientFrame_Send{Send: &pb.Send{}}},
		{Id: 4, Body: &pb.ClientFrame_Send{Send: &pb.Send{ClientMsgId: "ü", To: "bob",
			Payloads: []*pb.DevicePayload{{Device: &pb.DeviceAddress{}}, {Payload: []byte("no address")}, {}}}}},
		{Id: 7, Body: &pb.ClientFrame_Ack{Ack: &pb.Ack{Seqs: []uint64{123456}}}},
		{Body: &pb.ClientFrame_Ack{Ack: &pb.Ack{Seqs: []uint64{1, 2, 3, 4}}}},
		{Id: 1 << 63, Body: &pb.ClientFrame_Ack{Ack: &pb.Ack{Seqs: seqs}}},
		{Id: 5, Body: &pb.ClientFrame_Ack{Ack: &pb.Ack{}}},
	}
}

// TestDecodeClientFrameFast checks that the Send and Ack frames a client
// writes are decoded by hand, to what proto.Unmarshal makes of them.
func TestDecodeClientFrameFast(t *testing.T) {
	for i, want := range fastFrames() {
		data, err := proto.Marshal(want)
		if err != nil {
			t.Fatal(err)
		}
		got := fastClientFrame(data)
		if got == nil {
			t.Errorf("frame %d: not decoded by hand", i)
			continue
		}
		// The read buffer is reused for the next frame: nothing decoded
		// may point into it.
		for j := range data {
			data[j] = 0xAA
		}
		if !proto.Equal(got, want) {
			t.Errorf("frame %d: decoded %v, want %v", i, got, want)
		}
	}
	// Seqs written unpacked, and in two runs, as proto allows.
	var b []byte
	b = protowire.AppendTag(b, fClientFrameID, protowire.VarintType)
	b = protowire.AppendVarint(b, 9)
	var ack []byte
	ack = protowire.AppendTag(ack, fAckSeqs, protowire.VarintType)
	ack = protowire.AppendVarint(ack, 5)
	ack = protowire.AppendTag(ack, fAckSeqs, protowire.BytesType)
	ack = protowire.AppendBytes(ack, protowire.AppendVarint(protowire.AppendVarint(nil, 6), 7))
	b = protowire.AppendTag(b, fClientFrameAck, protowire.BytesType)
	b = protowire.AppendBytes(b, ack)
	got := fastClientFrame(b)
	if got == nil || !proto.Equal(got, &pb.ClientFrame{Id: 9, Body: &pb.ClientFrame_Ack{Ack: &pb.Ack{Seqs: []uint64{5, 6, 7}}}}) {
		t.Errorf("unpacked and packed seqs: %v", got)
	}
}

// TestDecodeClientFrameFallback checks that frames the hand decoder does
// not take as written go to proto.Unmarshal, with its result or error.
func TestDecodeClientFrameFallback(t *testing.T) {
	send, _ := proto.Marshal(&pb.ClientFrame{Id: 1, Body: &pb.ClientFrame_Send{Send: &pb.Send{ClientMsgId: "a", To: "bob",
		Payloads: []*pb.DevicePayload{payload("bob", 1, []byte("x"))}}}})
	ack, _ := proto.Marshal(&pb.ClientFrame{Id: 2, Body: &pb.ClientFrame_Ack{Ack: &pb.Ack{Seqs: []uint64{1}}}})
	ping, _ := proto.Marshal(&pb.ClientFrame{Id: 3, Body: &pb.ClientFrame_Ping{Ping: &pb.Ping{ClientTimeMs: 5}}})
	unknown := protowire.AppendVarint(protowire.AppendTag(append([]byte(nil), send...), 99, protowire.VarintType), 1)
	twoBodies := append(append([]byte(nil), send...), ack[2:]...) // the Ack body after the Send: the last wins
	twoIDs := protowire.AppendVarint(protowire.AppendTag(append([]byte(nil), ack...), fClientFrameID, protowire.VarintType), 77)
	var badUTF8 []byte
	badUTF8 = protowire.AppendTag(badUTF8, fClientFrameSend, protowire.BytesType)
	badUTF8 = protowire.AppendBytes(badUTF8, protowire.AppendBytes(protowire.AppendTag(nil, fSendTo, protowire.BytesType), []byte{0xff, 0xfe}))
	var wrongType []byte // payloads as a varint: proto keeps it as an unknown field
	wrongType = protowire.AppendTag(wrongType, fClientFrameSend, protowire.BytesType)
	wrongType = protowire.AppendBytes(wrongType, protowire.AppendVarint(protowire.AppendTag(nil, fSendPayloads, protowire.VarintType), 3))
	for name, data := range map[string][]byte{
		"ping": ping, "unknown field": unknown, "two bodies": twoBodies, "two ids": twoIDs,
		"invalid UTF-8": badUTF8, "wrong wire type": wrongType, "truncated": send[:len(send)-1], "empty": {},
	} {
		if fastClientFrame(data) != nil {
			t.Errorf("%s: decoded by hand", name)
		}
		var want pb.ClientFrame
		wantErr := proto.Unmarshal(data, &want)
		got, err := decodeClientFrame(data)
		if (err != nil) != (wantErr != nil) {
			t.Errorf("%s: error %v, proto.Unmarshal's %v", name, err, wantErr)
			continue
		}
		if err == nil && !proto.Equal(got, &want) {
			t.Errorf("%s: decoded %v, want %v", name, got, &want)
		}
	}
}

// FuzzDecodeClientFrame checks decodeClientFrame against proto.Unmarshal
// on any input: the same error or the same frame.
func FuzzDecodeClientFrame(f *testing.F) {
	for _, fr := range fastFrames() {
		data, _ := proto.Marshal(fr)
		if len(data) < 4096 {
			f.Add(data)
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var want pb.ClientFrame
		wantErr := proto.Unmarshal(data, &want)
		if fast := fastClientFrame(data); fast != nil {
			if wantErr != nil {
				t.Fatalf("decoded by hand what proto.Unmarshal refuses (%v): %v", wantErr, fast)
			}
			if !proto.Equal(fast, &want) {
				t.Fatalf("decoded by hand %v, proto.Unmarshal %v", fast, &want)
			}
		}
		got, err := decodeClientFrame(data)
		if (err != nil) != (wantErr != nil) {
			t.Fatalf("error %v, proto.Unmarshal's %v", err, wantErr)
		}
		if err == nil && !proto.Equal(got, &want) {
			t.Fatalf("decoded %v, want %v", got, &want)
		}
	})
}

// TestAcceptedFrameEncoding checks appendAcceptedFrame against
// proto.Marshal, byte for byte, with and without each field.
func TestAcceptedFrameEncoding(t *testing.T) {
	for _, id := range []uint64{0, 1, 300, 1 << 63} {
		for _, sid := range []string{"", "01KAR7Q1X6N2Z8M3VJ4T0E5W9C", "é"} {
			for _, ms := range []int64{0, 1700000000000, -1} {
				for _, dup := range []bool{false, true} {
					want, err := proto.Marshal(&pb.ServerFrame{Id: id, Body: &pb.ServerFrame_Accepted{Accepted: &pb.Accepted{
						ServerId: sid, ServerTimeMs: ms, Duplicate: dup}}})
					if err != nil {
						t.Fatal(err)
					}
					got := appendAcceptedFrame([]byte{9}, id, sid, ms, dup)
					if !bytes.Equal(got[1:], want) || got[0] != 9 {
						t.Errorf("id %d %q %d %v: %x, want %x", id, sid, ms, dup, got[1:], want)
					}
					if n := acceptedFrameSize(id, sid, ms, dup); n != len(want) {
						t.Errorf("id %d %q %d %v: size %d, want %d", id, sid, ms, dup, n, len(want))
					}
				}
			}
		}
	}
}
