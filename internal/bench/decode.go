package bench

import (
	"google.golang.org/protobuf/encoding/protowire"

	pb "github.com/courier-im/courier/proto/courier/v1"
)

// The two frames a bench connection reads by the thousand, Accepted and
// Deliver, are read here with protowire, for only the fields the bench
// uses: with proto.Unmarshal's reflection they were ≈ 13 % of the bench's
// CPU in the closed loop, on the cores the server under test shares.
// Anything else, and anything unusual in these two (another body, a body
// or message field given twice, which proto merges), goes to
// proto.Unmarshal.

// Field numbers (proto/courier/v1/courier.proto).
const (
	frameIDField       = 1 // ServerFrame.id
	frameAcceptedField = 3 // ServerFrame.accepted
	frameDeliverField  = 5 // ServerFrame.deliver

	deliverSeqField      = 1 // Deliver.seq
	deliverEnvelopeField = 2 // Deliver.envelope

	envelopeKindField    = 1  // Envelope.kind
	envelopePayloadField = 8  // Envelope.payload
	envelopeReceiptField = 9  // Envelope.receipt
	envelopeGroupField   = 11 // Envelope.group

	receiptTypeField     = 1 // Receipt.type
	receiptMessagesField = 2 // Receipt.messages
)

// delivery is what the bench reads of a Deliver frame.
type delivery struct {
	seq      uint64
	kind     pb.EnvelopeKind
	payload  []byte // points into the frame
	group    bool   // Envelope.group is set
	receipt  pb.ReceiptType
	receipts int // Receipt.messages
}

// fastFrame is an Accepted or Deliver ServerFrame, as the bench reads it.
type fastFrame struct {
	id      uint64
	body    protowire.Number // frameAcceptedField or frameDeliverField
	deliver delivery
}

// deliveryOf is what the bench reads of d.
func deliveryOf(d *pb.Deliver) delivery {
	e := d.GetEnvelope()
	return delivery{seq: d.GetSeq(), kind: e.GetKind(), payload: e.GetPayload(), group: e.GetGroup() != "",
		receipt: e.GetReceipt().GetType(), receipts: len(e.GetReceipt().GetMessages())}
}

// decodeFast decodes b into f if it is an Accepted or a Deliver frame
// written plainly; false: b is for proto.Unmarshal.
func decodeFast(b []byte, f *fastFrame) bool {
	*f = fastFrame{}
	return fields(b, func(num protowire.Number, typ protowire.Type, v uint64, sub []byte) bool {
		switch {
		case num == frameIDField && typ == protowire.VarintType:
			f.id = v
			return true
		case (num == frameAcceptedField || num == frameDeliverField) && typ == protowire.BytesType && f.body == 0:
			f.body = num
			if num == frameAcceptedField {
				return true // the bench uses the frame's id only
			}
			return decodeDeliver(sub, &f.deliver)
		}
		return false
	}) && f.body != 0
}

func decodeDeliver(b []byte, d *delivery) bool {
	envelope := false
	return fields(b, func(num protowire.Number, typ protowire.Type, v uint64, sub []byte) bool {
		switch {
		case num == deliverSeqField && typ == protowire.VarintType:
			d.seq = v
			return true
		case num == deliverEnvelopeField && typ == protowire.BytesType && !envelope:
			envelope = true
			return decodeEnvelope(sub, d)
		}
		return false
	})
}

func decodeEnvelope(b []byte, d *delivery) bool {
	receipt := false
	return fields(b, func(num protowire.Number, typ protowire.Type, v uint64, sub []byte) bool {
		switch num {
		case envelopeKindField:
			d.kind = pb.EnvelopeKind(int32(v))
			return typ == protowire.VarintType
		case envelopePayloadField:
			d.payload = sub
			return typ == protowire.BytesType
		case envelopeGroupField:
			d.group = len(sub) > 0
			return typ == protowire.BytesType
		case envelopeReceiptField:
			if typ != protowire.BytesType || receipt {
				return false
			}
			receipt = true
			return decodeReceipt(sub, d)
		}
		// Fields the bench does not read; an unknown one is kept by
		// proto as unknown, and skipped here alike.
		return true
	})
}

func decodeReceipt(b []byte, d *delivery) bool {
	return fields(b, func(num protowire.Number, typ protowire.Type, v uint64, sub []byte) bool {
		switch num {
		case receiptTypeField:
			d.receipt = pb.ReceiptType(int32(v))
			return typ == protowire.VarintType
		case receiptMessagesField:
			d.receipts++
			return typ == protowire.BytesType
		}
		return true
	})
}

// fields calls fn for each field of the message b: its number, wire type
// and value (varint or fixed: v; length-delimited: sub). It reports false
// if b is malformed, has a group, or fn returned false.
func fields(b []byte, fn func(num protowire.Number, typ protowire.Type, v uint64, sub []byte) bool) bool {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return false
		}
		b = b[n:]
		var v uint64
		var sub []byte
		switch typ {
		case protowire.VarintType:
			v, n = protowire.ConsumeVarint(b)
		case protowire.Fixed32Type:
			var x uint32
			x, n = protowire.ConsumeFixed32(b)
			v = uint64(x)
		case protowire.Fixed64Type:
			v, n = protowire.ConsumeFixed64(b)
		case protowire.BytesType:
			sub, n = protowire.ConsumeBytes(b)
		default:
			return false
		}
		if n < 0 {
			return false
		}
		b = b[n:]
		if !fn(num, typ, v, sub) {
			return false
		}
	}
	return true
}
