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
// with type 1 a PreKeySignalMessage (first messages of a session) or 2 a
// SignalMessage. Inner, the plaintext libsignal encrypts:
//
//	kind (1 byte) | uvarint len | message id | uvarint len | body | zero padding
//
// kind 1 is a user's message (id: its client message id, also on resends),
// kind 2 a control message; padding brings the length to a multiple of
// padBlock, so that ciphertext sizes say less about the text.
const (
	payloadVersion = 1

	typePreKey  = 1
	typeWhisper = 2

	kindMessage = 1
	kindControl = 2

	// Control operations (the first byte of a control body).
	opResend = 1 // uvarint target device, uvarint count, then count ids

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
