package gateway

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/courier-im/courier/internal/auth"
	"github.com/courier-im/courier/internal/auth/authtest"
	"github.com/courier-im/courier/internal/delivery"
	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox/pebble"
	"github.com/courier-im/courier/internal/metrics"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

// wsFrame encodes a masked client frame with the given payload.
func wsFrame(op byte, fin bool, payload []byte) []byte {
	b0 := op
	if fin {
		b0 |= 0x80
	}
	n := len(payload)
	var h []byte
	switch {
	case n < 126:
		h = []byte{b0, 0x80 | byte(n)}
	case n < 1<<16:
		h = []byte{b0, 0x80 | 126, 0, 0}
		binary.BigEndian.PutUint16(h[2:], uint16(n))
	default:
		h = []byte{b0, 0x80 | 127, 0, 0, 0, 0, 0, 0, 0, 0}
		binary.BigEndian.PutUint64(h[2:], uint64(n))
	}
	mask := []byte{0x37, 0xfa, 0x21, 0x3d}
	h = append(h, mask...)
	for i, c := range payload {
		h = append(h, c^mask[i%4])
	}
	return h
}

// rawWS is a client speaking WebSocket over a plain TCP connection, to
// send what a library would not (split frames, bad frames).
type rawWS struct {
	t  *testing.T
	nc net.Conn
	br *bufio.Reader
}

// epollServer starts a gateway on the epoll transport with a registered
// device, alice.1, and returns its URL and alice's Authorization header.
func epollServer(t *testing.T, maxFrame int) (*Gateway, string, string) {
	t.Helper()
	accts := authtest.New()
	alice, cred, err := accts.Register("alice")
	if err != nil {
		t.Fatal(err)
	}
	mb, err := pebble.Open("mailbox", pebble.Options{FS: vfs.NewMem()})
	if err != nil {
		t.Fatal(err)
	}
	m := metrics.New(prometheus.NewRegistry())
	var n notifyTo
	svc := delivery.New(delivery.Config{Mailbox: mb, Accounts: accts, Notifier: &n, Metrics: m})
	g, err := Open(Config{Accounts: accts, Mailbox: mb, Delivery: svc, Auth: &auth.Authenticator{Accounts: accts},
		Metrics: m, WriteTimeout: 5 * time.Second, Transport: TransportEpoll, MaxFrame: maxFrame})
	if err != nil {
		t.Fatal(err)
	}
	n.g = g
	srv := httptest.NewServer(g)
	t.Cleanup(func() {
		srv.Close()
		g.Shutdown(context.Background())
		mb.Close()
	})
	return g, srv.URL, "Basic " + base64.StdEncoding.EncodeToString([]byte(alice.String()+":"+cred))
}

// dialRaw opens a connection and sends the handshake followed by early,
// then reads the 101 answer and Hello.
func dialRaw(t *testing.T, url, authz string, early []byte) *rawWS {
	t.Helper()
	nc, err := net.Dial("tcp", strings.TrimPrefix(url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(20 * time.Second))
	req := "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: " + authz + "\r\n\r\n"
	if _, err := nc.Write(append([]byte(req), early...)); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(nc)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols || resp.Header.Get("Sec-WebSocket-Accept") != "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" {
		t.Fatalf("handshake answered %s, accept %q", resp.Status, resp.Header.Get("Sec-WebSocket-Accept"))
	}
	r := &rawWS{t: t, nc: nc, br: br}
	if f := r.readFrame(); f.GetHello() == nil {
		t.Fatalf("first frame %v, want Hello", f)
	}
	return r
}

// read returns the next frame from the server: its opcode and payload.
// io.EOF: the server closed the connection.
func (r *rawWS) read() (byte, []byte, error) {
	var h [2]byte
	if _, err := io.ReadFull(r.br, h[:]); err != nil {
		return 0, nil, err
	}
	if h[1]&0x80 != 0 {
		r.t.Fatal("server frame is masked")
	}
	n := uint64(h[1] & 0x7f)
	switch n {
	case 126:
		var b [2]byte
		io.ReadFull(r.br, b[:])
		n = uint64(binary.BigEndian.Uint16(b[:]))
	case 127:
		var b [8]byte
		io.ReadFull(r.br, b[:])
		n = binary.BigEndian.Uint64(b[:])
	}
	p := make([]byte, n)
	if _, err := io.ReadFull(r.br, p); err != nil {
		return 0, nil, err
	}
	return h[0] & 0x0f, p, nil
}

// readFrame returns the next ServerFrame, skipping Synced.
func (r *rawWS) readFrame() *pb.ServerFrame {
	r.t.Helper()
	for {
		op, p, err := r.read()
		if err != nil {
			r.t.Fatalf("read: %v", err)
		}
		if op != opBinary {
			r.t.Fatalf("opcode %d (payload %q), want a binary frame", op, p)
		}
		var f pb.ServerFrame
		if err := proto.Unmarshal(p, &f); err != nil {
			r.t.Fatal(err)
		}
		if f.GetSynced() != nil {
			continue
		}
		return &f
	}
}

// write sends b in chunks of size bytes, each its own write.
func (r *rawWS) write(b []byte, size int) {
	r.t.Helper()
	for off := 0; off < len(b); off += size {
		if _, err := r.nc.Write(b[off:min(off+size, len(b))]); err != nil {
			r.t.Fatal(err)
		}
		if size < len(b) {
			time.Sleep(time.Millisecond) // separate reads on the server
		}
	}
}

// closed waits for a close frame and then the end of the connection, and
// returns the close code.
func (r *rawWS) closed() int {
	r.t.Helper()
	code := -1
	for {
		op, p, err := r.read()
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) {
			return code
		}
		if err != nil {
			if code >= 0 {
				return code // reset after the close frame
			}
			r.t.Fatalf("read: %v", err)
		}
		if op == opClose && len(p) >= 2 {
			code = int(binary.BigEndian.Uint16(p))
		}
	}
}

