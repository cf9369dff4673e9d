package bench

import (
	"encoding/binary"
	"sync"
	"sync/atomic"
	"time"

	"github.com/HdrHistogram/hdrhistogram-go"
)

// Every bench message carries, at the start of its payload, its key (the
// sending stream in the high 32 bits, the stream's message number in the
// low 32) and its send time in Unix nanoseconds; the rest is padding up to
// the requested size. One key is one (message, receiving device) delivery:
// the bench never addresses one 1:1 send to several devices. A group send
// is one payload for every member, so its key is only the message number,
// and each receiving device counts it in a stream of its own
// (client.groupStream).
const payloadHeader = 16

func appendPayload(b []byte, key uint64, sentNanos int64, size int) []byte {
	b = binary.BigEndian.AppendUint64(b, key)
	b = binary.BigEndian.AppendUint64(b, uint64(sentNanos))
	for i := payloadHeader; i < size; i++ {
		b = append(b, byte(i))
	}
	return b
}

func parsePayload(p []byte) (key uint64, sentNanos int64, ok bool) {
	if len(p) < payloadHeader {
		return 0, 0, false
	}
	return binary.BigEndian.Uint64(p), int64(binary.BigEndian.Uint64(p[8:])), true
}

// ledger accounts for every message of a run: sent, accepted, delivered,
// acknowledged. lost and duplicates come from it.
type ledger struct {
	mu      sync.Mutex
	streams []*stream

	sent, accepted, delivered atomic.Int64 // unique messages
	confirmed                 atomic.Int64 // deliveries whose Ack the server confirmed (confirm mode)
	duplicates                atomic.Int64 // delivered again on the same connection, or after its ack was confirmed
	redelivered               atomic.Int64 // delivered again on a new connection before its ack was confirmed (at least once: legitimate)
	unexpected                atomic.Int64 // delivered but never sent, or with an undecodable payload
}

// stream is one sending device's messages, numbered from 0.
type stream struct {
	id   uint32
	mu   sync.Mutex
	next uint32
	acc  bitset
	conf bitset
	// deliveredOn[n] is the connection epoch (from 1) of the receiver on
	// which message n was first delivered, 0 if not yet.
	deliveredOn []uint32
}

type bitset []uint64

func (b *bitset) set(n uint32) bool {
	i := int(n / 64)
	for len(*b) <= i {
		*b = append(*b, 0)
	}
	m := uint64(1) << (n % 64)
	was := (*b)[i]&m != 0
	(*b)[i] |= m
	return !was
}

func (b bitset) has(n uint32) bool {
	i := int(n / 64)
	return i < len(b) && b[i]&(uint64(1)<<(n%64)) != 0
}

func (l *ledger) newStream() *stream {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := &stream{id: uint32(len(l.streams))}
	l.streams = append(l.streams, s)
	return s
}

func (l *ledger) stream(id uint32) *stream {
	l.mu.Lock()
	defer l.mu.Unlock()
	if int(id) < len(l.streams) {
		return l.streams[id]
	}
	return nil
}

// take numbers a new message of s.
func (l *ledger) take(s *stream) uint32 {
	s.mu.Lock()
	n := s.next
	s.next++
	s.mu.Unlock()
	l.sent.Add(1)
	return n
}

func (l *ledger) markAccepted(s *stream, n uint32) {
	s.mu.Lock()
	fresh := n < s.next && s.acc.set(n)
	s.mu.Unlock()
	if fresh {
		l.accepted.Add(1)
	}
}

// markDelivered records a delivery of key on a receiver connection of the
// given epoch and reports whether it is the first.
func (l *ledger) markDelivered(key uint64, epoch uint32) bool {
	s := l.stream(uint32(key >> 32))
	n := uint32(key)
	if s == nil {
		l.unexpected.Add(1)
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if n >= s.next {
		l.unexpected.Add(1)
		return false
	}
	for len(s.deliveredOn) <= int(n) {
		s.deliveredOn = append(s.deliveredOn, make([]uint32, max(1024, len(s.deliveredOn)))...)
	}
	switch was := s.deliveredOn[n]; {
	case was == 0:
		s.deliveredOn[n] = epoch
		l.delivered.Add(1)
		return true
	case was == epoch || s.conf.has(n):
		l.duplicates.Add(1)
	default:
		s.deliveredOn[n] = epoch
		l.redelivered.Add(1)
	}
	return false
}

// markConfirmed records that the server confirmed the ack of key.
func (l *ledger) markConfirmed(key uint64) {
	s := l.stream(uint32(key >> 32))
	if s == nil {
		return
	}
	s.mu.Lock()
	fresh := s.conf.set(uint32(key))
	s.mu.Unlock()
	if fresh {
		l.confirmed.Add(1)
	}
}

// lost counts accepted messages not delivered (confirm: whose ack was not
// confirmed).
func (l *ledger) lost(confirm bool) int64 {
	l.mu.Lock()
	streams := append([]*stream(nil), l.streams...)
	l.mu.Unlock()
	var lost int64
	for _, s := range streams {
		s.mu.Lock()
		for n := range s.next {
			if !s.acc.has(n) {
				continue
			}
			done := int(n) < len(s.deliveredOn) && s.deliveredOn[n] != 0
			if confirm {
				done = s.conf.has(n)
			}
			if !done {
				lost++
			}
		}
		s.mu.Unlock()
	}
	return lost
}

// latencies is a concurrent HDR histogram of microseconds.
type latencies struct {
	mu sync.Mutex
	h  *hdrhistogram.Histogram
}

func newLatencies() *latencies {
	return &latencies{h: hdrhistogram.New(1, int64(10*time.Minute/time.Microsecond), 3)}
}

func (l *latencies) record(d time.Duration) {
	us := max(int64(d/time.Microsecond), 1)
	l.mu.Lock()
	_ = l.h.RecordValue(us) // beyond the range: clamped by the caller's timeouts, never here
	l.mu.Unlock()
}

// quantileMs returns the q-th percentile (0..100) in milliseconds, or nil
// if nothing was recorded.
func (l *latencies) quantileMs(q float64) *float64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.h.TotalCount() == 0 {
		return nil
	}
	v := float64(l.h.ValueAtQuantile(q)) / 1000
	return &v
}

func (l *latencies) count() int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.h.TotalCount()
}

func (l *latencies) maxMs() *float64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.h.TotalCount() == 0 {
		return nil
	}
	v := float64(l.h.Max()) / 1000
	return &v
}
