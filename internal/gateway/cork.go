package gateway

import (
	"bufio"
	"net"
	"net/http"
	"sync"
)

// Batched writes on the goroutine transport.
//
// coder/websocket flushes its buffered writer, one write(2), at the end of
// every message, and has no way to write several messages and flush once.
// So the gateway hands it the hijacked socket wrapped in a corkConn: while
// the writer goroutine has several frames ready (the replies and events
// queued for it, the entries of one mailbox read), it corks the socket,
// the library writes the frames into the cork's buffer, and the writer
// then hands them to the socket with one write. Uncorked, writes go
// straight through.

// corkConn is a connection whose writes can be held back and written
// together.
type corkConn struct {
	net.Conn

	mu     sync.Mutex
	corked bool
	buf    *[]byte // held bytes, from batchPool; nil when none
}

// Write writes p, or holds it while the connection is corked. Writes are
// serialised, so held bytes and later writes keep their order.
func (c *corkConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.corked {
		if c.buf == nil {
			c.buf = batchPool.Get().(*[]byte)
		}
		*c.buf = append(*c.buf, p...)
		return len(p), nil
	}
	return c.Conn.Write(p)
}

// cork holds the writes that follow until flush.
func (c *corkConn) cork() {
	c.mu.Lock()
	c.corked = true
	c.mu.Unlock()
}

// flush uncorks the connection and writes what was held, with one write.
func (c *corkConn) flush() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.corked = false
	b := c.buf
	if b == nil {
		return nil
	}
	c.buf = nil
	_, err := c.Conn.Write(*b)
	if cap(*b) <= 64<<10 {
		*b = (*b)[:0]
		batchPool.Put(b)
	}
	return err
}

// corkWriter is the ResponseWriter handed to websocket.Accept: its Hijack
// returns the socket wrapped in cc, and the library's buffered writer
// writing to it.
type corkWriter struct {
	http.ResponseWriter
	cc *corkConn
}

func (w *corkWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// Hijack hijacks the connection. If net/http's buffered writer still holds
// bytes (it does not: it flushes the handshake's answer before handing the
// socket over), the socket is returned unwrapped and cc.Conn stays nil:
// the connection then writes each frame on its own.
func (w *corkWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	conn, brw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err != nil || brw.Writer.Buffered() != 0 {
		return conn, brw, err
	}
	w.cc.Conn = conn
	brw.Writer.Reset(w.cc)
	return w.cc, brw, nil
}
