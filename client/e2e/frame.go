package e2e

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// The payload format (docs/e2e.md). Outer, in the envelope's payload:
//
//	version (1 byte, 1) | type (1 byte) | libsignal message
//
// with type 1 a PreKeySignalMessage (first messages of a session), 2 a
// SignalMessage, or 3 a SenderKeyMessage (a group message, sealed with the
// sending device's sender key). Inner, the plaintext libsignal encrypts:
//
//	kind (1 byte) | uvarint len | message id | uvarint len | body | zero padding
//
// kind 1 is a user's message (id: its client message id, also on resends),
// kind 2 a control message; padding brings the length to a multiple of
// padBlock, so that ciphertext sizes say less about the text.
const (
	payloadVersion = 1

	typePreKey    = 1
	typeWhisper   = 2
	typeSenderKey = 3 // a group message: a SenderKeyMessage (signed)

	kindMessage = 1
	kindControl = 2

	// Control operations (the first byte of a control body).
	opResend    = 1 // uvarint target device, uvarint count, then count ids
	opSenderKey = 2 // group id, then a SenderKeyDistributionMessage (each uvarint-length-prefixed)
	opGroupInfo = 3 // group id, then the group's name (each uvarint-length-prefixed)

	padBlock = 32

	maxIDLen = 64 // client message ids are 1-64 bytes
)

var errMalformed = errors.New("malformed payload")

type inner struct {
	kind byte
	id   string
	body []byte
}

func (m inner) encode() []byte {
	n := 1 + binary.MaxVarintLen64*2 + len(m.id) + len(m.body)
	b := make([]byte, 0, n+padBlock)
	b = append(b, m.kind)
	b = binary.AppendUvarint(b, uint64(len(m.id)))
	b = append(b, m.id...)
	b = binary.AppendUvarint(b, uint64(len(m.body)))
	b = append(b, m.body...)
	pad := padBlock - len(b)%padBlock
	return append(b, make([]byte, pad)...)
}

func decodeInner(b []byte) (inner, error) {
	var m inner
	if len(b) < 1 {
		return m, errMalformed
	}
	m.kind, b = b[0], b[1:]
	if m.kind != kindMessage && m.kind != kindControl {
		return m, fmt.Errorf("%w: unknown kind %d", errMalformed, m.kind)
	}
	id, b, err := field(b, maxIDLen)
	if err != nil {
		return m, err
	}
	body, _, err := field(b, len(b))
	if err != nil {
		return m, err
	}
	m.id, m.body = string(id), body
	return m, nil
}

// field reads a uvarint-length-prefixed field of at most limit bytes.
func field(b []byte, limit int) (val, rest []byte, err error) {
	n, k := binary.Uvarint(b)
	if k <= 0 || n > uint64(limit) || n > uint64(len(b)-k) {
		return nil, nil, errMalformed
	}
	return b[k : k+int(n)], b[k+int(n):], nil
}

// resendRequest is the body of an opResend control message: device
// should send the messages with these ids again.
type resendRequest struct {
	device uint32
	ids    []string
}

func (r resendRequest) encode() []byte {
	b := []byte{opResend}
	b = binary.AppendUvarint(b, uint64(r.device))
	b = binary.AppendUvarint(b, uint64(len(r.ids)))
	for _, id := range r.ids {
		b = binary.AppendUvarint(b, uint64(len(id)))
		b = append(b, id...)
	}
	return b
}

// groupControl is the body of an opSenderKey or opGroupInfo control
// message: a group id and data (a SenderKeyDistributionMessage, or the
// group's name).
type groupControl struct {
	op    byte
	group string
	data  []byte
}

// maxGroupIDLen bounds group ids in control messages.
const maxGroupIDLen = 64

func (g groupControl) encode() []byte {
	b := []byte{g.op}
	b = binary.AppendUvarint(b, uint64(len(g.group)))
	b = append(b, g.group...)
	b = binary.AppendUvarint(b, uint64(len(g.data)))
	return append(b, g.data...)
}

// control is a decoded control body: a resend request or a group
// operation.
type control struct {
	op     byte
	resend resendRequest
	group  groupControl
}

func decodeControlOp(b []byte) (control, error) {
	if len(b) < 1 {
		return control{}, fmt.Errorf("%w: empty control message", errMalformed)
	}
	switch b[0] {
	case opResend:
		r, err := decodeControl(b)
		return control{op: opResend, resend: r}, err
	case opSenderKey, opGroupInfo:
		g := groupControl{op: b[0]}
		id, rest, err := field(b[1:], maxGroupIDLen)
		if err != nil || len(id) == 0 {
			return control{}, errMalformed
		}
		data, _, err := field(rest, len(rest))
		if err != nil || len(data) == 0 {
			return control{}, errMalformed
		}
		g.group, g.data = string(id), data
		return control{op: g.op, group: g}, nil
	}
	return control{}, fmt.Errorf("%w: unknown control operation %d", errMalformed, b[0])
}

func decodeControl(b []byte) (resendRequest, error) {
	var r resendRequest
	if len(b) < 1 || b[0] != opResend {
		return r, fmt.Errorf("%w: unknown control operation", errMalformed)
	}
	b = b[1:]
	dev, k := binary.Uvarint(b)
	if k <= 0 || dev == 0 || dev > 1<<32-1 {
		return r, errMalformed
	}
	b = b[k:]
	count, k := binary.Uvarint(b)
	if k <= 0 || count > 256 {
		return r, errMalformed
	}
	b = b[k:]
	r.device = uint32(dev)
	for range count {
		id, rest, err := field(b, maxIDLen)
		if err != nil {
			return r, err
		}
		r.ids = append(r.ids, string(id))
		b = rest
	}
	return r, nil
}
