// Package rlimit raises the process's open-file limit, which bounds how
// many connections one server process can hold.
//
// Every connection is a file descriptor, and the soft RLIMIT_NOFILE is
// often 1,024 while the hard limit is much higher. The Go runtime already
// raises the soft limit to the hard limit at start-up on Linux (since Go
// 1.19, restoring the original for child processes), so Raise is usually a
// check; it is done explicitly so that the server does not depend on that
// runtime behaviour and can log what the limit allows.
package rlimit

import (
	"fmt"
	"syscall"
)

// Reserved is the number of descriptors kept back for everything that is
// not a client connection: the storage engines' files (Pebble's WAL,
// tables and MANIFEST, SQLite's database and WAL), listeners, the metrics
// and API's own short-lived sockets, and outgoing connections to cluster
// backends.
const Reserved = 100

// Limit is the open-file limit after Raise.
type Limit struct {
	// Soft is the limit in force; Hard is the most the soft limit may be
	// raised to without privileges.
	Soft, Hard uint64
	// Raised reports whether Raise changed the soft limit.
	Raised bool
}

// Conns is how many client connections the limit leaves room for.
func (l Limit) Conns() uint64 {
	if l.Soft <= Reserved {
		return 0
	}
	return l.Soft - Reserved
}

// Raise sets the soft RLIMIT_NOFILE to the hard limit and reports the
// result. An error leaves the limit as it was and says why; the current
// limit is still returned when it could be read.
func Raise() (Limit, error) {
	var r syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r); err != nil {
		return Limit{}, fmt.Errorf("rlimit: reading the open-file limit: %w", err)
	}
	l := Limit{Soft: r.Cur, Hard: r.Max}
	if r.Cur >= r.Max {
		return l, nil
	}
	want := r
	want.Cur = r.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &want); err != nil {
		return l, fmt.Errorf("rlimit: raising the open-file limit from %d to %d: %w", r.Cur, r.Max, err)
	}
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r); err != nil {
		return l, fmt.Errorf("rlimit: reading the open-file limit: %w", err)
	}
	return Limit{Soft: r.Cur, Hard: r.Max, Raised: r.Cur != l.Soft}, nil
}
