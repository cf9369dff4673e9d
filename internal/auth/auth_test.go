package auth

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/courier-im/courier/internal/auth/authtest"
	"github.com/courier-im/courier/internal/ident"
)

// clock is a fake time source for the limiter.
type clock struct{ ns atomic.Int64 }

func newClock() *clock {
	c := &clock{}
	c.ns.Store(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano())
	return c
}

func (c *clock) now() time.Time          { return time.Unix(0, c.ns.Load()) }
func (c *clock) advance(d time.Duration) { c.ns.Add(int64(d)) }

type fixture struct {
	store *authtest.Store
	a     *Authenticator
	clock *clock
	creds map[ident.Device]string
}

func newFixture(t *testing.T, cfg *LimitConfig) *fixture {
	t.Helper()
	fx := &fixture{store: authtest.New(), clock: newClock(), creds: map[ident.Device]string{}}
	fx.a = &Authenticator{Accounts: fx.store}
	if cfg != nil {
		cfg.Now = fx.clock.now
		fx.a.Limiter = NewLimiter(*cfg)
	}
	for _, name := range []string{"alice", "alice", "bob"} {
		d, cred, err := fx.store.Register(name)
		if err != nil {
			t.Fatal(err)
		}
		fx.creds[d] = cred
	}
	return fx
}

func (fx *fixture) cred(user string, id uint32) string {
	return fx.creds[ident.Device{User: user, ID: id}]
}

// try authenticates as user:cred from addr.
func (fx *fixture) try(addr, user, cred string) (ident.Device, error) {
	r := httptest.NewRequest("GET", "/v1/ws", nil)
	r.RemoteAddr = addr
	r.SetBasicAuth(user, cred)
	return fx.a.Authenticate(context.Background(), r)
}

func retryAfter(err error) time.Duration {
	var rl *RateLimitError
	if errors.As(err, &rl) {
		return rl.RetryAfter
	}
	return -1
}

