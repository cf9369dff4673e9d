package cache

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/accounts/accountstest"
	"github.com/courier-im/courier/internal/accounts/sqlite"
	"github.com/courier-im/courier/internal/auth/authtest"
	"github.com/courier-im/courier/internal/ident"
)

// counting is an in-memory store that counts Devices calls and can hold
// one (block) or fail them (err).
type counting struct {
	*authtest.Store
	calls atomic.Int64

	mu    sync.Mutex
	block chan struct{} // if set, the next Devices call waits on it
	began chan struct{} // closed when that call has read the store
	err   error
}

func newCounting() *counting { return &counting{Store: authtest.New()} }

func (s *counting) Devices(ctx context.Context, user string) ([]accounts.Device, error) {
	s.calls.Add(1)
	s.mu.Lock()
	block, began, err := s.block, s.began, s.err
	s.block, s.began = nil, nil
	s.mu.Unlock()
	if err != nil {
		return nil, err
	}
	devs, derr := s.Store.Devices(ctx, user)
	if block != nil {
		close(began)
		<-block
	}
	return devs, derr
}

// holdNext makes the next Devices call read the store, close the returned
// began channel, and wait until release is closed before it returns.
func (s *counting) holdNext() (began, release chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.block, s.began = make(chan struct{}), make(chan struct{})
	return s.began, s.block
}

// value is a counter's value.
func value(t *testing.T, c prometheus.Metric) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// clock is a manual clock for TTL tests.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func newCache(t *testing.T, st accounts.Store, opts Options) *Store {
	t.Helper()
	c, err := New(st, opts)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func mustCreate(t *testing.T, s accounts.Store, name string) {
	t.Helper()
	_, hash := accounts.NewCredential()
	if _, _, err := s.CreateUser(context.Background(), name, "phone", hash); err != nil {
		t.Fatalf("create %s: %v", name, err)
	}
}

func mustAdd(t *testing.T, s accounts.Store, name string) uint32 {
	t.Helper()
	_, hash := accounts.NewCredential()
	d, err := s.AddDevice(context.Background(), name, "laptop", hash)
	if err != nil {
		t.Fatalf("add a device to %s: %v", name, err)
	}
	return d.ID
}

func deviceIDs(t *testing.T, s accounts.Store, name string) []uint32 {
	t.Helper()
	devs, err := s.Devices(context.Background(), name)
	if err != nil {
		t.Fatalf("devices of %s: %v", name, err)
	}
	ids := make([]uint32, len(devs))
	for i, d := range devs {
		ids[i] = d.ID
	}
	return ids
}

func wantIDs(t *testing.T, what string, got []uint32, want ...uint32) {
	t.Helper()
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("%s: devices %v, want %v", what, got, want)
	}
}

