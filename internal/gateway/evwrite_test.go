package gateway

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"google.golang.org/protobuf/proto"

	pb "github.com/courier-im/courier/proto/courier/v1"
)

// readServerFrame decodes one unmasked frame from b and returns its first
// byte, payload and the rest of b.
func readServerFrame(t *testing.T, b []byte) (byte, []byte, []byte) {
	t.Helper()
	if len(b) < 2 {
		t.Fatalf("short frame: %d bytes", len(b))
	}
	if b[1]&0x80 != 0 {
		t.Fatal("server frame is masked")
	}
	n, h := uint64(b[1]&0x7f), 2
	switch n {
	case 126:
		n, h = uint64(binary.BigEndian.Uint16(b[2:])), 4
	case 127:
		n, h = binary.BigEndian.Uint64(b[2:]), 10
	}
	if uint64(len(b)-h) < n {
		t.Fatalf("frame of %d bytes, %d left", n, len(b)-h)
	}
	return b[0], b[h : h+int(n)], b[h+int(n):]
}

func TestFrameHeaderAndDeliverSize(t *testing.T) {
	var stream []byte
	sizes := []int{0, 1, 125, 126, 127, 65535, 65536, 70000}
	for _, n := range sizes {
		stream = appendFrameHeader(stream, n)
		stream = append(stream, bytes.Repeat([]byte{byte(n)}, n)...)
	}
	for _, n := range sizes {
		var op byte
		var p []byte
		op, p, stream = readServerFrame(t, stream)
		if op != 0x82 || len(p) != n || (n > 0 && p[n-1] != byte(n)) {
			t.Errorf("size %d: opcode byte %#x, payload %d bytes", n, op, len(p))
		}
	}
	if len(stream) != 0 {
		t.Errorf("%d bytes left over", len(stream))
	}
	for _, seq := range []uint64{1, 127, 128, 1 << 40} {
		for _, n := range []int{0, 100, 200, 20000, 70000} {
			if got, want := deliverSize(seq, n), len(appendDeliver(nil, seq, make([]byte, n))); got != want {
				t.Errorf("deliverSize(%d, %d) = %d, encoding is %d bytes", seq, n, got, want)
			}
		}
	}
}

func TestWorkers(t *testing.T) {
	const max, jobs = 4, 2000
	w := newWorkers(max, slog.New(slog.DiscardHandler))
	var running, peak, done atomic.Int32
	var wg sync.WaitGroup
	wg.Add(jobs)
	for i := range jobs {
		w.Go(func() {
			defer wg.Done()
			defer done.Add(1)
			n := running.Add(1)
			defer running.Add(-1)
			for {
				p := peak.Load()
				if n <= p || peak.CompareAndSwap(p, n) {
					break
				}
			}
			if i%100 == 7 {
				panic("job panics") // logged; the worker goes on
			}
			if i%50 == 0 {
				time.Sleep(time.Millisecond)
			}
		})
	}
	wg.Wait()
	if done.Load() != jobs {
		t.Errorf("%d of %d jobs ran", done.Load(), jobs)
	}
	if p := peak.Load(); p > max {
		t.Errorf("%d jobs at once, max %d", p, max)
	}
	if n := w.n.Load(); n > max {
		t.Errorf("%d workers, max %d", n, max)
	}
	w.Stop()
	deadline := time.Now().Add(10 * time.Second)
	for w.n.Load() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d workers left after Stop", w.n.Load())
		}
		time.Sleep(time.Millisecond)
	}
	// After Stop, Go never blocks, even with the queue full.
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		for range cap(w.queue) + 10 {
			w.Go(func() {})
		}
	}()
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		t.Fatal("Go blocked after Stop")
	}
}

// countConn is a net.Conn that records its writes.
type countConn struct {
	net.Conn
	mu     sync.Mutex
	writes [][]byte
}

func (c *countConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.writes = append(c.writes, append([]byte(nil), p...))
	return len(p), nil
}

func TestCorkConn(t *testing.T) {
	inner := &countConn{}
	cc := &corkConn{Conn: inner}
	cc.Write([]byte("a"))
	cc.cork()
	cc.Write([]byte("b"))
	cc.Write([]byte("cd"))
	if len(inner.writes) != 1 {
		t.Fatalf("%d writes while corked, want the 1 before", len(inner.writes))
	}
	if err := cc.flush(); err != nil {
		t.Fatal(err)
	}
	if err := cc.flush(); err != nil { // nothing held: no write
		t.Fatal(err)
	}
	cc.Write([]byte("e"))
	want := []string{"a", "bcd", "e"}
	if fmt.Sprintf("%q", inner.writes) != fmt.Sprintf("%q", want) {
		t.Errorf("writes %q, want %q", inner.writes, want)
	}
}

// corkRecorder counts the writes that reach the socket of a connection
// accepted through corkWriter.
type corkRecorder struct {
	net.Conn
	writes atomic.Int32
}

func (c *corkRecorder) Write(p []byte) (int, error) {
	c.writes.Add(1)
	return c.Conn.Write(p)
}

