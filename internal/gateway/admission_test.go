package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"math"
	"net/http"
	"net/http/httptest"
	"runtime/debug"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/courier-im/courier/internal/auth"
)

// fakeAdmission is an admission whose random draws are fixed (draw
// returns the wanted fraction of n) and whose readings come from read.
func fakeAdmission(t *testing.T, cfg Config, draw float64, read func() (loadReading, error)) *admission {
	t.Helper()
	a, err := newAdmission(cfg)
	if err != nil {
		t.Fatal(err)
	}
	a.rand = func(n int64) int64 { return int64(draw * float64(n-1)) }
	if read != nil {
		a.read = read
	}
	return a
}

func TestAdmissionConnections(t *testing.T) {
	a := fakeAdmission(t, Config{MaxConns: 10, AdmitWatermark: 0.8}, 0, nil)
	for i := range 8 {
		if retry, refuse := a.enter(); refuse {
			t.Fatalf("connection %d refused (retry %v) below the watermark", i+1, retry)
		}
	}
	// The ninth is at the watermark: refused, told to come back in 1–2 s.
	retry, refuse := a.enter()
	if !refuse || retry < overloadRetryMin || retry >= 2*overloadRetryMin {
		t.Fatalf("ninth connection: refuse %v, retry %v; want refused with a retry in [1s, 2s)", refuse, retry)
	}
	if v, ok := a.load(SignalConnections); !ok || v != 0.9 {
		t.Fatalf("connections signal %v %v while the refusal is answered, want 0.9", v, ok)
	}
	a.leave() // the refusal answered
	if _, refuse := a.enter(); !refuse {
		t.Fatal("another attempt at the watermark admitted")
	}
	a.leave()
	// One connection ends: one more fits.
	a.leave()
	if _, refuse := a.enter(); refuse {
		t.Fatal("refused after a connection ended")
	}
	if v, _ := a.load(SignalConnections); v != 0.8 {
		t.Fatalf("connections signal %v, want 0.8", v)
	}
	if got := a.signals(); strings.Join(got, ",") != "connections,cpu" {
		t.Fatalf("signals on: %v, want connections and cpu (no memory limit)", got)
	}

	// No cap: never refused on connections, and no connection signal.
	b := fakeAdmission(t, Config{}, 0, nil)
	for range 1000 {
		if _, refuse := b.enter(); refuse {
			t.Fatal("refused with no cap")
		}
	}
	if _, ok := b.load(SignalConnections); ok {
		t.Fatal("connection signal on with no cap")
	}
}

// The retry delay grows with how far over the mark the worst signal is,
// from [1 s, 2 s) at the mark to [15 s, 30 s) far over, and the jitter
// spans [base, 2·base).
func TestAdmissionRetryAfter(t *testing.T) {
	for _, c := range []struct {
		worst float64
		base  time.Duration
	}{
		{1, time.Second},
		{1.0625, 2 * time.Second},
		{1.25, 5 * time.Second}, // a limit fully used, with the mark at 0.8
		{1.5, 9 * time.Second},
		{2, 15 * time.Second},
		{100, 15 * time.Second},
	} {
		lo := fakeAdmission(t, Config{}, 0, nil).retryAfter(c.worst)
		hi := fakeAdmission(t, Config{}, 1, nil).retryAfter(c.worst)
		if lo != c.base || hi != 2*c.base-1 {
			t.Errorf("%v times the mark: retry from %v to %v, want from %v to just under %v", c.worst, lo, hi, c.base, 2*c.base)
		}
	}
	// Over the connection mark, the delay grows with the excess.
	a := fakeAdmission(t, Config{MaxConns: 10, AdmitWatermark: 0.5}, 0, nil)
	var last time.Duration
	for i := range 12 {
		retry, refuse := a.enter()
		if refuse != (i >= 5) {
			t.Fatalf("attempt %d: refuse %v", i+1, refuse)
		}
		if refuse && retry < last {
			t.Fatalf("attempt %d: retry %v, less than %v before it", i+1, retry, last)
		}
		last = retry
	}
	if last != overloadRetryMax {
		// 11 of 10 with the mark at half is 2.2 times the mark.
		t.Fatalf("at 11 of 10 with the mark at half: retry %v, want the most, %v", last, overloadRetryMax)
	}
}

