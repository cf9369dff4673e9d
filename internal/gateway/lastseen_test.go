package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/auth/authtest"
)

// batchStore counts the batches and single writes it gets, and can hold
// a batch until released.
type batchStore struct {
	*authtest.Store
	mu      sync.Mutex
	batches []map[string]time.Time
	singles int
	hold    chan struct{} // if set, a batch waits for it to be closed
	fail    error
}

func (s *batchStore) SetLastSeenBatch(ctx context.Context, seen map[string]time.Time) error {
	if s.hold != nil {
		<-s.hold
	}
	s.mu.Lock()
	s.batches = append(s.batches, seen)
	fail := s.fail
	s.mu.Unlock()
	if fail != nil {
		return fail
	}
	for u, t := range seen {
		s.Store.SetLastSeen(ctx, u, t)
	}
	return nil
}

func (s *batchStore) SetLastSeen(ctx context.Context, user string, t time.Time) error {
	s.mu.Lock()
	s.singles++
	s.mu.Unlock()
	return s.Store.SetLastSeen(ctx, user, t)
}

var _ accounts.LastSeenBatcher = (*batchStore)(nil)

func TestSeenWriterBatches(t *testing.T) {
	st := &batchStore{Store: authtest.New(), hold: make(chan struct{})}
	for _, u := range []string{"alice", "bob", "carol"} {
		if _, _, err := st.Register(u); err != nil {
			t.Fatal(err)
		}
	}
	var warned []string
	var wmu sync.Mutex
	w := newSeenWriter(st, func(msg string, args ...any) { wmu.Lock(); warned = append(warned, msg); wmu.Unlock() })
	t0 := time.UnixMilli(1_700_000_000_000)
	// The first batch is held in the store: what comes meanwhile queues,
	// and is served from the writer until written.
	w.add("alice", t0)
	for {
		w.mu.Lock()
		writing := w.writing != nil
		w.mu.Unlock()
		if writing {
			break
		}
		time.Sleep(time.Millisecond)
	}
	w.add("bob", t0.Add(time.Second))
	w.add("carol", t0.Add(2*time.Second))
	w.add("bob", t0) // older: the newer time stays
	if got, ok := w.lastSeen("alice"); !ok || !got.Equal(t0) {
		t.Errorf("alice while written: %v %v", got, ok)
	}
	if got, ok := w.lastSeen("bob"); !ok || !got.Equal(t0.Add(time.Second)) {
		t.Errorf("bob while queued: %v %v", got, ok)
	}
	if _, ok := w.lastSeen("dave"); ok {
		t.Error("dave: a time for a user never queued")
	}
	close(st.hold)
	if err := w.close(context.Background()); err != nil {
		t.Fatal(err)
	}
	st.mu.Lock()
	nb, singles := len(st.batches), st.singles
	second := st.batches[len(st.batches)-1]
	st.mu.Unlock()
	if nb != 2 || len(second) != 2 || singles != 0 {
		t.Errorf("%d batches (last %v), %d single writes; want 2 batches, the second of bob and carol, no single write", nb, second, singles)
	}
	for u, want := range map[string]time.Time{"alice": t0, "bob": t0.Add(time.Second), "carol": t0.Add(2 * time.Second)} {
		got, err := st.User(context.Background(), u)
		if err != nil || !got.LastSeen.Equal(want) {
			t.Errorf("%s: stored %v (%v), want %v", u, got.LastSeen, err, want)
		}
		if _, ok := w.lastSeen(u); ok {
			t.Errorf("%s: still queued after close", u)
		}
	}
	// After close, times are written directly.
	w.add("alice", t0.Add(time.Hour))
	if got, _ := st.User(context.Background(), "alice"); !got.LastSeen.Equal(t0.Add(time.Hour)) {
		t.Errorf("alice after close: %v", got.LastSeen)
	}
	if err := w.close(context.Background()); err != nil {
		t.Errorf("second close: %v", err)
	}
	wmu.Lock()
	defer wmu.Unlock()
	if len(warned) != 0 {
		t.Errorf("warnings: %v", warned)
	}
}

func TestSeenWriterErrors(t *testing.T) {
	st := &batchStore{Store: authtest.New(), fail: errors.New("disk on fire")}
	warned := make(chan string, 4)
	w := newSeenWriter(st, func(msg string, args ...any) { warned <- msg })
	w.add("ghost", time.Now())
	if msg := <-warned; msg != "record last seen" {
		t.Errorf("warning %q", msg)
	}
	if err := w.close(context.Background()); err != nil {
		t.Fatal(err)
	}
	// Unknown user after close: the direct write fails and says so.
	w.add("ghost", time.Now())
	if msg := <-warned; msg != "record last seen" {
		t.Errorf("warning %q", msg)
	}

	// A close that cannot wait for the last batch reports it.
	hold := &batchStore{Store: authtest.New(), hold: make(chan struct{})}
	w = newSeenWriter(hold, func(string, ...any) {})
	w.add("x", time.Now())
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := w.close(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("close with a cancelled context: %v", err)
	}
	close(hold.hold)
	<-w.done
}

// TestDrainingRefusal checks that a gateway shutting down refuses a
// connection before authenticating it, with a jittered retry-after in
// the header (seconds) and the body (milliseconds).
func TestDrainingRefusal(t *testing.T) {
	fx := newFrameFixture(t)
	if err := fx.g.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	base := fx.g.cfg.ShutdownRetryAfter
	for range 20 {
		rec := httptest.NewRecorder()
		// No credentials: refused for draining, not as unauthorized.
		fx.g.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/v1/ws", nil))
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
		if rec.Code != http.StatusServiceUnavailable || body.Error.Code != "shutting_down" || ms < base || ms >= 2*base {
			t.Fatalf("%d %+v, want 503 shutting_down with a retry in [%v, %v)", rec.Code, body.Error, base, 2*base)
		}
		if h, want := rec.Header().Get("Retry-After"), strconv.Itoa(int((ms+time.Second-1)/time.Second)); h != want {
			t.Fatalf("Retry-After %q, want %q", h, want)
		}
	}
}