func pingFrame(id uint64) []byte {
	b, _ := proto.Marshal(&pb.ClientFrame{Id: id, Body: &pb.ClientFrame_Ping{Ping: &pb.Ping{ClientTimeMs: 1}}})
	return b
}

// The epoll transport's own frame reading: frames split across reads at
// every length, fragmented messages with a control frame between the
// fragments, bytes sent with the handshake, WebSocket pings.
func TestEpollReadsSplitAndFragmentedFrames(t *testing.T) {
	_, url, authz := epollServer(t, 0)
	msg := pingFrame(7)
	r := dialRaw(t, url, authz, wsFrame(opBinary, true, pingFrame(1)))
	if f := r.readFrame(); f.GetPong() == nil || f.Id != 1 {
		t.Fatalf("answer to the frame sent with the handshake: %v, want Pong 1", f)
	}
	// One frame, in chunks of every size.
	whole := wsFrame(opBinary, true, msg)
	for size := 1; size <= len(whole); size++ {
		r.write(whole, size)
		if f := r.readFrame(); f.GetPong() == nil || f.Id != 7 {
			t.Fatalf("chunks of %d: %v, want Pong 7", size, f)
		}
	}
	// A message in three fragments, a WebSocket ping between them, and a
	// second message in the same write.
	var stream []byte
	stream = append(stream, wsFrame(opBinary, false, msg[:2])...)
	stream = append(stream, wsFrame(opPing, true, []byte("are you there"))...)
	stream = append(stream, wsFrame(opContinuation, false, msg[2:5])...)
	stream = append(stream, wsFrame(opContinuation, true, msg[5:])...)
	stream = append(stream, wsFrame(opBinary, true, pingFrame(8))...)
	for _, size := range []int{1, 5, len(stream)} {
		r.write(stream, size)
		op, p, err := r.read()
		if err != nil || op != opPong || string(p) != "are you there" {
			t.Fatalf("chunks of %d: opcode %d %q %v, want the pong", size, op, p, err)
		}
		for _, id := range []uint64{7, 8} {
			if f := r.readFrame(); f.GetPong() == nil || f.Id != id {
				t.Fatalf("chunks of %d: %v, want Pong %d", size, f, id)
			}
		}
	}
	// A message with a 16-bit length (a Ping padded with an unknown
	// field), split across reads.
	big := append(pingFrame(9), protowireBytes(15, make([]byte, 3000))...)
	r.write(wsFrame(opBinary, true, big), 1000)
	if f := r.readFrame(); f.GetPong() == nil || f.Id != 9 {
		t.Fatalf("%v, want Pong 9", f)
	}
	// The device closes: the code is echoed, and the server closes.
	r.write(wsFrame(opClose, true, []byte{0x03, 0xe8, 'b', 'y', 'e'}), 64)
	if code := r.closed(); code != 1000 {
		t.Fatalf("close code %d, want 1000 echoed", code)
	}
}