// TestCorkWriterAccept checks that websocket.Accept over corkWriter writes
// through the cork: messages written while corked reach the client intact
// and in order, with one write to the socket.
func TestCorkWriterAccept(t *testing.T) {
	type result struct {
		cc  *corkConn
		ws  *websocket.Conn
		err error
	}
	accepted := make(chan result, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cw := &corkWriter{ResponseWriter: w, cc: &corkConn{}}
		ws, err := websocket.Accept(cw, r, nil)
		accepted <- result{cw.cc, ws, err}
	}))
	defer srv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	client, _, err := websocket.Dial(ctx, srv.URL, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer client.CloseNow()
	res := <-accepted
	if res.err != nil {
		t.Fatal(res.err)
	}
	defer res.ws.CloseNow()
	if res.cc.Conn == nil {
		t.Fatal("the hijacked socket was not wrapped")
	}
	rec := &corkRecorder{Conn: res.cc.Conn}
	res.cc.Conn = rec
	res.cc.cork()
	const n = 10
	for i := range n {
		if err := res.ws.Write(ctx, websocket.MessageBinary, bytes.Repeat([]byte{byte(i)}, 100*i)); err != nil {
			t.Fatal(err)
		}
	}
	if got := rec.writes.Load(); got != 0 {
		t.Fatalf("%d socket writes while corked", got)
	}
	if err := res.cc.flush(); err != nil {
		t.Fatal(err)
	}
	if got := rec.writes.Load(); got != 1 {
		t.Errorf("%d socket writes for %d messages, want 1", got, n)
	}
	for i := range n {
		_, p, err := client.Read(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(p, bytes.Repeat([]byte{byte(i)}, 100*i)) {
			t.Fatalf("message %d: %d bytes, wrong content", i, len(p))
		}
	}
}

// The pipeline finishes the tails queued together in one run: each tail
// but the last sees more set (its reply may wait in the batch), and the run
// ends with a flush, even if its last tail wrote nothing.
func TestPipelineRunsHoldRepliesAndFlush(t *testing.T) {
	var p pipeline
	flushes := 0
	flush := func() bool { flushes++; return true }
	then := func(fn func()) {
		if p.then(fn) {
			go p.run(flush)
		}
	}
	block := make(chan struct{})
	if !p.acquire() {
		t.Fatal("acquire failed")
	}
	then(func() { <-block })
	var mores []bool
	for range 3 {
		if !p.acquire() {
			t.Fatal("acquire failed")
		}
		then(func() { mores = append(mores, p.more.Load()) })
	}
	close(block)
	p.wait()
	if fmt.Sprint(mores) != "[true true false]" {
		t.Errorf("more seen by the tails of a run: %v, want [true true false]", mores)
	}
	if flushes != 1 {
		t.Errorf("%d flushes, want 1 (after the run of 3)", flushes)
	}
	// A run of one tail writes its reply at once: no flush needed.
	p.acquire()
	then(func() { mores = append(mores, p.more.Load()) })
	p.wait()
	if mores[len(mores)-1] || flushes != 1 {
		t.Errorf("single tail: more %v, flushes %d", mores[len(mores)-1], flushes)
	}
}

// writeQueued writes the frame it is given and every frame queued behind
// it, however many, in order, corked in runs of at most outQueue frames.
func TestWriteQueuedWritesEveryFrame(t *testing.T) {
	fx := newFrameFixture(t)
	defer fx.close()
	accepted := make(chan *websocket.Conn, 1)
	var cc *corkConn
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cw := &corkWriter{ResponseWriter: w, cc: &corkConn{}}
		ws, err := websocket.Accept(cw, r, nil)
		if err != nil {
			t.Error(err)
			close(accepted)
			return
		}
		cc = cw.cc
		accepted <- ws
	}))
	defer srv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	client, _, err := websocket.Dial(ctx, srv.URL, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer client.CloseNow()
	ws := <-accepted
	if ws == nil {
		t.FailNow()
	}
	defer ws.CloseNow()
	c := newConn(fx.g, fx.alice, ws)
	c.gr.cc = cc
	const n = 3*outQueue + 5
	c.gr.out = make(chan *pb.ServerFrame, n)
	for i := 2; i <= n; i++ {
		c.gr.out <- &pb.ServerFrame{Id: uint64(i), Body: &pb.ServerFrame_Ok{Ok: &pb.Ok{}}}
	}
	go func() {
		for first := (&pb.ServerFrame{Id: 1, Body: &pb.ServerFrame_Ok{Ok: &pb.Ok{}}}); ; {
			if !c.writeQueued(first) {
				t.Error("write failed")
				return
			}
			select {
			case first = <-c.gr.out:
			default:
				return
			}
		}
	}()
	for i := 1; i <= n; i++ {
		_, b, err := client.Read(ctx)
		if err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		var f pb.ServerFrame
		if err := proto.Unmarshal(b, &f); err != nil || f.Id != uint64(i) {
			t.Fatalf("frame %d: id %d, err %v", i, f.Id, err)
		}
	}
}
