package gateway

import (
	"unicode/utf8"
	"unsafe"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	pb "github.com/courier-im/courier/proto/courier/v1"
)

// Decoding client frames.
//
// Every message brings the server three client frames: the sender's Send,
// the receiver's Ack and the sender's Ack of the DELIVERED receipt.
// proto.Unmarshal decodes them by reflection, with a dozen allocations for
// a Send (the frame, its oneof wrapper, the Send, each string, the payload
// list, each payload, each address, each byte slice): about 5 % of the
// server's CPU in the closed loop. decodeClientFrame decodes those two
// kinds by hand, with protowire, into structs allocated together, and
// leaves everything else to proto.Unmarshal: any other body, and any frame
// the hand decoder does not take exactly as it is written (a field that
// appears twice where proto would keep the last or merge, an unknown field
// or wire type, a string that is not UTF-8, a malformed field). So the
// result is always the one proto.Unmarshal gives (FuzzDecodeClientFrame
// checks that), only cheaper for the frames that make up the traffic.

// decodeClientFrame decodes a ClientFrame as proto.Unmarshal does.
func decodeClientFrame(data []byte) (*pb.ClientFrame, error) {
	if f := fastClientFrame(data); f != nil {
		return f, nil
	}
	f := new(pb.ClientFrame)
	if err := proto.Unmarshal(data, f); err != nil {
		return nil, err
	}
	return f, nil
}

// Field numbers (proto/courier/v1/courier.proto).
const (
	fClientFrameID   = 1
	fClientFrameSend = 2
	fClientFrameAck  = 3

	fSendClientMsgID    = 1
	fSendTo             = 2
	fSendPayloads       = 3
	fSendGroup          = 4
	fSendGroupVersion   = 5
	fSendPayload        = 6
	fSendFirstAttempt   = 7
	fPayloadDevice      = 1
	fPayloadData        = 2
	fAddressUser        = 1
	fAddressDevice      = 2
	fAckSeqs            = 1
	inlinePayloads      = 2 // a Send's payloads held in its own allocation
	maxFastSendPayloads = 1 << 12
)

// sendFrame is a decoded Send frame in one allocation, for up to
// inlinePayloads payloads.
type sendFrame struct {
	f   pb.ClientFrame
	w   pb.ClientFrame_Send
	s   pb.Send
	ptr [inlinePayloads]*pb.DevicePayload
	p   [inlinePayloads]pb.DevicePayload
	a   [inlinePayloads]pb.DeviceAddress
}

// ackFrame is a decoded Ack frame in one allocation, for up to 4 seqs.
type ackFrame struct {
	f    pb.ClientFrame
	w    pb.ClientFrame_Ack
	a    pb.Ack
	seqs [4]uint64
}

// fastClientFrame decodes a ClientFrame whose body is a Send or an Ack
// written plainly, or returns nil for proto.Unmarshal to decode.
func fastClientFrame(b []byte) *pb.ClientFrame {
	var id uint64
	var body []byte
	var bodyNum protowire.Number
	seenID := false
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil
		}
		b = b[n:]
		switch {
		case num == fClientFrameID && typ == protowire.VarintType && !seenID:
			v, m := protowire.ConsumeVarint(b)
			if m < 0 {
				return nil
			}
			id, seenID, b = v, true, b[m:]
		case (num == fClientFrameSend || num == fClientFrameAck) && typ == protowire.BytesType && bodyNum == 0:
			v, m := protowire.ConsumeBytes(b)
			if m < 0 {
				return nil
			}
			body, bodyNum, b = v, num, b[m:]
		default:
			return nil
		}
	}
	switch bodyNum {
	case fClientFrameSend:
		return fastSend(id, body)
	case fClientFrameAck:
		return fastAck(id, body)
	}
	return nil
}

// fastAck decodes an Ack body (seqs packed or not, in any number of runs).
func fastAck(id uint64, b []byte) *pb.ClientFrame {
	a := new(ackFrame)
	seqs := a.seqs[:0]
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 || num != fAckSeqs {
			return nil
		}
		b = b[n:]
		switch typ {
		case protowire.VarintType:
			v, m := protowire.ConsumeVarint(b)
			if m < 0 {
				return nil
			}
			seqs, b = append(seqs, v), b[m:]
		case protowire.BytesType:
			v, m := protowire.ConsumeBytes(b)
			if m < 0 {
				return nil
			}
			b = b[m:]
			for len(v) > 0 {
				x, k := protowire.ConsumeVarint(v)
				if k < 0 {
					return nil
				}
				seqs, v = append(seqs, x), v[k:]
			}
		default:
			return nil
		}
	}
	if len(seqs) > 0 {
		a.a.Seqs = seqs
	}
	a.w.Ack = &a.a
	a.f.Id, a.f.Body = id, &a.w
	return &a.f
}

