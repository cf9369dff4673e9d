package bench

import (
	"bufio"
	"bytes"
	crand "crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/courier-im/courier/internal/evloop"
)

// The bench's WebSocket client is event-driven: every connection is a
// non-blocking socket registered with one of a few event loops for the
// whole process (loop.go), and frames are parsed as the loop reads them. An
// idle connection costs its socket, its small wsConn and its client
// struct: no goroutine, no read or write buffer (a partial frame is
// kept only while it is incomplete). The opening handshake is done
// synchronously by a bounded pool of dialers, then the socket is handed to
// the engine. Only the client side of RFC 6455 that courier needs is
// implemented: masked binary frames out; binary, ping, pong and close
// frames in, fragmented or not; no extensions.

// wsEngine is the process's event loops for bench connections (loop.go).
type wsEngine struct {
	loops []*loop
	wg    sync.WaitGroup
}

// newEngine starts an engine with pollers event loops (0: one per core).
func newEngine(pollers int) (*wsEngine, error) {
	if pollers <= 0 {
		pollers = max(1, runtime.NumCPU())
	}
	e := &wsEngine{}
	for range pollers {
		l, err := newLoop()
		if err != nil {
			e.closeLoops()
			return nil, fmt.Errorf("start event loop: %w", err)
		}
		e.loops = append(e.loops, l)
	}
	for _, l := range e.loops {
		e.wg.Add(1)
		go func() {
			defer e.wg.Done()
			if err := l.run(); err != nil {
				fmt.Fprintf(os.Stderr, "bench: event loop stopped: %v\n", err)
			}
		}()
	}
	return e, nil
}

// add hands the socket of nc (nc itself is closed) to a loop, for c.
func (e *wsEngine) add(nc net.Conn, c *client) (*wsConn, error) {
	fd, err := evloop.DupSocket(nc)
	nc.Close()
	if err != nil {
		return nil, err
	}
	return e.loops[fd%len(e.loops)].add(fd, c)
}

// stop ends the loops, then the connections still open, each telling its
// client.
func (e *wsEngine) stop() {
	for _, l := range e.loops {
		l.Stop()
	}
	e.wg.Wait()
	for _, l := range e.loops {
		l.mu.Lock()
		conns := make([]*wsConn, 0, len(l.conns))
		for _, w := range l.conns {
			conns = append(conns, w)
		}
		l.mu.Unlock()
		for _, w := range conns {
			w.end(net.ErrClosed)
		}
	}
	e.closeLoops()
}

func (e *wsEngine) closeLoops() {
	for _, l := range e.loops {
		l.Close()
	}
}

// dialError is a failed connection attempt, classified for the reports.
type dialError struct {
	kind       string // "refused" (TCP), "http_429", "http_503", "http_401", "timeout", "other"
	retryAfter time.Duration
	err        error
}

func (e *dialError) Error() string { return e.kind + ": " + e.err.Error() }
func (e *dialError) Unwrap() error { return e.err }

// dial opens a WebSocket to hostport from source address src (nil: any),
// does the opening handshake with the Authorization header auth, and
// registers the connection with the engine under c. The handshake's
// leftover bytes (the server's first frames often share its packet) are
// parsed before any later data.
func (e *wsEngine) dial(c *client, hostport string, src net.IP, auth string, timeout time.Duration) error {
	d := net.Dialer{Timeout: timeout}
	if src != nil {
		d.LocalAddr = &net.TCPAddr{IP: src}
	}
	conn, err := d.Dial("tcp", hostport)
	if err != nil {
		kind := "other"
		var ne net.Error
		switch {
		case errors.Is(err, errConnRefused):
			kind = "refused"
		case errors.As(err, &ne) && ne.Timeout():
			kind = "timeout"
		}
		return &dialError{kind: kind, err: err}
	}
	leftover, err := handshake(conn, hostport, auth, timeout)
	if err != nil {
		conn.Close()
		return err
	}
	// The client is locked before its socket is on a loop: the loop's
	// reads wait for the leftover bytes to be parsed first.
	c.mu.Lock()
	nc, err := e.add(conn, c) // a duplicate of the socket; conn is closed
	if err != nil {
		c.mu.Unlock()
		return &dialError{kind: "other", err: err}
	}
	c.nc = nc
	c.rbuf = nil
	c.frag = nil
	c.held = true
	if len(leftover) > 0 {
		c.parseLocked(leftover)
	}
	c.mu.Unlock()
	c.flushAcks()
	c.mu.Lock()
	c.releaseLocked()
	c.mu.Unlock()
	return nil
}

