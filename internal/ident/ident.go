// Package ident defines how courier names things: users, devices and
// server-assigned message ids.
package ident

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"
)

// MaxUserLen is the longest user name.
const MaxUserLen = 32

// ErrBadUser reports a user name that is not allowed.
var ErrBadUser = errors.New("user names are 1 to 32 characters of a-z, 0-9, '_' and '-', starting with a letter or digit")

// ValidUser reports whether name is an acceptable user name. Names are
// lower-case so that "Bob" and "bob" can never be two accounts.
func ValidUser(name string) bool {
	if len(name) == 0 || len(name) > MaxUserLen {
		return false
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		case (c == '_' || c == '-') && i > 0:
		default:
			return false
		}
	}
	return true
}

// Device is the address of one device of one user. Device ids start at 1
// (the primary device) and are never reused within a user.
type Device struct {
	User string
	ID   uint32
}

func (d Device) String() string { return d.User + "." + strconv.FormatUint(uint64(d.ID), 10) }

// ParseDevice parses the "user.id" form that Device.String produces, and
// only that form: a device has one spelling ("alice.01" is refused), so
// that whatever is keyed by the text, such as the limits on failed
// authentication, cannot be dodged by writing the same device another way.
func ParseDevice(s string) (Device, error) {
	i := strings.LastIndexByte(s, '.')
	if i < 0 {
		return Device{}, fmt.Errorf("device %q: want user.id", s)
	}
	id, err := strconv.ParseUint(s[i+1:], 10, 32)
	if err != nil || id == 0 || s[i+1] == '0' {
		return Device{}, fmt.Errorf("device %q: bad device id", s)
	}
	if !ValidUser(s[:i]) {
		return Device{}, fmt.Errorf("device %q: %w", s, ErrBadUser)
	}
	return Device{User: s[:i], ID: uint32(id)}, nil
}

// ServerIDs makes message ids: 26 characters of Crockford base32 holding a
// 48-bit millisecond timestamp and 80 random bits, so that ids sort by the
// time they were assigned and never collide in practice.
type ServerIDs struct {
	mu   sync.Mutex
	buf  [256]byte
	used int
}

const crockford = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

// New returns a fresh id for time t.
func (g *ServerIDs) New(t time.Time) string {
	var raw [16]byte
	binary.BigEndian.PutUint64(raw[:8], uint64(t.UnixMilli())<<16)
	g.mu.Lock()
	if g.used == 0 || g.used+10 > len(g.buf) {
		if _, err := rand.Read(g.buf[:]); err != nil {
			panic("ident: crypto/rand failed: " + err.Error())
		}
		g.used = 0
	}
	copy(raw[6:], g.buf[g.used:g.used+10])
	g.used += 10
	g.mu.Unlock()
	// 128 bits -> 26 base32 digits (the top digit holds 3 bits).
	hi := binary.BigEndian.Uint64(raw[:8])
	lo := binary.BigEndian.Uint64(raw[8:])
	var out [26]byte
	for i := 25; i >= 0; i-- {
		out[i] = crockford[lo&31]
		lo = lo>>5 | hi<<59
		hi >>= 5
	}
	return string(out[:])
}
