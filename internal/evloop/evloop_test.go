package evloop

import (
	"net"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestRunAndStop registers a pipe's read end, checks Run hands its
// readiness to the handler, and that Stop ends Run with no error, also
// when called before Run.
func TestRunAndStop(t *testing.T) {
	p, err := New()
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fds[0])
	defer unix.Close(fds[1])
	if err := unix.EpollCtl(p.FD, unix.EPOLL_CTL_ADD, fds[0], &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(fds[0])}); err != nil {
		t.Fatal(err)
	}
	got := make(chan string, 4)
	done := make(chan error, 1)
	go func() {
		done <- p.Run(func(ev *unix.EpollEvent) {
			if int(ev.Fd) != fds[0] {
				t.Errorf("event for descriptor %d", ev.Fd)
				return
			}
			b := make([]byte, 16)
			n, _ := unix.Read(fds[0], b)
			got <- string(b[:max(n, 0)])
		})
	}()
	for _, msg := range []string{"one", "two"} {
		if _, err := unix.Write(fds[1], []byte(msg)); err != nil {
			t.Fatal(err)
		}
		select {
		case s := <-got:
			if s != msg {
				t.Errorf("read %q, want %q", s, msg)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("no event for %q", msg)
		}
	}
	p.Stop()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after Stop")
	}

	q, err := New()
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	q.Stop()
	if err := q.Run(func(*unix.EpollEvent) { t.Error("an event with nothing registered") }); err != nil {
		t.Errorf("Run after Stop: %v", err)
	}
}

// TestDupSocket takes a TCP connection's descriptor over, and refuses a
// connection with none.
func TestDupSocket(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	nc, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	peer, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Close()
	fd, err := DupSocket(nc)
	nc.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0); err != nil || fl&unix.O_NONBLOCK == 0 {
		t.Errorf("flags %#x, %v: not non-blocking", fl, err)
	}
	if _, err := unix.Write(fd, []byte("x")); err != nil {
		t.Fatalf("write on the duplicate after the original closed: %v", err)
	}
	b := make([]byte, 1)
	if _, err := peer.Read(b); err != nil || b[0] != 'x' {
		t.Errorf("peer read %q, %v", b, err)
	}
	a, z := net.Pipe()
	defer a.Close()
	defer z.Close()
	if _, err := DupSocket(a); err == nil {
		t.Error("DupSocket took a net.Pipe")
	}
}