// errConnRefused matches through *net.OpError and *os.SyscallError.
var errConnRefused error = syscall.ECONNREFUSED

// handshake sends the upgrade request and reads the response head. It
// returns the bytes read past the head.
func handshake(conn net.Conn, hostport, auth string, timeout time.Duration) ([]byte, error) {
	var key [16]byte
	if _, err := crand.Read(key[:]); err != nil {
		return nil, &dialError{kind: "other", err: err}
	}
	conn.SetDeadline(time.Now().Add(timeout))
	defer conn.SetDeadline(time.Time{})
	req := "GET /v1/ws HTTP/1.1\r\nHost: " + hostport +
		"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " +
		base64.StdEncoding.EncodeToString(key[:]) + "\r\nAuthorization: " + auth + "\r\n\r\n"
	if _, err := io.WriteString(conn, req); err != nil {
		return nil, &dialError{kind: classifyIO(err), err: err}
	}
	buf := make([]byte, 0, 1024)
	var tmp [1024]byte
	for {
		n, err := conn.Read(tmp[:])
		buf = append(buf, tmp[:n]...)
		if i := bytes.Index(buf, []byte("\r\n\r\n")); i >= 0 {
			head, rest := buf[:i+4], buf[i+4:]
			resp, perr := http.ReadResponse(bufio.NewReader(bytes.NewReader(head)), nil)
			if perr != nil {
				return nil, &dialError{kind: "other", err: fmt.Errorf("bad handshake response: %w", perr)}
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusSwitchingProtocols {
				de := &dialError{kind: "http_" + strconv.Itoa(resp.StatusCode), err: fmt.Errorf("upgrade refused: %s", resp.Status)}
				if s, err := strconv.Atoi(resp.Header.Get("Retry-After")); err == nil {
					de.retryAfter = time.Duration(s) * time.Second
				}
				return nil, de
			}
			if !strings.EqualFold(resp.Header.Get("Upgrade"), "websocket") {
				return nil, &dialError{kind: "other", err: errors.New("bad handshake: no Upgrade: websocket")}
			}
			return append([]byte(nil), rest...), nil
		}
		if err != nil {
			return nil, &dialError{kind: classifyIO(err), err: fmt.Errorf("reading handshake: %w", err)}
		}
		if len(buf) > 16<<10 {
			return nil, &dialError{kind: "other", err: errors.New("handshake response too large")}
		}
	}
}

func classifyIO(err error) string {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return "timeout"
	}
	if errors.Is(err, errConnRefused) {
		return "refused"
	}
	return "other"
}

// WebSocket opcodes.
const (
	opCont   = 0x0
	opText   = 0x1
	opBinary = 0x2
	opClose  = 0x8
	opPing   = 0x9
	opPong   = 0xA
)

// maxMessage bounds a reassembled message (the server's frame limit is
// far below this).
const maxMessage = 64 << 20

var errProtocol = errors.New("websocket protocol error")

// parseLocked consumes data (valid only during the call) and dispatches
// complete messages; c.mu is held. An incomplete frame is copied to
// c.rbuf until the rest arrives.
func (c *client) parseLocked(data []byte) {
	if len(c.rbuf) > 0 {
		c.rbuf = append(c.rbuf, data...)
		data = c.rbuf
	}
	for len(data) > 0 {
		n, err := c.frameLocked(data)
		if err != nil {
			c.failLocked(err)
			return
		}
		if n == 0 {
			break
		}
		data = data[n:]
	}
	switch {
	case len(data) == 0:
		c.rbuf = nil // an idle connection keeps no buffer
	case len(c.rbuf) > 0:
		c.rbuf = append(c.rbuf[:0], data...)
	default:
		c.rbuf = append(make([]byte, 0, len(data)+512), data...)
	}
}

