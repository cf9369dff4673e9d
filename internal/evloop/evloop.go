// Package evloop is the epoll instance under an event loop, and the way
// the loop's goroutine waits on it: the gateway's epoll transport and the
// bench's client connections both run on it.
//
// The loop's goroutine does not block in epoll_wait(2). The epoll
// descriptor is itself pollable (readable while it has events), so it is
// handed to Go's network poller (os.NewFile on the non-blocking
// descriptor), and the loop takes its events with a zero timeout and,
// when there are none, parks on the poller as a net.Conn reader does. A
// goroutine blocked in a system call holds its thread, and under load the
// scheduler's monitor takes its P away and wakes another thread to run
// the others (a futex wake-up each time, and the monitor polling every
// 20 µs while it keeps finding such calls); a parked goroutine costs
// nothing, and the runtime collects the readiness with its own polls. If
// the poller does not take the descriptor, the loop blocks in epoll_wait
// instead.
package evloop

import (
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Poller is an epoll instance whose loop can be stopped.
type Poller struct {
	// FD is the epoll descriptor, for the caller's epoll_ctl(2) calls.
	FD   int
	wake int             // eventfd that ends the loop
	file *os.File        // owns FD
	rc   syscall.RawConn // FD on Go's poller; nil: the loop blocks in epoll_wait
}

// New returns a Poller; what fails is named in the error.
func New() (*Poller, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create1: %w", err)
	}
	wake, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		unix.Close(epfd)
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, wake, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(wake)}); err != nil {
		unix.Close(epfd)
		unix.Close(wake)
		return nil, fmt.Errorf("epoll_ctl: %w", err)
	}
	if err := unix.SetNonblock(epfd, true); err != nil {
		unix.Close(epfd)
		unix.Close(wake)
		return nil, err
	}
	p := &Poller{FD: epfd, wake: wake}
	// The file owns epfd from here on. Only a descriptor the poller took
	// supports deadlines; on one it did not, the loop blocks in
	// epoll_wait (its timeout, not O_NONBLOCK, decides how long).
	p.file = os.NewFile(uintptr(epfd), "epoll")
	if p.file.SetReadDeadline(time.Time{}) == nil {
		if rc, err := p.file.SyscallConn(); err == nil {
			p.rc = rc
		}
	}
	return p, nil
}

// Run calls handle for every event of a registered descriptor until Stop,
// when it returns nil. An error ends it too: epoll_wait's, or the
// poller's.
func (p *Poller) Run(handle func(ev *unix.EpollEvent)) error {
	events := make([]unix.EpollEvent, 256)
	var failed error
	// poll takes the events waiting, up to len(events), waiting at most
	// timeout ms (-1: for ever), and handles them. It reports whether it
	// found any, and whether the loop must end.
	poll := func(timeout int) (found, end bool) {
		n, err := unix.EpollWait(p.FD, events, timeout)
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				return false, false
			}
			failed = fmt.Errorf("epoll_wait: %w", err)
			return false, true
		}
		for i := range n {
			ev := &events[i]
			if int(ev.Fd) == p.wake {
				return true, true
			}
			handle(ev)
		}
		return n > 0, false
	}
	if p.rc == nil {
		for {
			if _, end := poll(-1); end {
				return failed
			}
		}
	}
	end := false
	for !end {
		// Read calls the function until it reports done, parking on the
		// poller until the descriptor is readable whenever it does not.
		err := p.rc.Read(func(uintptr) bool {
			found, stop := poll(0)
			end = stop
			return found || stop
		})
		if err != nil {
			return err
		}
	}
	return failed
}

// Stop makes Run return, now or as soon as it is called.
func (p *Poller) Stop() {
	_, _ = unix.Write(p.wake, []byte{1, 0, 0, 0, 0, 0, 0, 0})
}

// Close closes the epoll descriptor; Run must have returned.
func (p *Poller) Close() {
	_ = p.file.Close() // and FD with it
	unix.Close(p.wake)
}

// DupSocket returns a duplicate of the descriptor of a TCP connection's
// socket, in non-blocking mode and closed on exec, for a loop to take
// over; nc stays the caller's to close.
func DupSocket(nc net.Conn) (int, error) {
	sc, ok := nc.(syscall.Conn)
	if !ok {
		return -1, errors.New("not a socket")
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	var derr error
	if err := rc.Control(func(s uintptr) {
		fd, derr = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return -1, err
	}
	if derr != nil {
		return -1, derr
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}
