package client

import (
	"math/rand/v2"
	"testing"
	"time"
)

func TestBackoffCeiling(t *testing.T) {
	b := backoff{min: 250 * time.Millisecond, max: 30 * time.Second}
	want := []time.Duration{250 * time.Millisecond, 500 * time.Millisecond, time.Second, 2 * time.Second,
		4 * time.Second, 8 * time.Second, 16 * time.Second, 30 * time.Second, 30 * time.Second}
	for attempt, w := range want {
		if got := b.ceiling(attempt); got != w {
			t.Errorf("ceiling(%d) = %v, want %v", attempt, got, w)
		}
	}
	if got := b.ceiling(1 << 20); got != 30*time.Second {
		t.Errorf("ceiling of a huge attempt = %v, want the max", got)
	}
}

func TestBackoffBounds(t *testing.T) {
	b := backoff{min: 250 * time.Millisecond, max: 30 * time.Second}
	for attempt := 0; attempt < 40; attempt++ {
		c := b.ceiling(attempt)
		for range 200 {
			if d := b.delay(attempt, 0); d < 0 || d > c {
				t.Fatalf("delay(%d) = %v, outside [0, %v]", attempt, d, c)
			}
		}
	}
	// A retry-after hint is a floor, with up to half of it again as jitter.
	for range 200 {
		if d := b.delay(0, 4*time.Second); d < 4*time.Second || d > 6*time.Second {
			t.Fatalf("delay with a 4s hint = %v, want within [4s, 6s]", d)
		}
	}
	// A small hint does not shorten the backoff's own draw's range.
	for range 200 {
		if d := b.delay(10, time.Millisecond); d > 30*time.Second {
			t.Fatalf("delay = %v beyond the max", d)
		}
	}
}

// Full jitter: delays are spread uniformly over [0, ceiling], not bunched
// near the ceiling (which would bring a crowd back together).
func TestBackoffFullJitterDistribution(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	b := backoff{min: 100 * time.Millisecond, max: time.Second, rand: r.Int64N}
	const n = 20000
	const attempt = 10 // ceiling: the max
	c := b.ceiling(attempt)
	var quartiles [4]int
	var sum time.Duration
	lo, hi := c, time.Duration(0)
	for range n {
		d := b.delay(attempt, 0)
		sum += d
		lo, hi = min(lo, d), max(hi, d)
		quartiles[min(int(4*d/(c+1)), 3)]++
	}
	mean := sum / n
	if mean < c*45/100 || mean > c*55/100 {
		t.Errorf("mean delay %v, want about %v", mean, c/2)
	}
	for i, q := range quartiles {
		if q < n*22/100 || q > n*28/100 {
			t.Errorf("quartile %d holds %d of %d draws, want about a quarter", i, q, n)
		}
	}
	if lo > c/50 || hi < c*98/100 {
		t.Errorf("draws span [%v, %v], want nearly all of [0, %v]", lo, hi, c)
	}
}