func TestHitAfterMiss(t *testing.T) {
	st := newCounting()
	reg := prometheus.NewRegistry()
	c := newCache(t, st, Options{Registry: reg})
	mustCreate(t, c, "alice")
	for range 5 {
		wantIDs(t, "alice", deviceIDs(t, c, "alice"), 1)
	}
	if n := st.calls.Load(); n != 1 {
		t.Fatalf("the store was read %d times for 5 look-ups, want 1", n)
	}
	if h, m := value(t, c.hits), value(t, c.misses); h != 4 || m != 1 {
		t.Fatalf("hits %v misses %v, want 4 and 1", h, m)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			got[mf.GetName()] += m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	if got["courier_device_cache_hits_total"] != 4 || got["courier_device_cache_entries"] != 1 {
		t.Fatalf("registered metrics: %v", got)
	}
}

// A caller that modifies what it got cannot change what others get.
func TestCallersOwnTheirSlices(t *testing.T) {
	c := newCache(t, newCounting(), Options{})
	mustCreate(t, c, "alice")
	mustAdd(t, c, "alice")
	for range 2 { // the miss, then a hit
		devs, err := c.Devices(context.Background(), "alice")
		if err != nil {
			t.Fatal(err)
		}
		devs[0].ID, devs[0].Name = 99, "evil"
		devs = append(devs[:1], accounts.Device{ID: 100})
		_ = devs
	}
	devs, err := c.Devices(context.Background(), "alice")
	if err != nil || len(devs) != 2 || devs[0].ID != 1 || devs[0].Name != "phone" || devs[1].ID != 2 {
		t.Fatalf("devices after callers scribbled on theirs: %+v, %v", devs, err)
	}
}

// DevicesView serves a held list itself, without a copy, and sees a
// change as Devices does; what a caller of Devices does to its copy does
// not reach it.
func TestDevicesView(t *testing.T) {
	ctx := context.Background()
	st := newCounting()
	c := newCache(t, st, Options{})
	mustCreate(t, c, "alice")
	first, err := accounts.DevicesView(ctx, c, "alice") // the miss
	if err != nil || len(first) != 1 {
		t.Fatalf("DevicesView = %+v, %v", first, err)
	}
	var view []accounts.Device
	if n := testing.AllocsPerRun(100, func() {
		view, err = accounts.DevicesView(ctx, c, "alice")
	}); n != 0 || err != nil {
		t.Fatalf("a hit allocated %v times (%v), want 0", n, err)
	}
	again, _ := accounts.DevicesView(ctx, c, "alice")
	if &view[0] != &again[0] {
		t.Error("two hits returned different slices, want the held one")
	}
	own, _ := c.Devices(ctx, "alice")
	own[0].ID = 99
	if view, _ = accounts.DevicesView(ctx, c, "alice"); view[0].ID != 1 {
		t.Fatalf("a Devices caller's change reached the held list: %+v", view)
	}
	mustAdd(t, c, "alice")
	if view, _ = accounts.DevicesView(ctx, c, "alice"); len(view) != 2 {
		t.Fatalf("after a device was added DevicesView = %+v", view)
	}
	if n := st.calls.Load(); n != 2 {
		t.Errorf("the store was read %d times, want 2 (the first miss, the miss after the change)", n)
	}
	// A store without the capability serves a copy.
	if v, err := accounts.DevicesView(ctx, st, "alice"); err != nil || len(v) != 2 {
		t.Fatalf("DevicesView of a plain store = %+v, %v", v, err)
	}
}

func TestChangesInvalidate(t *testing.T) {
	st := newCounting()
	var changed []string
	c := newCache(t, st, Options{OnChange: func(u string) { changed = append(changed, u) }})
	mustCreate(t, c, "alice")
	wantIDs(t, "created", deviceIDs(t, c, "alice"), 1)
	id := mustAdd(t, c, "alice")
	wantIDs(t, "after AddDevice", deviceIDs(t, c, "alice"), 1, id)
	if err := c.RemoveDevice(context.Background(), ident.Device{User: "alice", ID: 1}); err != nil {
		t.Fatal(err)
	}
	wantIDs(t, "after RemoveDevice", deviceIDs(t, c, "alice"), id)
	// A failed change that changed nothing is not broadcast.
	if err := c.RemoveDevice(context.Background(), ident.Device{User: "alice", ID: 1}); !errors.Is(err, accounts.ErrNotFound) {
		t.Fatalf("removing a removed device: %v", err)
	}
	if _, err := c.AddDevice(context.Background(), "nobody", "x", []byte("h")); !errors.Is(err, accounts.ErrNotFound) {
		t.Fatalf("adding a device to nobody: %v", err)
	}
	if got := strings.Join(changed, ","); got != "alice,alice" {
		t.Fatalf("OnChange calls %q, want alice twice", got)
	}
	// A change made behind the cache's back is seen once invalidated.
	wantIDs(t, "held", deviceIDs(t, c, "alice"), id)
	_, hash := accounts.NewCredential()
	d, err := st.AddDevice(context.Background(), "alice", "behind", hash)
	if err != nil {
		t.Fatal(err)
	}
	wantIDs(t, "before Invalidate", deviceIDs(t, c, "alice"), id)
	c.Invalidate("alice")
	wantIDs(t, "after Invalidate", deviceIDs(t, c, "alice"), id, d.ID)
	st.AddDevice(context.Background(), "alice", "behind2", hash)
	c.Flush()
	if c.Len() != 0 {
		t.Fatalf("%d entries after Flush", c.Len())
	}
	wantIDs(t, "after Flush", deviceIDs(t, c, "alice"), id, d.ID, d.ID+1)
	if n := value(t, c.invalidations.WithLabelValues(reasonRemote)); n != 1 {
		t.Fatalf("remote invalidations %v, want 1", n)
	}
}

// A look-up that read the store before a change must not put what it read
// back after the change's invalidation.
func TestLoadRacingInvalidation(t *testing.T) {
	for _, how := range []string{"change", "invalidate", "flush"} {
		t.Run(how, func(t *testing.T) {
			st := newCounting()
			c := newCache(t, st, Options{})
			mustCreate(t, c, "alice")
			began, release := st.holdNext()
			done := make(chan []uint32)
			go func() {
				devs, _ := c.Devices(context.Background(), "alice")
				var ids []uint32
				for _, d := range devs {
					ids = append(ids, d.ID)
				}
				done <- ids
			}()
			<-began // the look-up has read [1]
			var id uint32
			switch how {
			case "change":
				id = mustAdd(t, c, "alice")
			case "invalidate", "flush":
				_, hash := accounts.NewCredential()
				d, err := st.AddDevice(context.Background(), "alice", "behind", hash)
				if err != nil {
					t.Fatal(err)
				}
				id = d.ID
				if how == "flush" {
					c.Flush()
				} else {
					c.Invalidate("alice")
				}
			}
			close(release)
			wantIDs(t, "the racing look-up", <-done, 1) // it read before the change
			wantIDs(t, "the next look-up", deviceIDs(t, c, "alice"), 1, id)
		})
	}
}

// Many look-ups and changes at once: after the dust settles the cache
// agrees with the store. Run with -race.
func TestConcurrentLookupsAndChanges(t *testing.T) {
	st := newCounting()
	c := newCache(t, st, Options{Size: 8})
	users := []string{"a", "b", "c", "d", "e", "f", "g", "h", "i", "j"}
	for _, u := range users {
		mustCreate(t, c, u)
	}
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 300 {
				u := users[(g+i)%len(users)]
				switch i % 10 {
				case 0:
					_, hash := accounts.NewCredential()
					if _, err := c.AddDevice(context.Background(), u, "x", hash); err != nil {
						t.Error(err)
						return
					}
				case 5:
					c.Invalidate(u)
				default:
					if _, err := c.Devices(context.Background(), u); err != nil {
						t.Error(err)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	for _, u := range users {
		got := fmt.Sprint(deviceIDs(t, c, u))
		want := fmt.Sprint(deviceIDs(t, st, u))
		if got != want {
			t.Errorf("%s: cache %s, store %s", u, got, want)
		}
	}
}

func TestBoundedSize(t *testing.T) {
	for _, size := range []int{1, 3, 64, 100, 1000} {
		t.Run(fmt.Sprint(size), func(t *testing.T) {
			st := newCounting()
			c := newCache(t, st, Options{Size: size})
			n := 3*size + 10
			for i := range n {
				u := fmt.Sprint("u", i)
				mustCreate(t, st, u)
				deviceIDs(t, c, u)
				if c.Len() > size {
					t.Fatalf("%d entries with size %d", c.Len(), size)
				}
			}
			if ev := value(t, c.evictions); ev < float64(n-size) {
				t.Fatalf("%v evictions for %d users in a cache of %d", ev, n, size)
			}
			// The most recent user is held.
			before := st.calls.Load()
			deviceIDs(t, c, fmt.Sprint("u", n-1))
			if st.calls.Load() != before {
				t.Fatal("the most recently read user was not held")
			}
		})
	}
}

// The least recently used user of a shard goes first; the one just read
// stays.
func TestLRU(t *testing.T) {
	st := newCounting()
	c := newCache(t, st, Options{Size: 2})
	for _, u := range []string{"a", "b", "c"} {
		mustCreate(t, st, u)
	}
	deviceIDs(t, c, "a")
	deviceIDs(t, c, "b")
	deviceIDs(t, c, "a") // a is now more recent than b
	deviceIDs(t, c, "c") // pushes out the older of its shard
	before := st.calls.Load()
	deviceIDs(t, c, "c")
	if st.calls.Load() != before {
		t.Fatal("c, just read, is not held")
	}
	if c.Len() > 2 {
		t.Fatalf("%d entries in a cache of 2", c.Len())
	}
}

func TestTTL(t *testing.T) {
	st := newCounting()
	clk := &clock{t: time.Unix(1_900_000_000, 0)}
	c := newCache(t, st, Options{TTL: 10 * time.Second, now: clk.now})
	mustCreate(t, c, "alice")
	deviceIDs(t, c, "alice")
	_, hash := accounts.NewCredential()
	d, err := st.AddDevice(context.Background(), "alice", "behind", hash)
	if err != nil {
		t.Fatal(err)
	}
	clk.advance(9 * time.Second)
	wantIDs(t, "within the TTL", deviceIDs(t, c, "alice"), 1)
	clk.advance(time.Second)
	wantIDs(t, "at the TTL", deviceIDs(t, c, "alice"), 1, d.ID)
	if n := st.calls.Load(); n != 2 {
		t.Fatalf("store read %d times, want 2", n)
	}
}

func TestErrorsPassThroughUncached(t *testing.T) {
	st := newCounting()
	c := newCache(t, st, Options{})
	// Unknown users are not remembered: created elsewhere, found at once.
	if _, err := c.Devices(context.Background(), "bob"); !errors.Is(err, accounts.ErrNotFound) {
		t.Fatalf("unknown user: %v", err)
	}
	mustCreate(t, st, "bob")
	wantIDs(t, "bob created behind the cache", deviceIDs(t, c, "bob"), 1)

	boom := errors.New("disk on fire")
	st.mu.Lock()
	st.err = boom
	st.mu.Unlock()
	if _, err := c.Devices(context.Background(), "carol"); !errors.Is(err, boom) {
		t.Fatalf("store failure: %v, want it passed through", err)
	}
	st.mu.Lock()
	st.err = nil
	st.mu.Unlock()
	mustCreate(t, st, "carol")
	wantIDs(t, "after the failure", deviceIDs(t, c, "carol"), 1)
	if c.Len() != 2 {
		t.Fatalf("%d entries, want bob and carol", c.Len())
	}
	// Other methods pass straight through, errors included.
	if _, err := c.User(context.Background(), "nobody"); !errors.Is(err, accounts.ErrNotFound) {
		t.Fatalf("User: %v", err)
	}
	if _, _, err := c.CreateUser(context.Background(), "bob", "x", []byte("h")); !errors.Is(err, accounts.ErrExists) {
		t.Fatalf("CreateUser of a taken name: %v", err)
	}
	if c.Unwrap() != accounts.Store(st) {
		t.Fatal("Unwrap is not the wrapped store")
	}
}

// noKeys is a store without accounts.KeyStore.
type noKeys struct{ accounts.Store }

func TestKeyStoreMissing(t *testing.T) {
	c := newCache(t, noKeys{authtest.New()}, Options{})
	if _, err := c.KeyStatus(context.Background(), ident.Device{User: "a", ID: 1}); err == nil || !strings.Contains(err.Error(), "keeps no prekeys") {
		t.Fatalf("KeyStatus over a store without keys: %v", err)
	}
	if _, err := c.TakeBundles(context.Background(), "a", 0); err == nil {
		t.Fatal("TakeBundles over a store without keys succeeded")
	}
}

func TestBadOptions(t *testing.T) {
	for _, o := range []Options{{Size: -1}, {TTL: -time.Second}} {
		if _, err := New(authtest.New(), o); err == nil {
			t.Errorf("New with %+v succeeded", o)
		}
	}
	if _, err := New(nil, Options{}); err == nil {
		t.Error("New(nil) succeeded")
	}
	reg := prometheus.NewRegistry()
	newCache(t, authtest.New(), Options{Registry: reg})
	if _, err := New(authtest.New(), Options{Registry: reg}); err == nil {
		t.Error("a second cache on one registry succeeded")
	}
}

// The account store contract holds through the cache, over SQLite.
func TestConformanceSQLite(t *testing.T) {
	accountstest.Run(t, func(t *testing.T) accounts.Store {
		st, err := sqlite.Open(filepath.Join(t.TempDir(), "accounts.db"), sqlite.Options{})
		if err != nil {
			t.Fatal(err)
		}
		return newCache(t, st, Options{})
	})
}

// And over the in-memory store, with a cache of one user, so that most
// look-ups push another out.
func TestConformanceTiny(t *testing.T) {
	accountstest.Run(t, func(t *testing.T) accounts.Store {
		return newCache(t, authtest.New(), Options{Size: 1})
	})
}