func TestAuthenticate(t *testing.T) {
	fx := newFixture(t, nil)
	a1, a2, b1 := fx.cred("alice", 1), fx.cred("alice", 2), fx.cred("bob", 1)
	if d, err := fx.try("192.0.2.1:1", "alice.1", a1); err != nil || d != (ident.Device{User: "alice", ID: 1}) {
		t.Fatalf("right credential: %v, %v", d, err)
	}
	if d, err := fx.try("192.0.2.1:1", "alice.2", a2); err != nil || d != (ident.Device{User: "alice", ID: 2}) {
		t.Fatalf("second device: %v, %v", d, err)
	}
	for name, c := range map[string][2]string{
		"wrong credential":            {"alice.1", a1[:len(a1)-1] + "x"},
		"other device's credential":   {"alice.1", a2},
		"other user's credential":     {"alice.1", b1},
		"own credential, other user":  {"bob.1", a1},
		"unknown device":              {"alice.9", a1},
		"unknown user":                {"carol.1", a1},
		"non-canonical device":        {"alice.01", a1},
		"no device id":                {"alice", a1},
		"empty credential":            {"alice.1", ""},
		"credential with extra bytes": {"alice.1", a1 + "\x00"},
		"oversized credential":        {"alice.1", a1 + string(make([]byte, MaxCredential))},
	} {
		if d, err := fx.try("192.0.2.1:1", c[0], c[1]); !errors.Is(err, ErrUnauthorized) {
			t.Errorf("%s: got %v, %v; want ErrUnauthorized", name, d, err)
		}
	}
	for name, h := range map[string]string{
		"no header":   "",
		"bearer":      "Bearer " + a1,
		"bad base64":  "Basic !!!",
		"no colon":    "Basic YWxpY2UuMQ==",
		"empty":       "Basic ",
		"scheme only": "Basic",
	} {
		r := httptest.NewRequest("GET", "/", nil)
		if h != "" {
			r.Header.Set("Authorization", h)
		}
		if _, err := fx.a.Authenticate(context.Background(), r); !errors.Is(err, ErrUnauthorized) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func TestLimitPerAddress(t *testing.T) {
	fx := newFixture(t, &LimitConfig{Burst: 3, Every: time.Second})
	a1 := fx.cred("alice", 1)
	const addr = "192.0.2.7:4000"
	// Successes and requests without credentials cost nothing.
	for range 50 {
		if _, err := fx.try(addr, "alice.1", a1); err != nil {
			t.Fatal(err)
		}
		r := httptest.NewRequest("GET", "/", nil)
		r.RemoteAddr = addr
		if _, err := fx.a.Authenticate(context.Background(), r); !errors.Is(err, ErrUnauthorized) {
			t.Fatal(err)
		}
	}
	// Three failures (of any kind) are allowed...
	for _, user := range []string{"alice.1", "nobody.1", "not a device"} {
		if _, err := fx.try(addr, user, "wrong"); !errors.Is(err, ErrUnauthorized) {
			t.Fatalf("failure as %s: %v", user, err)
		}
	}
	// ...then the address is refused before its credential is looked at,
	// even a right one, for about Every.
	_, err := fx.try(addr, "alice.1", a1)
	if w := retryAfter(err); w <= 0 || w > time.Second || !errors.Is(err, ErrRateLimited) {
		t.Fatalf("after the burst: %v", err)
	}
	// Another port of the same address is the same source; another address
	// is not.
	if _, err := fx.try("192.0.2.7:4001", "alice.1", a1); !errors.Is(err, ErrRateLimited) {
		t.Fatalf("same address, other port: %v", err)
	}
	if _, err := fx.try("192.0.2.8:4000", "alice.1", a1); err != nil {
		t.Fatalf("other address: %v", err)
	}
	// One failure more per Every.
	fx.clock.advance(time.Second)
	if _, err := fx.try(addr, "alice.1", "wrong"); !errors.Is(err, ErrUnauthorized) {
		t.Fatalf("after a second: %v", err)
	}
	if _, err := fx.try(addr, "alice.1", "wrong"); !errors.Is(err, ErrRateLimited) {
		t.Fatalf("second try after a second: %v", err)
	}
	// The budget refills entirely, and the address is then forgotten.
	fx.clock.advance(10 * time.Second)
	if _, err := fx.try(addr, "alice.1", a1); err != nil {
		t.Fatalf("after the refill: %v", err)
	}
	if n, _ := fx.a.Limiter.Keys(); n != 0 {
		t.Fatalf("%d addresses remembered after every budget refilled", n)
	}
}

func TestIPv6AddressesLimitedPer64(t *testing.T) {
	fx := newFixture(t, &LimitConfig{Burst: 2, Every: time.Second})
	fx.try("[2001:db8:1:2::1]:1", "alice.1", "wrong")
	fx.try("[2001:db8:1:2::ffff]:1", "alice.1", "wrong")
	if _, err := fx.try("[2001:db8:1:2:abcd::9]:1", "alice.1", fx.cred("alice", 1)); !errors.Is(err, ErrRateLimited) {
		t.Fatalf("same /64: %v", err)
	}
	if _, err := fx.try("[2001:db8:1:3::1]:1", "alice.1", fx.cred("alice", 1)); err != nil {
		t.Fatalf("other /64: %v", err)
	}
}

func TestLimitPerDevice(t *testing.T) {
	fx := newFixture(t, &LimitConfig{Burst: 3, Every: time.Second})
	a1 := fx.cred("alice", 1)
	// Three attackers, one failure each: alice.1's budget is spent.
	for i := range 3 {
		if _, err := fx.try(fmt.Sprintf("198.51.100.%d:1", i), "alice.1", "guess"); !errors.Is(err, ErrUnauthorized) {
			t.Fatalf("attacker %d: %v", i, err)
		}
	}
	// An attacker with a recent failure is refused at once...
	_, err := fx.try("198.51.100.0:1", "alice.1", "guess")
	if w := retryAfter(err); w <= 0 || w > time.Second {
		t.Fatalf("attacker against a limited device: %v", err)
	}
	// ...but the real alice.1, from an address with no failures, is not
	// locked out: the attack costs her nothing.
	if d, err := fx.try("203.0.113.5:1", "alice.1", a1); err != nil || d.ID != 1 {
		t.Fatalf("alice.1 during the attack: %v, %v", d, err)
	}
	// A fresh address gets its credential checked (so one guess), after
	// which it is no longer clean and is refused too.
	if _, err := fx.try("198.51.100.50:1", "alice.1", "guess"); !errors.Is(err, ErrUnauthorized) {
		t.Fatalf("fresh attacker: %v", err)
	}
	if _, err := fx.try("198.51.100.50:1", "alice.1", "guess"); !errors.Is(err, ErrRateLimited) {
		t.Fatalf("fresh attacker, second guess: %v", err)
	}
	// Other devices are not affected.
	if _, err := fx.try("198.51.100.50:1", "alice.2", "guess"); !errors.Is(err, ErrUnauthorized) {
		t.Fatalf("other device: %v", err)
	}
	// Devices that do not exist are not remembered: a flood of made-up
	// names cannot push real devices out of the limiter.
	for i := range 100 {
		fx.try(fmt.Sprintf("192.0.2.%d:1", i), fmt.Sprintf("ghost%d.1", i), "x")
	}
	if _, devs := fx.a.Limiter.Keys(); devs != 2 {
		t.Fatalf("%d devices remembered, want 2 (alice.1, alice.2)", devs)
	}
}

func TestLimiterMemoryBounded(t *testing.T) {
	const maxKeys = 1024
	c := newClock()
	l := NewLimiter(LimitConfig{Burst: 10, Every: time.Second, MaxKeys: maxKeys, Now: c.now})
	start := time.Now()
	for i := range 200_000 {
		k := fmt.Sprintf("10.%d.%d.%d", i>>16&255, i>>8&255, i&255)
		l.addrs.fail(k)
		l.devices.fail(k)
		if i%10_000 == 0 {
			if a, d := l.Keys(); a > maxKeys || d > maxKeys {
				t.Fatalf("after %d keys: %d addresses, %d devices remembered; bound %d", i, a, d, maxKeys)
			}
		}
	}
	if a, d := l.Keys(); a > maxKeys || d > maxKeys || a < maxKeys/2 {
		t.Fatalf("%d addresses, %d devices remembered; bound %d", a, d, maxKeys)
	}
	// What is forgotten is what failed longest ago: a key hammered now is
	// remembered through a flood of others failing once each.
	for range 10 {
		l.addrs.fail("hot")
	}
	for i := range maxKeys / shards / 2 {
		l.addrs.fail("cold" + strconv.Itoa(i))
	}
	if l.addrs.wait("hot") == 0 {
		t.Fatal("a key that spent its burst was forgotten under churn")
	}
	if d := time.Since(start); d > 20*time.Second {
		t.Fatalf("200000 keys took %v", d)
	}
	// Refilled buckets are dropped as they are seen.
	before := l.addrs.len()
	c.advance(time.Minute)
	if l.addrs.wait("hot") != 0 || l.addrs.len() != before-1 {
		t.Fatal("a refilled key was not dropped")
	}
}

func TestLimiterConcurrent(t *testing.T) {
	fx := newFixture(t, &LimitConfig{Burst: 5, Every: time.Millisecond, MaxKeys: 64})
	a1 := fx.cred("alice", 1)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 2000 {
				addr := fmt.Sprintf("192.0.2.%d:1", (g*31+i)%200)
				if i%3 == 0 {
					if _, err := fx.try(addr, "alice.1", a1); err != nil && !errors.Is(err, ErrRateLimited) {
						t.Errorf("right credential: %v", err)
					}
				} else if d, err := fx.try(addr, "alice.1", "wrong"); err == nil {
					t.Errorf("wrong credential authenticated as %v", d)
				}
				fx.clock.advance(time.Microsecond * 50)
			}
		})
	}
	wg.Wait()
	if a, d := fx.a.Limiter.Keys(); a > 64 || d > 64 {
		t.Fatalf("%d/%d keys, bound 64", a, d)
	}
}