func TestAdmissionMemory(t *testing.T) {
	var mem uint64
	readErr := error(nil)
	read := func() (loadReading, error) { return loadReading{mem: mem}, readErr }
	a := fakeAdmission(t, Config{MaxMemory: 1000}, 0, read)
	now := time.Unix(0, 0)
	for _, c := range []struct {
		mem    uint64
		refuse bool
	}{{100, false}, {799, false}, {800, true}, {1200, true}, {500, false}} {
		mem = c.mem
		if err := a.sample(now); err != nil {
			t.Fatal(err)
		}
		now = now.Add(admitSampleEvery)
		retry, refuse := a.enter()
		a.leave()
		if refuse != c.refuse {
			t.Fatalf("memory %d of 1000: refuse %v, want %v", c.mem, refuse, c.refuse)
		}
		if v, ok := a.load(SignalMemory); !ok || v != float64(c.mem)/1000 {
			t.Fatalf("memory signal %v %v, want %v", v, ok, float64(c.mem)/1000)
		}
		if c.mem == 1200 && (retry < 9*time.Second-time.Millisecond || retry > 9*time.Second) {
			// 1.2 / 0.8 = 1.5 times the mark (give or take rounding).
			t.Fatalf("memory at 120%%: retry %v, want 9s", retry)
		}
	}
	// A failed reading keeps the last values.
	readErr = errors.New("no /proc")
	mem = 900
	if err := a.sample(now); err == nil {
		t.Fatal("sample hid the reading's error")
	}
	if v, _ := a.load(SignalMemory); v != 0.5 {
		t.Fatalf("memory signal %v after a failed reading, want 0.5 kept", v)
	}

	// Without MaxMemory the Go memory limit is the limit, if one is set;
	// negative turns the signal off.
	if a := fakeAdmission(t, Config{}, 0, nil); debug.SetMemoryLimit(-1) == math.MaxInt64 && a.memLimit != 0 {
		t.Fatalf("memory limit %d with no Go limit", a.memLimit)
	}
	old := debug.SetMemoryLimit(1 << 40)
	defer debug.SetMemoryLimit(old)
	if a := fakeAdmission(t, Config{}, 0, nil); a.memLimit != 1<<40 {
		t.Fatalf("memory limit %d, want the Go limit %d", a.memLimit, 1<<40)
	}
	if a := fakeAdmission(t, Config{MaxMemory: -1}, 0, nil); a.memLimit != 0 {
		t.Fatalf("memory limit %d with the signal off", a.memLimit)
	}
	// The real reading works here.
	if r, err := readLoad(); err != nil || r.mem == 0 || r.cpu < 0 {
		t.Fatalf("readLoad: %+v, %v", r, err)
	}
}

// The CPU signal is the process's CPU time per core, smoothed; it refuses
// only when a CPU watermark is set.
func TestAdmissionCPU(t *testing.T) {
	var cpu time.Duration
	read := func() (loadReading, error) { return loadReading{cpu: cpu}, nil }
	for _, mark := range []float64{0, 0.8} {
		a := fakeAdmission(t, Config{AdmitCPU: mark}, 0, read)
		a.procs = 2
		cpu = 0
		now := time.Unix(0, 0)
		// Both cores busy for a minute of samples: the signal climbs to 1.
		for range 240 {
			if err := a.sample(now); err != nil {
				t.Fatal(err)
			}
			now = now.Add(admitSampleEvery)
			cpu += 2 * admitSampleEvery
		}
		v, ok := a.load(SignalCPU)
		if !ok || v < 0.99 || v > 1 {
			t.Fatalf("CPU signal %v after a minute at full use, want about 1", v)
		}
		_, refuse := a.enter()
		a.leave()
		if refuse != (mark > 0) {
			t.Fatalf("CPU mark %v at full use: refuse %v", mark, refuse)
		}
		// A short burst at full use barely moves an idle process's signal.
		a.sample(now)
		for range 240 {
			now = now.Add(admitSampleEvery)
			a.sample(now)
		}
		for range 4 {
			now = now.Add(admitSampleEvery)
			cpu += 2 * admitSampleEvery
			a.sample(now)
		}
		if v, _ := a.load(SignalCPU); v > 0.25 {
			t.Fatalf("CPU signal %v after a one-second burst, want it smoothed", v)
		}
		if _, refuse := a.enter(); refuse {
			t.Fatal("refused after a short burst")
		}
		a.leave()
	}
}