// Frames that break the protocol close the connection with 1002, and a
// frame over MaxFrame with FRAME_TOO_LARGE (1009) from its header alone;
// frames before either are answered.
func TestEpollRefusesBadFrames(t *testing.T) {
	const maxFrame = 1000
	ok := wsFrame(opBinary, true, pingFrame(3))
	unmasked := []byte{0x82, 0x02, 0x08, 0x01}
	cases := []struct {
		name string
		bad  []byte
		code int
	}{
		{"unmasked", unmasked, 1002},
		{"reserved bit", append([]byte{0xc2}, wsFrame(opBinary, true, []byte{1})[1:]...), 1002},
		{"unknown opcode", wsFrame(0x3, true, []byte{1}), 1002},
		{"continuation first", wsFrame(opContinuation, true, []byte{1}), 1002},
		{"fragmented ping", wsFrame(opPing, false, []byte{1}), 1002},
		{"control frame too long", wsFrame(opPing, true, make([]byte, 126)), 1002},
		{"new message inside a fragmented one", append(wsFrame(opBinary, false, []byte{1}), wsFrame(opBinary, true, []byte{1})...), 1002},
		{"close with a 1-byte body", wsFrame(opClose, true, []byte{1}), 1002},
		// Only the header is sent: refused before its payload comes.
		{"over MaxFrame", wsFrame(opBinary, true, make([]byte, maxFrame+1))[:8], 1009},
		{"fragments over MaxFrame", append(wsFrame(opBinary, false, make([]byte, 600)), wsFrame(opContinuation, true, make([]byte, 401))[:8]...), 1009},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()                              // each waits for the close handshake's grace
			_, url, authz := epollServer(t, maxFrame) // one device each
			r := dialRaw(t, url, authz, nil)
			r.write(append(append([]byte{}, ok...), tc.bad...), 1<<20)
			if f := r.readFrame(); f.GetPong() == nil || f.Id != 3 {
				t.Fatalf("%v, want Pong 3 for the frame before", f)
			}
			if tc.code == 1009 {
				if f := r.readFrame(); f.GetError().GetCode() != pb.ErrorCode_ERROR_CODE_FRAME_TOO_LARGE {
					t.Fatalf("%v, want Error FRAME_TOO_LARGE", f)
				}
			}
			if code := r.closed(); code != tc.code {
				t.Fatalf("close code %d, want %d", code, tc.code)
			}
		})
	}
}

// A connection whose queue of messages holds more than maxQueued bytes is
// not read until its worker has drained it.
func TestEpollQueuePausesReading(t *testing.T) {
	g, _, _ := epollServer(t, 0)
	c := newConn(g, ident.Device{User: "alice", ID: 1}, nil)
	c.ev.fd = -1 // no socket: the interest is not registered
	release := make(chan struct{})
	c.evQueue(evJob{fn: func() { <-release }}) // the worker is busy
	msg := make([]byte, 64<<10)
	for {
		c.mu.Lock()
		queued := c.ev.jobs.bytes
		c.mu.Unlock()
		if queued > maxQueued {
			break
		}
		m := getBuffer(len(msg))
		*m = append(*m, msg...)
		c.evQueue(evJob{data: m})
	}
	paused := c.ev.paused.Load
	if !paused() {
		t.Fatal("not paused with a full queue")
	}
	c.ev.set(evDiscard) // the messages are not handled, only counted
	close(release)
	deadline := time.Now().Add(10 * time.Second)
	for paused() {
		if time.Now().After(deadline) {
			t.Fatal("still paused after the queue drained")
		}
		time.Sleep(time.Millisecond)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ev.jobs != nil {
		t.Errorf("%d jobs left", len(c.ev.jobs.q))
	}
}

// protowireBytes encodes a bytes field num holding b.
func protowireBytes(num protowire.Number, b []byte) []byte {
	return protowire.AppendBytes(protowire.AppendTag(nil, num, protowire.BytesType), b)
}

// The socket table makes a chunk only when a descriptor in it is used,
// and refuses descriptors past the open-file limit it was made for.
func TestSockTable(t *testing.T) {
	tb := newSockTable(3 * sockChunk)
	c := &conn{}
	if !tb.fits(0) || !tb.fits(3*sockChunk-1) || tb.fits(3*sockChunk) || tb.fits(-1) {
		t.Fatal("fits: wrong bounds")
	}
	tb.set(sockChunk+5, c)
	if tb.get(sockChunk+5) != c || tb.get(sockChunk+6) != nil || tb.get(5) != nil || tb.get(3*sockChunk) != nil {
		t.Fatal("get does not return what set stored")
	}
	if tb.chunks[0].Load() != nil || tb.chunks[2].Load() != nil {
		t.Error("chunks made for descriptors never used")
	}
	tb.set(7, nil) // clearing an unused chunk makes none
	if tb.chunks[0].Load() != nil {
		t.Error("a chunk made to clear an entry")
	}
	tb.set(sockChunk+5, nil)
	if tb.get(sockChunk+5) != nil {
		t.Error("entry not cleared")
	}
}
