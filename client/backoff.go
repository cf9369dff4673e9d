package client

import (
	"math/rand/v2"
	"time"
)

// backoff computes reconnect and retry delays: exponential growth from min
// to max, with full jitter (a uniform draw from zero to the ceiling), so
// that clients cut off together do not come back together.
type backoff struct {
	min, max time.Duration
	// rand returns a uniform value in [0, n); nil means math/rand/v2.
	rand func(n int64) int64
}

// ceiling is min·2^attempt, capped at max.
func (b backoff) ceiling(attempt int) time.Duration {
	c := b.min
	for i := 0; i < attempt && c < b.max; i++ {
		c *= 2
	}
	return min(c, b.max)
}

// delay is how long to wait before retry number attempt (0 for the first
// retry): uniform in [0, ceiling(attempt)]. A server's retry-after hint
// raises it: never earlier than the hint, plus up to half the hint again as
// jitter of our own, since the server may have given the same hint to many.
func (b backoff) delay(attempt int, hint time.Duration) time.Duration {
	d := b.draw(b.ceiling(attempt) + 1)
	if hint > 0 {
		d = max(d, hint+b.draw(hint/2+1))
	}
	return d
}

func (b backoff) draw(n time.Duration) time.Duration {
	if n <= 0 {
		return 0
	}
	if b.rand != nil {
		return time.Duration(b.rand(int64(n)))
	}
	return time.Duration(rand.Int64N(int64(n)))
}
