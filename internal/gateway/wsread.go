package gateway

import (
	"encoding/binary"
	"unicode/utf8"

	"github.com/coder/websocket"
	"github.com/gobwas/ws"

	pb "github.com/courier-im/courier/proto/courier/v1"
)

// Reading WebSocket frames on the epoll transport (RFC 6455, section 5).
//
// A loop hands each read to evInput, which parses the frames in it in
// place: a client frame is masked, so its payload is unmasked in the read
// buffer and, for a data message, copied into a buffer queued for the
// connection's worker. A frame that the read ends in the middle of is kept
// (wsPartial) and completed by the next reads; so is a message sent in
// fragments. No extension is negotiated, so the reserved bits must be 0.
//
// A frame that would take its message over MaxFrame is refused from its
// header, before its payload arrives: the messages before it are handled,
// then the connection is closed with FRAME_TOO_LARGE (1009). A frame that
// breaks the protocol closes it with 1002. Either way nothing after it is
// parsed.

// wsPartial holds what a connection's input has of a frame or a message
// that is not complete yet.
type wsPartial struct {
	frame *[]byte // the bytes of an incomplete frame, from its header on
	msg   *[]byte // the payload so far of a fragmented message; nil: none
	text  bool    // msg is a text message
}

func (p *wsPartial) release() {
	if p.frame != nil {
		putBuffer(p.frame)
		p.frame = nil
	}
	if p.msg != nil {
		putBuffer(p.msg)
		p.msg = nil
	}
}

// WebSocket opcodes.
const (
	opContinuation = 0x0
	opText         = 0x1
	opBinary       = 0x2
	opClose        = 0x8
	opPing         = 0x9
	opPong         = 0xa
)

// evInput parses bytes read from the socket (on its loop, or in accept
// before the loop has the socket).
func (c *conn) evInput(data []byte) {
	p := c.ev.rd
	if p != nil && p.frame != nil {
		// Complete the frame carried over: parse the carried bytes and
		// this read as one.
		*p.frame = append(*p.frame, data...)
		b := p.frame
		p.frame = nil
		c.evParse(*b)
		putBuffer(b)
	} else {
		c.evParse(data)
	}
	if p = c.ev.rd; p != nil && p.frame == nil && p.msg == nil {
		c.ev.rd = nil
	}
}

// evParse parses the frames of b, keeping an incomplete last one.
func (c *conn) evParse(b []byte) {
	limit := uint64(c.g.cfg.MaxFrame)
	for len(b) > 0 && !c.ev.has(evBroken) {
		if len(b) < 2 {
			c.evKeep(b)
			return
		}
		b0, b1 := b[0], b[1]
		fin, op := b0&0x80 != 0, b0&0x0f
		h := 2
		n := uint64(b1 & 0x7f)
		switch n {
		case 126:
			h += 2
		case 127:
			h += 8
		}
		if b1&0x80 != 0 {
			h += 4
		}
		if len(b) < h {
			c.evKeep(b)
			return
		}
		switch n {
		case 126:
			n = uint64(binary.BigEndian.Uint16(b[2:4]))
		case 127:
			n = binary.BigEndian.Uint64(b[2:10])
		}
		var msgLen uint64 // of the data message so far, with this frame
		if p := c.ev.rd; op == opContinuation && p != nil && p.msg != nil {
			msgLen = uint64(len(*p.msg))
		}
		switch {
		case b0&0x70 != 0:
			c.evProtocolError("reserved bits set without an extension")
			return
		case b1&0x80 == 0:
			c.evProtocolError("client frames must be masked")
			return
		case op >= opClose && (!fin || n > 125):
			c.evProtocolError("control frames must be final and at most 125 bytes")
			return
		case op > opBinary && op != opClose && op != opPing && op != opPong:
			c.evProtocolError("unknown opcode")
			return
		case op == opContinuation && (c.ev.rd == nil || c.ev.rd.msg == nil):
			c.evProtocolError("continuation frame without a message to continue")
			return
		case (op == opText || op == opBinary) && c.ev.rd != nil && c.ev.rd.msg != nil:
			c.evProtocolError("new message before the last one's final fragment")
			return
		case op < opClose && (n > limit || msgLen+n > limit):
			c.evTooLarge()
			return
		}
		if uint64(len(b)-h) < n {
			c.evKeep(b)
			return
		}
		var mask [4]byte
		copy(mask[:], b[h-4:h])
		payload := b[h : h+int(n)]
		ws.Cipher(payload, mask, 0)
		b = b[h+int(n):]
		c.touch()
		c.evFrame(op, fin, payload)
	}
}