func TestAdmissionSettings(t *testing.T) {
	for _, cfg := range []Config{{AdmitWatermark: -0.1}, {AdmitWatermark: 1.5}, {AdmitCPU: -1}, {AdmitCPU: 2}} {
		if _, err := newAdmission(cfg); err == nil {
			t.Errorf("watermark %v, CPU %v accepted", cfg.AdmitWatermark, cfg.AdmitCPU)
		}
	}
	a, err := newAdmission(Config{AdmitWatermark: 1, AdmitCPU: 1})
	if err != nil || a.watermark != 1 || a.cpuMark != 1 {
		t.Fatalf("watermarks of 1: %+v, %v", a, err)
	}
	if a, _ := newAdmission(Config{}); a.watermark != DefaultAdmitWatermark || a.cpuMark != 0 {
		t.Fatalf("defaults: watermark %v, CPU %v", a.watermark, a.cpuMark)
	}
}

// Over the connection mark, the gateway answers 503 overloaded before
// authenticating, and counts the refusal; refused attempts hold no place.
func TestOverloadedRefusal(t *testing.T) {
	fx := newFrameFixture(t)
	defer fx.close()
	g, err := Open(Config{Accounts: fx.accts, Mailbox: fx.mb, Delivery: fx.svc, Auth: &auth.Authenticator{Accounts: fx.accts},
		Metrics: fx.g.cfg.Metrics, MaxConns: 4, AdmitWatermark: 0.5})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Shutdown(context.Background())
	g.load.conns.Add(2) // two connections open: at the mark
	before := counterValue(t, g.cfg.Metrics.Connects.WithLabelValues("overloaded"))
	for range 5 {
		rec := httptest.NewRecorder()
		g.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/v1/ws", nil))
		var body struct {
			Error struct {
				Code         string `json:"code"`
				RetryAfterMs int64  `json:"retry_after_ms"`
			} `json:"error"`
		}
		if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil {
			t.Fatalf("body %q: %v", rec.Body, err)
		}
		ms := time.Duration(body.Error.RetryAfterMs) * time.Millisecond
		if rec.Code != http.StatusServiceUnavailable || body.Error.Code != "overloaded" || ms < time.Second || ms >= 2*time.Second {
			t.Fatalf("%d %+v, want 503 overloaded with a retry in [1s, 2s)", rec.Code, body.Error)
		}
		if h, want := rec.Header().Get("Retry-After"), strconv.Itoa(int((ms+time.Second-1)/time.Second)); h != want {
			t.Fatalf("Retry-After %q, want %q", h, want)
		}
	}
	if n := counterValue(t, g.cfg.Metrics.Connects.WithLabelValues("overloaded")) - before; n != 5 {
		t.Fatalf("%v overloaded refusals counted, want 5", n)
	}
	if n := g.load.conns.Load(); n != 2 {
		t.Fatalf("%d connections counted after the refusals, want 2", n)
	}
	if v, ok := g.Load(SignalConnections); !ok || v != 0.5 {
		t.Fatalf("Load(connections) = %v %v, want 0.5", v, ok)
	}
	// Under the mark again, the attempt goes on to authentication.
	g.load.conns.Add(-1)
	rec := httptest.NewRecorder()
	g.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/v1/ws", nil))
	if rec.Code != http.StatusUnauthorized {
		t.Fatalf("under the mark, without credentials: %d %s, want 401", rec.Code, rec.Body)
	}
	if n := g.load.conns.Load(); n != 1 {
		t.Fatalf("%d connections counted after a failed authentication, want 1", n)
	}
}