// frameLocked handles the frame at the start of data and returns its
// length, or 0 if data does not hold a whole frame yet.
func (c *client) frameLocked(data []byte) (int, error) {
	if len(data) < 2 {
		return 0, nil
	}
	fin := data[0]&0x80 != 0
	op := data[0] & 0x0f
	if data[0]&0x70 != 0 {
		return 0, fmt.Errorf("%w: reserved bits set", errProtocol)
	}
	masked := data[1]&0x80 != 0
	length := uint64(data[1] & 0x7f)
	hdr := 2
	switch length {
	case 126:
		if len(data) < 4 {
			return 0, nil
		}
		length = uint64(binary.BigEndian.Uint16(data[2:]))
		hdr = 4
	case 127:
		if len(data) < 10 {
			return 0, nil
		}
		length = binary.BigEndian.Uint64(data[2:])
		hdr = 10
	}
	if length > maxMessage {
		return 0, fmt.Errorf("%w: frame of %d bytes", errProtocol, length)
	}
	var mask []byte
	if masked {
		if len(data) < hdr+4 {
			return 0, nil
		}
		mask = data[hdr : hdr+4]
		hdr += 4
	}
	total := hdr + int(length)
	if len(data) < total {
		return 0, nil
	}
	payload := data[hdr:total]
	if masked {
		for i := range payload {
			payload[i] ^= mask[i&3]
		}
	}
	switch op {
	case opPing:
		c.writeFrameLocked(opPong, payload)
	case opPong:
	case opClose:
		c.closing = true
		code := 1005
		if len(payload) >= 2 {
			code = int(binary.BigEndian.Uint16(payload))
		}
		c.closeCode = code
		c.writeFrameLocked(opClose, payload[:min(len(payload), 2)])
		if c.nc != nil {
			c.nc.Close()
		}
	case opBinary, opText, opCont:
		if op == opText {
			return 0, fmt.Errorf("%w: text message", errProtocol)
		}
		if op != opCont && c.frag != nil {
			return 0, fmt.Errorf("%w: new message inside a fragmented one", errProtocol)
		}
		if op == opCont && c.frag == nil {
			return 0, fmt.Errorf("%w: continuation without a start", errProtocol)
		}
		if !fin {
			c.frag = append(c.frag, payload...)
			if c.frag == nil {
				c.frag = []byte{}
			}
			if len(c.frag) > maxMessage {
				return 0, fmt.Errorf("%w: message too large", errProtocol)
			}
			break
		}
		if c.frag != nil {
			msg := append(c.frag, payload...)
			c.frag = nil
			c.onMessageLocked(msg)
		} else {
			c.onMessageLocked(payload)
		}
	default:
		return 0, fmt.Errorf("%w: opcode %d", errProtocol, op)
	}
	return total, nil
}

// framePool holds encode buffers for outgoing frames.
var framePool = sync.Pool{New: func() any { b := make([]byte, 0, 512); return &b }}

// writeFrame sends one masked frame. wsConn.Write never blocks: what the
// socket cannot take now waits for its loop.
func (c *client) writeFrame(op byte, payload []byte) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.writeFrameLocked(op, payload)
}

func (c *client) writeFrameLocked(op byte, payload []byte) error {
	nc := c.nc
	if nc == nil {
		return net.ErrClosed
	}
	if c.held {
		if op != opClose {
			if c.out == nil {
				c.out = framePool.Get().(*[]byte)
			}
			*c.out = appendFrame(*c.out, op, payload)
			return nil
		}
		// The connection is closed right after a close frame: what
		// was held goes first, now.
		c.releaseLocked()
	}
	bp := framePool.Get().(*[]byte)
	b := appendFrame((*bp)[:0], op, payload)
	_, err := nc.Write(b)
	*bp = b[:0]
	if cap(b) <= 64<<10 {
		framePool.Put(bp)
	}
	return err
}

// appendFrame appends a final, masked client frame.
func appendFrame(b []byte, op byte, payload []byte) []byte {
	b = append(b, 0x80|op)
	n := len(payload)
	switch {
	case n < 126:
		b = append(b, 0x80|byte(n))
	case n <= 0xffff:
		b = append(b, 0x80|126, byte(n>>8), byte(n))
	default:
		b = append(b, 0x80|127)
		b = binary.BigEndian.AppendUint64(b, uint64(n))
	}
	var key [4]byte
	binary.LittleEndian.PutUint32(key[:], rand.Uint32())
	b = append(b, key[:]...)
	start := len(b)
	b = append(b, payload...)
	for i := range payload {
		b[start+i] ^= key[i&3]
	}
	return b
}