// evKeep keeps b, the start of a frame, until the next read.
func (c *conn) evKeep(b []byte) {
	p := c.ev.rd
	if p == nil {
		p = &wsPartial{}
		c.ev.rd = p
	}
	p.frame = getBuffer(len(b))
	*p.frame = append(*p.frame, b...)
}

// evFrame acts on one complete frame whose payload is unmasked.
func (c *conn) evFrame(op byte, fin bool, payload []byte) {
	switch op {
	case opPing:
		c.evWriteControl(opPong, payload)
		return
	case opPong:
		return
	case opClose:
		c.evPeerClose(payload)
		return
	}
	if c.ev.has(evDiscard) {
		return // closing: data is no longer handled
	}
	p := c.ev.rd
	if op != opContinuation {
		if fin {
			c.evMessage(op == opText, payload)
			return
		}
		if p == nil {
			p = &wsPartial{}
			c.ev.rd = p
		}
		p.msg = getBuffer(len(payload))
		*p.msg = append(*p.msg, payload...)
		p.text = op == opText
		return
	}
	*p.msg = append(*p.msg, payload...)
	if fin {
		m := p.msg
		p.msg = nil
		c.evQueue(evJob{data: m, text: p.text})
	}
}

// evMessage queues a copy of a complete message for the worker.
func (c *conn) evMessage(text bool, payload []byte) {
	m := getBuffer(len(payload))
	*m = append(*m, payload...)
	c.evQueue(evJob{data: m, text: text})
}

// evPeerClose answers the device's close frame: the messages before it
// are handled, then, unless the server began the close, the code is
// echoed; then the socket is shut down.
func (c *conn) evPeerClose(payload []byte) {
	c.ev.set(evBroken) // nothing after a close frame counts
	code := websocket.StatusNormalClosure
	switch {
	case len(payload) == 1:
		c.evProtocolError("close frame with a 1-byte body")
		return
	case len(payload) >= 2:
		code = websocket.StatusCode(binary.BigEndian.Uint16(payload))
		if !utf8.Valid(payload[2:]) {
			c.evProtocolError("close reason is not UTF-8")
			return
		}
	}
	c.evQueue(evJob{fn: func() {
		if !c.closing.Load() {
			c.ev.set(evDiscard)
			c.closeWith(0, "", echoCode(code), 0)
		}
		c.evShutdownAfterWrites()
	}})
}

// echoCode is the close code sent back for the device's code: itself,
// unless it may not be sent (1005, 1006, 1015 and undefined ones).
func echoCode(code websocket.StatusCode) websocket.StatusCode {
	switch {
	case code >= 1000 && code <= 1003, code >= 1007 && code <= 1014, code >= 3000 && code <= 4999:
		return code
	}
	return websocket.StatusNormalClosure
}

// evTooLarge refuses a message over MaxFrame: after the messages before
// it, the connection closes with FRAME_TOO_LARGE.
func (c *conn) evTooLarge() {
	c.ev.set(evBroken)
	c.g.cfg.Metrics.FrameErrors.WithLabelValues(pb.ErrorCode_ERROR_CODE_FRAME_TOO_LARGE.String()).Inc()
	c.evQueue(evJob{fn: func() {
		c.ev.set(evDiscard)
		c.closeWith(pb.ErrorCode_ERROR_CODE_FRAME_TOO_LARGE, "frame larger than the limit", websocket.StatusMessageTooBig, 0)
	}})
}

// evProtocolError closes the connection with 1002 after the messages
// before the offending frame.
func (c *conn) evProtocolError(reason string) {
	c.ev.set(evBroken)
	c.evQueue(evJob{fn: func() {
		c.ev.set(evDiscard)
		c.logger().Debug("websocket protocol error; closing", "reason", reason)
		c.closeWith(0, "", websocket.StatusProtocolError, 0)
	}})
}

// Buffers for messages and for bytes waiting to be written come from
// batchPool (evwrite.go) up to 64 KiB, and are made to measure above.

// getBuffer returns an empty buffer with room for at least n bytes.
func getBuffer(n int) *[]byte {
	if n > 4<<10 {
		b := make([]byte, 0, n)
		return &b
	}
	return batchPool.Get().(*[]byte)
}

// putBuffer returns b to the pool if it is not too large to keep.
func putBuffer(b *[]byte) {
	if cap(*b) > 64<<10 {
		return
	}
	*b = (*b)[:0]
	batchPool.Put(b)
}
