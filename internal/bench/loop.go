package bench

import (
	"errors"
	"fmt"
	"net"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/courier-im/courier/internal/evloop"
)

// The bench's event loops: a few epoll instances for all of a process's
// connections, each with one goroutine that reads the ready sockets and
// hands what it read to the connection's client. The goroutine parks on
// Go's poller while nothing is ready (internal/evloop), like the
// gateway's: nbio's loops, used before, blocked in epoll_wait in a system
// call, and under load the runtime's monitor then spent 13 % of the
// bench's CPU in the closed loop taking their Ps back, on the cores the
// server under test shares (docs/performance.md, "A lighter bench").
//
// Only a socket's loop closes its descriptor. Anyone else shuts the socket
// down, which the loop then sees as the end of the stream: a descriptor
// number is never used after the kernel may have handed it to a new
// socket.

// loopReadBuffer is the size of each loop's read buffer.
const loopReadBuffer = 64 << 10

// loop is one event loop.
type loop struct {
	*evloop.Poller
	buf []byte

	mu    sync.Mutex
	conns map[int32]*wsConn // by descriptor
}

// wsConn is one of the bench's sockets, registered with a loop.
type wsConn struct {
	l  *loop
	fd int32

	mu      sync.Mutex
	closed  bool   // its loop closed the descriptor
	out     []byte // written and not yet taken by the socket
	session *client
}

func newLoop() (*loop, error) {
	p, err := evloop.New()
	if err != nil {
		return nil, err
	}
	return &loop{Poller: p, buf: make([]byte, loopReadBuffer), conns: map[int32]*wsConn{}}, nil
}

// run takes the loop's events until stopped.
func (l *loop) run() error {
	return l.Run(func(ev *unix.EpollEvent) {
		l.mu.Lock()
		c := l.conns[ev.Fd]
		l.mu.Unlock()
		if c == nil {
			return
		}
		if ev.Events&(unix.EPOLLOUT|unix.EPOLLERR|unix.EPOLLHUP) != 0 {
			c.writable()
		}
		if ev.Events&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLERR|unix.EPOLLHUP) != 0 {
			c.readable()
		}
	})
}

// add registers the socket fd for the client c, and returns its
// connection; on failure it closes fd.
func (l *loop) add(fd int, c *client) (*wsConn, error) {
	w := &wsConn{l: l, fd: int32(fd), session: c}
	l.mu.Lock()
	l.conns[w.fd] = w
	l.mu.Unlock()
	if err := unix.EpollCtl(l.FD, unix.EPOLL_CTL_ADD, fd, &unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP, Fd: w.fd}); err != nil {
		l.mu.Lock()
		delete(l.conns, w.fd)
		l.mu.Unlock()
		unix.Close(fd)
		return nil, fmt.Errorf("epoll_ctl: %w", err)
	}
	return w, nil
}

// readable reads what the socket holds and hands it to the client; at the
// end of the stream, or on an error, it closes the connection.
func (w *wsConn) readable() {
	buf := w.l.buf
	for {
		n, err := unix.Read(int(w.fd), buf)
		if n > 0 {
			w.session.onData(buf[:n])
		}
		switch {
		case err == nil && n == 0:
			w.end(nil)
			return
		case err == nil:
			if n < len(buf) {
				return
			}
		case errors.Is(err, unix.EINTR):
		case errors.Is(err, unix.EAGAIN):
			return
		default:
			w.end(err)
			return
		}
	}
}

// writable writes what waits for the socket.
func (w *wsConn) writable() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed || len(w.out) == 0 {
		return
	}
	n, err := w.writeLocked(w.out)
	w.out = w.out[:copy(w.out, w.out[n:])]
	if err != nil {
		_ = unix.Shutdown(int(w.fd), unix.SHUT_RDWR) // the read side closes it
		return
	}
	if len(w.out) == 0 {
		w.out = nil
		_ = unix.EpollCtl(w.l.FD, unix.EPOLL_CTL_MOD, int(w.fd), &unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP, Fd: w.fd})
	}
}

// writeLocked writes b until the socket takes no more; w.mu is held.
func (w *wsConn) writeLocked(b []byte) (int, error) {
	wrote := 0
	for wrote < len(b) {
		n, err := unix.Write(int(w.fd), b[wrote:])
		if n > 0 {
			wrote += n
		}
		if err == nil || errors.Is(err, unix.EINTR) {
			continue
		}
		if errors.Is(err, unix.EAGAIN) {
			return wrote, nil
		}
		return wrote, err
	}
	return wrote, nil
}

// Write writes b: at once as far as the socket takes it, the rest when it
// is writable. It never blocks.
func (w *wsConn) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return 0, net.ErrClosed
	}
	if len(w.out) > 0 {
		w.out = append(w.out, b...)
		return len(b), nil
	}
	n, err := w.writeLocked(b)
	if err != nil {
		_ = unix.Shutdown(int(w.fd), unix.SHUT_RDWR)
		return n, err
	}
	if n < len(b) {
		w.out = append(w.out, b[n:]...)
		if err := unix.EpollCtl(w.l.FD, unix.EPOLL_CTL_MOD, int(w.fd), &unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLOUT, Fd: w.fd}); err != nil {
			_ = unix.Shutdown(int(w.fd), unix.SHUT_RDWR)
			return n, err
		}
	}
	return len(b), nil
}

// Close shuts the connection down; its loop then closes it and tells the
// client (onClosed).
func (w *wsConn) Close() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return net.ErrClosed
	}
	return unix.Shutdown(int(w.fd), unix.SHUT_RDWR)
}

// end closes the connection's descriptor (on its loop, or once the loops
// have stopped) and tells the client.
func (w *wsConn) end(cause error) {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return
	}
	w.closed = true
	w.out = nil
	_ = unix.EpollCtl(w.l.FD, unix.EPOLL_CTL_DEL, int(w.fd), nil)
	w.l.mu.Lock()
	delete(w.l.conns, w.fd)
	w.l.mu.Unlock()
	unix.Close(int(w.fd))
	w.mu.Unlock()
	w.session.onClosed(w, cause)
}
