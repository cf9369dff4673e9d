package keys

import (
	"container/list"
	"sync"
	"time"
)

// LimitConfig configures the limit on bundle fetches: a token bucket per
// requesting device, from which every fetch takes one token.
type LimitConfig struct {
	// Burst is how many fetches a device may make in a row. Zero means
	// DefaultFetchBurst; negative turns the limit off.
	Burst int
	// Every is how often one more fetch is allowed once the burst is
	// spent. Zero means DefaultFetchEvery.
	Every time.Duration
	// MaxKeys bounds how many devices are remembered; when the bound is
	// reached, the device that fetched least recently is forgotten (its
	// bucket starts full again). Zero means DefaultFetchMaxKeys.
	MaxKeys int
	// Now returns the current time; nil means time.Now (tests fix it).
	Now func() time.Time
}

// Defaults for LimitConfig fields left zero: a client starting a
// conversation with each member of a large group at once fits in the
// burst; a scraper draining other users' prekeys gets one a second.
const (
	DefaultFetchBurst   = 100
	DefaultFetchEvery   = time.Second
	DefaultFetchMaxKeys = 1 << 16
)

// Limiter is a bounded set of token buckets keyed by device. It is safe for
// concurrent use. A nil *Limiter allows everything.
type Limiter struct {
	burst float64
	every time.Duration
	max   int
	now   func() time.Time

	mu  sync.Mutex
	m   map[string]*list.Element
	lru list.List // of *bucket, most recently used first
}

type bucket struct {
	key    string
	tokens float64
	at     time.Time
}

// NewLimiter returns a Limiter, or nil (no limit) if cfg.Burst < 0.
func NewLimiter(cfg LimitConfig) *Limiter {
	if cfg.Burst < 0 {
		return nil
	}
	if cfg.Burst == 0 {
		cfg.Burst = DefaultFetchBurst
	}
	if cfg.Every <= 0 {
		cfg.Every = DefaultFetchEvery
	}
	if cfg.MaxKeys <= 0 {
		cfg.MaxKeys = DefaultFetchMaxKeys
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Limiter{burst: float64(cfg.Burst), every: cfg.Every, max: cfg.MaxKeys, now: cfg.Now, m: map[string]*list.Element{}}
}

// Take takes a token from key's bucket. It returns zero if there was one,
// or else how long until there will be (and takes nothing).
func (l *Limiter) Take(key string) time.Duration {
	if l == nil {
		return 0
	}
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	var b *bucket
	if e, ok := l.m[key]; ok {
		b = e.Value.(*bucket)
		if d := now.Sub(b.at); d > 0 {
			b.tokens = min(l.burst, b.tokens+float64(d)/float64(l.every))
			b.at = now
		}
		l.lru.MoveToFront(e)
	} else {
		if len(l.m) >= l.max {
			old := l.lru.Back()
			l.lru.Remove(old)
			delete(l.m, old.Value.(*bucket).key)
		}
		b = &bucket{key: key, tokens: l.burst, at: now}
		l.m[key] = l.lru.PushFront(b)
	}
	if b.tokens < 1 {
		return time.Duration((1 - b.tokens) * float64(l.every))
	}
	b.tokens--
	return 0
}

// Len returns how many devices are remembered.
func (l *Limiter) Len() int {
	if l == nil {
		return 0
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.m)
}