// fastSend decodes a Send body. Its strings and byte fields share one
// allocation (filler), its structs another (sendFrame).
func fastSend(id uint64, b []byte) *pb.ClientFrame {
	// First pass: check the fields and size what they hold.
	var seen [fSendFirstAttempt + 1]bool
	var strBytes, dataBytes, payloads int
	for rest := b; len(rest) > 0; {
		num, typ, n := protowire.ConsumeTag(rest)
		if n < 0 || num < fSendClientMsgID || num > fSendFirstAttempt {
			return nil
		}
		rest = rest[n:]
		if num == fSendGroupVersion || num == fSendFirstAttempt {
			if typ != protowire.VarintType || seen[num] {
				return nil
			}
			_, m := protowire.ConsumeVarint(rest)
			if m < 0 {
				return nil
			}
			rest, seen[num] = rest[m:], true
			continue
		}
		if typ != protowire.BytesType {
			return nil
		}
		v, m := protowire.ConsumeBytes(rest)
		if m < 0 {
			return nil
		}
		rest = rest[m:]
		switch num {
		case fSendPayloads: // repeated
			user, data, ok := checkPayload(v)
			if !ok || payloads == maxFastSendPayloads {
				return nil
			}
			strBytes, dataBytes, payloads = strBytes+user, dataBytes+data, payloads+1
			continue
		case fSendPayload:
			dataBytes += len(v)
		default: // client_msg_id, to, group
			if !utf8.Valid(v) {
				return nil
			}
			strBytes += len(v)
		}
		if seen[num] {
			return nil
		}
		seen[num] = true
	}

	// Second pass: fill in. Everything was checked above.
	sf := new(sendFrame)
	s := &sf.s
	fl := filler{strEnd: strBytes}
	if n := strBytes + dataBytes; n > 0 {
		fl.buf = make([]byte, n)
		fl.d = strBytes
	}
	var ptrs []*pb.DevicePayload
	var ps []pb.DevicePayload
	var as []pb.DeviceAddress
	if payloads <= inlinePayloads {
		ptrs, ps, as = sf.ptr[:payloads:payloads], sf.p[:payloads], sf.a[:payloads]
	} else {
		ptrs, ps, as = make([]*pb.DevicePayload, payloads), make([]pb.DevicePayload, payloads), make([]pb.DeviceAddress, payloads)
	}
	i := 0
	for rest := b; len(rest) > 0; {
		num, typ, n := protowire.ConsumeTag(rest)
		rest = rest[n:]
		if typ == protowire.VarintType {
			v, m := protowire.ConsumeVarint(rest)
			rest = rest[m:]
			if num == fSendGroupVersion {
				s.GroupVersion = v
			} else {
				s.FirstAttempt = protowire.DecodeBool(v)
			}
			continue
		}
		v, m := protowire.ConsumeBytes(rest)
		rest = rest[m:]
		switch num {
		case fSendClientMsgID:
			s.ClientMsgId = fl.str(v)
		case fSendTo:
			s.To = fl.str(v)
		case fSendGroup:
			s.Group = fl.str(v)
		case fSendPayload:
			s.Payload = fl.data(v)
		case fSendPayloads:
			p, a := &ps[i], &as[i]
			ptrs[i] = p
			i++
			for len(v) > 0 { // checked: device and payload, once each
				pn, _, k := protowire.ConsumeTag(v)
				v = v[k:]
				d, k := protowire.ConsumeBytes(v)
				v = v[k:]
				if pn == fPayloadData {
					p.Payload = fl.data(d)
					continue
				}
				p.Device = a
				for len(d) > 0 {
					an, _, k := protowire.ConsumeTag(d)
					d = d[k:]
					if an == fAddressUser {
						u, k := protowire.ConsumeBytes(d)
						d = d[k:]
						a.User = fl.str(u)
						continue
					}
					x, k := protowire.ConsumeVarint(d)
					d = d[k:]
					a.Device = uint32(x)
				}
			}
		}
	}
	if payloads > 0 {
		s.Payloads = ptrs
	}
	sf.w.Send = s
	sf.f.Id, sf.f.Body = id, &sf.w
	return &sf.f
}

// filler hands out a decoded Send's strings and byte fields from one
// buffer: the strings from buf[:strEnd], each written once and never
// again (so a string over those bytes stays what it was written as), the
// byte fields from buf[strEnd:], each capped to its own bytes.
type filler struct {
	buf    []byte
	strEnd int
	s, d   int // next string byte, next data byte
}

func (f *filler) str(v []byte) string {
	if len(v) == 0 {
		return ""
	}
	at := f.s
	f.s += copy(f.buf[at:f.strEnd], v)
	return unsafe.String(&f.buf[at], len(v))
}

func (f *filler) data(v []byte) []byte {
	if len(v) == 0 {
		return nil // as proto.Unmarshal leaves an empty proto3 bytes field
	}
	at := f.d
	f.d += copy(f.buf[at:], v)
	return f.buf[at:f.d:f.d]
}

// checkPayload checks a DevicePayload written plainly (each field once,
// with its own wire type; the address's user UTF-8) and returns the
// lengths of its user name and payload bytes.
func checkPayload(b []byte) (user, data int, ok bool) {
	var seenDevice, seenData bool
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 || typ != protowire.BytesType {
			return 0, 0, false
		}
		b = b[n:]
		v, m := protowire.ConsumeBytes(b)
		if m < 0 {
			return 0, 0, false
		}
		b = b[m:]
		switch {
		case num == fPayloadDevice && !seenDevice:
			seenDevice = true
			if user, ok = checkAddress(v); !ok {
				return 0, 0, false
			}
		case num == fPayloadData && !seenData:
			seenData = true
			data = len(v)
		default:
			return 0, 0, false
		}
	}
	return user, data, true
}

// checkAddress checks a DeviceAddress written plainly and returns the
// length of its user name.
func checkAddress(b []byte) (user int, ok bool) {
	var seenUser, seenDevice bool
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return 0, false
		}
		b = b[n:]
		switch {
		case num == fAddressUser && typ == protowire.BytesType && !seenUser:
			seenUser = true
			v, m := protowire.ConsumeBytes(b)
			if m < 0 || !utf8.Valid(v) {
				return 0, false
			}
			b, user = b[m:], len(v)
		case num == fAddressDevice && typ == protowire.VarintType && !seenDevice:
			seenDevice = true
			_, m := protowire.ConsumeVarint(b)
			if m < 0 {
				return 0, false
			}
			b = b[m:]
		default:
			return 0, false
		}
	}
	return user, true
}
