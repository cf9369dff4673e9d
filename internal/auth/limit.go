package auth

import (
	"errors"
	"fmt"
	"hash/maphash"
	"net"
	"net/netip"
	"sync"
	"time"
)

// ErrRateLimited reports an authentication refused without checking the
// credential, because its source address or its device has had too many
// failures recently. The error is a *RateLimitError, which says when to
// retry.
var ErrRateLimited = errors.New("too many failed authentications")

// RateLimitError is returned when an authentication is refused by the
// limits on failures.
type RateLimitError struct {
	// RetryAfter is when one more attempt will be allowed.
	RetryAfter time.Duration
}

func (e *RateLimitError) Error() string {
	return fmt.Sprintf("too many failed authentications; retry in %v", e.RetryAfter)
}

// Is makes errors.Is(err, ErrRateLimited) true.
func (e *RateLimitError) Is(target error) bool { return target == ErrRateLimited }

// LimitConfig configures the limits on failed authentication: a token
// bucket per source address and one per device, which only failures take
// from. Successful authentications take nothing and are never delayed.
type LimitConfig struct {
	// Burst is how many failures a source address, or a device, may have
	// in a row before it is limited. Zero means DefaultBurst; negative
	// turns the limits off.
	Burst int
	// Every is how often one more failure is allowed once the burst is
	// spent (the bucket refills at one token per Every). Zero means
	// DefaultEvery.
	Every time.Duration
	// MaxKeys bounds how many source addresses, and separately how many
	// devices, are remembered. When the bound is reached, the key that
	// failed least recently is forgotten. Zero means DefaultMaxKeys.
	MaxKeys int
	// Now returns the current time; nil means time.Now (tests fix it).
	Now func() time.Time
}

// Defaults for LimitConfig fields left zero.
const (
	DefaultBurst   = 10
	DefaultEvery   = time.Second
	DefaultMaxKeys = 1 << 16
)

// Limiter remembers recent authentication failures, per source address and
// per device, in bounded memory. It is safe for concurrent use.
//
// An address is keyed by its IP (IPv6: its /64, the block one subscriber
// usually holds), a device by its canonical name ("alice.1").
type Limiter struct {
	every   time.Duration
	burst   float64
	now     func() time.Time
	addrs   *buckets
	devices *buckets
}

// NewLimiter returns a Limiter, or nil (no limits) if cfg.Burst < 0.
func NewLimiter(cfg LimitConfig) *Limiter {
	if cfg.Burst < 0 {
		return nil
	}
	if cfg.Burst == 0 {
		cfg.Burst = DefaultBurst
	}
	if cfg.Every <= 0 {
		cfg.Every = DefaultEvery
	}
	if cfg.MaxKeys <= 0 {
		cfg.MaxKeys = DefaultMaxKeys
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	l := &Limiter{every: cfg.Every, burst: float64(cfg.Burst), now: cfg.Now}
	l.addrs = newBuckets(l, cfg.MaxKeys)
	l.devices = newBuckets(l, cfg.MaxKeys)
	return l
}

// Keys returns how many source addresses and devices are remembered.
func (l *Limiter) Keys() (addrs, devices int) { return l.addrs.len(), l.devices.len() }

// SourceAddr returns the key of the address a request came from (its
// RemoteAddr: forwarding headers are not trusted): the IP, or for IPv6 its
// /64 prefix.
func SourceAddr(remoteAddr string) string {
	host, _, err := net.SplitHostPort(remoteAddr)
	if err != nil {
		host = remoteAddr
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return host
	}
	ip = ip.WithZone("").Unmap()
	if ip.Is6() {
		p, _ := ip.Prefix(64)
		return p.String()
	}
	return ip.String()
}

// shards spreads keys over independently locked maps.
const shards = 16

// buckets is a bounded set of token buckets keyed by string. A key that is
// absent has a full bucket, so only keys with recent failures take memory,
// and a key whose bucket has refilled is dropped when next seen.
type buckets struct {
	l     *Limiter
	seed  maphash.Seed
	shard [shards]shard
}

type shard struct {
	mu   sync.Mutex
	m    map[string]*bucket
	head bucket // sentinel of the list, most recently failed first
	max  int
}

type bucket struct {
	key        string
	tokens     float64
	at         time.Time // when tokens was computed
	prev, next *bucket
}

func newBuckets(l *Limiter, maxKeys int) *buckets {
	b := &buckets{l: l, seed: maphash.MakeSeed()}
	per := max(1, maxKeys/shards)
	for i := range b.shard {
		s := &b.shard[i]
		s.m = map[string]*bucket{}
		s.head.prev, s.head.next = &s.head, &s.head
		s.max = per
	}
	return b
}

func (b *buckets) shardOf(key string) *shard {
	return &b.shard[maphash.String(b.seed, key)%shards]
}

// level refills e up to now and returns its tokens.
func (b *buckets) level(e *bucket, now time.Time) float64 {
	if d := now.Sub(e.at); d > 0 {
		e.tokens = min(b.l.burst, e.tokens+float64(d)/float64(b.l.every))
		e.at = now
	}
	return e.tokens
}

// wait returns how long key must wait before its next attempt (zero: it
// may try now).
func (b *buckets) wait(key string) time.Duration {
	now := b.l.now()
	s := b.shardOf(key)
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.m[key]
	if e == nil {
		return 0
	}
	t := b.level(e, now)
	if t >= b.l.burst {
		s.remove(e)
		return 0
	}
	if t >= 1 {
		return 0
	}
	return time.Duration((1 - t) * float64(b.l.every))
}

// clean reports whether key has no failures left to pay for (its bucket
// is full).
func (b *buckets) clean(key string) bool {
	now := b.l.now()
	s := b.shardOf(key)
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.m[key]
	if e == nil {
		return true
	}
	if b.level(e, now) >= b.l.burst {
		s.remove(e)
		return true
	}
	return false
}

// fail takes a token from key's bucket (never below zero: a key is never
// made to wait more than Every past its limit).
func (b *buckets) fail(key string) {
	now := b.l.now()
	s := b.shardOf(key)
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.m[key]
	if e == nil {
		if len(s.m) >= s.max {
			s.remove(s.head.prev) // the least recently failed
		}
		e = &bucket{key: key, tokens: b.l.burst, at: now}
		s.m[key] = e
	} else {
		b.level(e, now)
		e.prev.next, e.next.prev = e.next, e.prev
	}
	e.tokens = max(0, e.tokens-1)
	e.prev, e.next = &s.head, s.head.next
	s.head.next.prev = e
	s.head.next = e
}

func (s *shard) remove(e *bucket) {
	e.prev.next, e.next.prev = e.next, e.prev
	e.prev, e.next = nil, nil
	delete(s.m, e.key)
}

func (b *buckets) len() int {
	n := 0
	for i := range b.shard {
		s := &b.shard[i]
		s.mu.Lock()
		n += len(s.m)
		s.mu.Unlock()
	}
	return n
}