func TestLimiterOff(t *testing.T) {
	if NewLimiter(LimitConfig{Burst: -1}) != nil {
		t.Fatal("negative burst should turn the limits off")
	}
	fx := newFixture(t, nil)
	for range 100 {
		fx.try("192.0.2.1:1", "alice.1", "wrong")
	}
	if _, err := fx.try("192.0.2.1:1", "alice.1", fx.cred("alice", 1)); err != nil {
		t.Fatal(err)
	}
}

func TestSourceAddr(t *testing.T) {
	for in, want := range map[string]string{
		"192.0.2.1:5":             "192.0.2.1",
		"127.0.0.2:80":            "127.0.0.2",
		"[2001:db8::1]:5":         "2001:db8::/64",
		"[2001:db8:0:0:ffff::]:9": "2001:db8::/64",
		"[::ffff:192.0.2.1]:5":    "192.0.2.1",
		"[fe80::1%eth0]:5":        "fe80::/64",
		"[::1]:8080":              "::/64",
		"pipe":                    "pipe",
		"":                        "",
	} {
		if got := SourceAddr(in); got != want {
			t.Errorf("SourceAddr(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestWriteError(t *testing.T) {
	for _, tc := range []struct {
		err    error
		status int
		code   string
		retry  string
	}{
		{ErrUnauthorized, 401, "unauthorized", ""},
		{&RateLimitError{RetryAfter: 300 * time.Millisecond}, 429, "rate_limited", "1"},
		{&RateLimitError{RetryAfter: 2500 * time.Millisecond}, 429, "rate_limited", "3"},
		{&RateLimitError{RetryAfter: time.Nanosecond}, 429, "rate_limited", "1"},
		{errors.New("database is locked"), 503, "storage_unavailable", "1"},
	} {
		w := httptest.NewRecorder()
		WriteError(w, tc.err)
		var body struct {
			Error struct {
				Code         string `json:"code"`
				RetryAfterMs int64  `json:"retry_after_ms"`
			} `json:"error"`
		}
		if err := json.Unmarshal(w.Body.Bytes(), &body); err != nil {
			t.Fatalf("%v: body %q: %v", tc.err, w.Body, err)
		}
		if w.Code != tc.status || body.Error.Code != tc.code || w.Header().Get("Retry-After") != tc.retry {
			t.Errorf("%v: %d %q Retry-After %q; want %d %q %q", tc.err, w.Code, body.Error.Code, w.Header().Get("Retry-After"), tc.status, tc.code, tc.retry)
		}
		if tc.status == http.StatusUnauthorized && w.Header().Get("WWW-Authenticate") == "" {
			t.Error("401 without WWW-Authenticate")
		}
	}
}
