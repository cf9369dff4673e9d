// Package directorytest is the conformance suite every directory.Directory
// backend must pass.
package directorytest

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/courier-im/courier/internal/directory"
	"github.com/courier-im/courier/internal/ident"
)

// Run runs the suite. newDir returns an empty directory of its own (not
// shared with any other call) whose periodic sweep runs at least every
// 100ms; it should close the directory and remove its data in t.Cleanup.
// Subtests run in parallel.
func Run(t *testing.T, newDir func(t *testing.T) directory.Directory) {
	tests := []struct {
		name string
		f    func(t *testing.T, d directory.Directory)
	}{
		{"RegisterLookup", testRegisterLookup},
		{"Invalid", testInvalid},
		{"Supersede", testSupersede},
		{"CompareAndDelete", testCompareAndDelete},
		{"PresenceLastSeen", testPresenceLastSeen},
		{"TwoNodes", testTwoNodes},
		{"Expiry", testExpiry},
		{"Refresh", testRefresh},
		{"RefreshLost", testRefreshLost},
		{"RefreshMany", testRefreshMany},
		{"Events", testEvents},
		{"ExpiryEvents", testExpiryEvents},
		{"WatchClose", testWatchClose},
		{"Concurrency", testConcurrency},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tc.f(t, newDir(t))
		})
	}
}

const (
	long     = time.Minute      // a TTL that does not run out during a test
	deadline = 15 * time.Second // how long a condition may take to hold
)

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return c
}

func dev(user string, id uint32) ident.Device { return ident.Device{User: user, ID: id} }

func sess(d ident.Device, node, id string) directory.Session {
	return directory.Session{Device: d, Node: node, ID: id}
}

func mustRegister(t *testing.T, d directory.Directory, s directory.Session, ttl time.Duration) (directory.Session, bool) {
	t.Helper()
	prev, replaced, err := d.Register(ctx(t), s, ttl)
	if err != nil {
		t.Fatalf("Register(%+v): %v", s, err)
	}
	return prev, replaced
}

func mustUnregister(t *testing.T, d directory.Directory, dv ident.Device, session string) bool {
	t.Helper()
	off, err := d.Unregister(ctx(t), dv, session)
	if err != nil {
		t.Fatalf("Unregister(%v, %s): %v", dv, session, err)
	}
	return off
}

func lookup(t *testing.T, d directory.Directory, dv ident.Device) (directory.Session, bool) {
	t.Helper()
	s, ok, err := d.Lookup(ctx(t), dv)
	if err != nil {
		t.Fatalf("Lookup(%v): %v", dv, err)
	}
	return s, ok
}

func presence(t *testing.T, d directory.Directory, user string) directory.Presence {
	t.Helper()
	p, err := d.Presence(ctx(t), user)
	if err != nil {
		t.Fatalf("Presence(%s): %v", user, err)
	}
	return p
}

// waitFor polls cond until it holds, failing the test after deadline.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	end := time.Now().Add(deadline)
	for !cond() {
		if time.Now().After(end) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// next returns the next event, failing after deadline.
func next(t *testing.T, ch <-chan directory.PresenceEvent) directory.PresenceEvent {
	t.Helper()
	select {
	case ev, ok := <-ch:
		if !ok {
			t.Fatal("event channel closed")
		}
		return ev
	case <-time.After(deadline):
		t.Fatal("timed out waiting for a presence event")
	}
	panic("unreachable")
}

func testRegisterLookup(t *testing.T, d directory.Directory) {
	a1, a2 := dev("alice", 1), dev("alice", 2)
	if _, ok := lookup(t, d, a1); ok {
		t.Fatal("Lookup found a device never registered")
	}
	if _, replaced := mustRegister(t, d, sess(a1, "n1", "s1"), long); replaced {
		t.Fatal("first Register reported a previous registration")
	}
	mustRegister(t, d, sess(a2, "n2", "s2"), long)
	mustRegister(t, d, sess(dev("bob", 1), "n1", "s3"), long)
	got, ok := lookup(t, d, a1)
	if !ok || got != sess(a1, "n1", "s1") {
		t.Fatalf("Lookup = %+v, %v; want n1/s1", got, ok)
	}
	all, err := d.LookupUser(ctx(t), "alice")
	if err != nil {
		t.Fatal(err)
	}
	want := []directory.Session{sess(a1, "n1", "s1"), sess(a2, "n2", "s2")}
	if fmt.Sprint(all) != fmt.Sprint(want) {
		t.Fatalf("LookupUser = %+v, want %+v", all, want)
	}
	if all, err := d.LookupUser(ctx(t), "carol"); err != nil || len(all) != 0 {
		t.Fatalf("LookupUser(unknown) = %v, %v", all, err)
	}
	// The same session registering again renews itself.
	prev, replaced := mustRegister(t, d, sess(a1, "n1", "s1"), long)
	if !replaced || prev != sess(a1, "n1", "s1") {
		t.Fatalf("re-Register returned %+v, %v", prev, replaced)
	}
}

func testInvalid(t *testing.T, d directory.Directory) {
	for _, c := range []struct {
		s   directory.Session
		ttl time.Duration
	}{
		{sess(dev("Alice", 1), "n1", "s"), long},
		{sess(dev("alice", 0), "n1", "s"), long},
		{sess(dev("alice", 1), "", "s"), long},
		{sess(dev("alice", 1), "n|1", "s"), long},
		{sess(dev("alice", 1), "n1", ""), long},
		{sess(dev("alice", 1), "n1", "s"), 0},
	} {
		if _, _, err := d.Register(ctx(t), c.s, c.ttl); !errors.Is(err, directory.ErrInvalid) {
			t.Errorf("Register(%+v, %v) = %v, want ErrInvalid", c.s, c.ttl, err)
		}
	}
	if presence(t, d, "alice").Online {
		t.Fatal("a refused Register made the user online")
	}
	bad := dev("a|b", 1)
	if _, _, err := d.Lookup(ctx(t), bad); !errors.Is(err, directory.ErrInvalid) {
		t.Errorf("Lookup(%v) = %v, want ErrInvalid", bad, err)
	}
	if _, err := d.Unregister(ctx(t), bad, "s"); !errors.Is(err, directory.ErrInvalid) {
		t.Errorf("Unregister(%v) = %v, want ErrInvalid", bad, err)
	}
	if _, err := d.LookupUser(ctx(t), "a|b"); !errors.Is(err, directory.ErrInvalid) {
		t.Errorf("LookupUser(a|b) = %v, want ErrInvalid", err)
	}
	if _, err := d.Presence(ctx(t), ""); !errors.Is(err, directory.ErrInvalid) {
		t.Errorf("Presence(\"\") = %v, want ErrInvalid", err)
	}
	if _, err := d.Refresh(ctx(t), "n1", []directory.DeviceSession{{Device: bad, Session: "s"}}, long); !errors.Is(err, directory.ErrInvalid) {
		t.Errorf("Refresh(%v) = %v, want ErrInvalid", bad, err)
	}
}

func testSupersede(t *testing.T, d directory.Directory) {
	a1 := dev("alice", 1)
	mustRegister(t, d, sess(a1, "n1", "s1"), long)
	prev, replaced := mustRegister(t, d, sess(a1, "n2", "s2"), long)
	if !replaced || prev != sess(a1, "n1", "s1") {
		t.Fatalf("second Register returned %+v, %v; want the first", prev, replaced)
	}
	if got, _ := lookup(t, d, a1); got != sess(a1, "n2", "s2") {
		t.Fatalf("Lookup = %+v, want the second registration", got)
	}
}

func testCompareAndDelete(t *testing.T, d directory.Directory) {
	a1 := dev("alice", 1)
	mustRegister(t, d, sess(a1, "n1", "s1"), long)
	mustRegister(t, d, sess(a1, "n2", "s2"), long)
	if mustUnregister(t, d, a1, "s1") {
		t.Fatal("stale Unregister reported the user offline")
	}
	if got, ok := lookup(t, d, a1); !ok || got.ID != "s2" {
		t.Fatalf("stale Unregister removed the newer registration: %+v, %v", got, ok)
	}
	if !presence(t, d, "alice").Online {
		t.Fatal("stale Unregister took the user offline")
	}
	if !mustUnregister(t, d, a1, "s2") {
		t.Fatal("Unregister of the last device did not report offline")
	}
	if _, ok := lookup(t, d, a1); ok {
		t.Fatal("Lookup found an unregistered device")
	}
	if mustUnregister(t, d, a1, "s2") {
		t.Fatal("second Unregister reported offline again")
	}
}

func testPresenceLastSeen(t *testing.T, d directory.Directory) {
	if p := presence(t, d, "alice"); p.Online || !p.LastSeen.IsZero() {
		t.Fatalf("Presence of an unknown user = %+v", p)
	}
	a1 := dev("alice", 1)
	mustRegister(t, d, sess(a1, "n1", "s1"), long)
	if !presence(t, d, "alice").Online {
		t.Fatal("registered user is not online")
	}
	mustUnregister(t, d, a1, "s1")
	p1 := presence(t, d, "alice")
	if p1.Online || p1.LastSeen.IsZero() {
		t.Fatalf("after Unregister Presence = %+v, want offline with last seen", p1)
	}
	mustRegister(t, d, sess(a1, "n1", "s2"), long)
	if p := presence(t, d, "alice"); !p.Online || !p.LastSeen.Equal(p1.LastSeen) {
		t.Fatalf("online again: Presence = %+v, want online with the old last seen %v", p, p1.LastSeen)
	}
	mustUnregister(t, d, a1, "s2")
	if p2 := presence(t, d, "alice"); p2.Online || p2.LastSeen.Before(p1.LastSeen) {
		t.Fatalf("second offline: Presence = %+v, last seen went back from %v", p2, p1.LastSeen)
	}
	if presence(t, d, "bob").Online {
		t.Fatal("another user is online")
	}
}

func testTwoNodes(t *testing.T, d directory.Directory) {
	a1, a2 := dev("alice", 1), dev("alice", 2)
	mustRegister(t, d, sess(a1, "n1", "s1"), long)
	mustRegister(t, d, sess(a2, "n2", "s2"), long)
	if mustUnregister(t, d, a1, "s1") {
		t.Fatal("user went offline with a device left on the other node")
	}
	if p := presence(t, d, "alice"); !p.Online {
		t.Fatal("user offline with a device left on the other node")
	}
	if !mustUnregister(t, d, a2, "s2") {
		t.Fatal("last Unregister did not report offline")
	}
	if p := presence(t, d, "alice"); p.Online || p.LastSeen.IsZero() {
		t.Fatalf("after both left Presence = %+v", p)
	}
}

func testExpiry(t *testing.T, d directory.Directory) {
	// n1 dies (stops refreshing); n2 keeps bob alive.
	a1, a2, b1 := dev("alice", 1), dev("alice", 2), dev("bob", 1)
	mustRegister(t, d, sess(a1, "n1", "s1"), 300*time.Millisecond)
	mustRegister(t, d, sess(a2, "n1", "s2"), 300*time.Millisecond)
	mustRegister(t, d, sess(b1, "n2", "s3"), long)
	waitFor(t, "alice to go offline", func() bool { return !presence(t, d, "alice").Online })
	if p := presence(t, d, "alice"); p.LastSeen.IsZero() {
		t.Fatal("expiry did not set last seen")
	}
	if _, ok := lookup(t, d, a1); ok {
		t.Fatal("Lookup found an expired registration")
	}
	if all, err := d.LookupUser(ctx(t), "alice"); err != nil || len(all) != 0 {
		t.Fatalf("LookupUser after expiry = %v, %v", all, err)
	}
	if !presence(t, d, "bob").Online {
		t.Fatal("bob, on a live node, went offline")
	}
	// The expired session's late Unregister is harmless and a new
	// registration does not see the expired one.
	if mustUnregister(t, d, a1, "s1") {
		t.Fatal("Unregister of an expired session reported offline again")
	}
	if _, replaced := mustRegister(t, d, sess(a1, "n3", "s4"), long); replaced {
		t.Fatal("Register returned an expired registration")
	}
}

func testRefresh(t *testing.T, d directory.Directory) {
	const ttl = 2 * time.Second
	a1, b1 := dev("alice", 1), dev("bob", 1)
	mustRegister(t, d, sess(a1, "n1", "s1"), ttl)
	mustRegister(t, d, sess(b1, "n2", "s2"), ttl)
	// Refresh n1 until n2's registration has expired, which takes more
	// than ttl.
	waitFor(t, "bob to expire", func() bool {
		lost, err := d.Refresh(ctx(t), "n1", []directory.DeviceSession{{Device: a1, Session: "s1"}}, ttl)
		if err != nil || len(lost) != 0 {
			t.Fatalf("Refresh = %v, %v", lost, err)
		}
		_, ok := lookup(t, d, b1)
		return !ok
	})
	if got, ok := lookup(t, d, a1); !ok || got.ID != "s1" {
		t.Fatalf("refreshed registration is gone: %+v, %v", got, ok)
	}
	if !presence(t, d, "alice").Online {
		t.Fatal("refreshed user went offline")
	}
}

func testRefreshLost(t *testing.T, d directory.Directory) {
	a1, a2, a3, b1 := dev("alice", 1), dev("alice", 2), dev("alice", 3), dev("bob", 1)
	mustRegister(t, d, sess(a1, "n1", "s1"), long)
	mustRegister(t, d, sess(a2, "n1", "s2"), long)
	mustRegister(t, d, sess(a2, "n2", "s2b"), long) // a2 moved to n2
	mustRegister(t, d, sess(b1, "n2", "s4"), long)  // held by n2
	in := []directory.DeviceSession{
		{Device: a1, Session: "s1"},
		{Device: a2, Session: "s2"},
		{Device: a3, Session: "s3"}, // never registered
		{Device: b1, Session: "s4"}, // another node's
	}
	lost, err := d.Refresh(ctx(t), "n1", in, long)
	if err != nil {
		t.Fatal(err)
	}
	if want := in[1:]; fmt.Sprint(lost) != fmt.Sprint(want) {
		t.Fatalf("Refresh lost %v, want %v", lost, want)
	}
	if _, ok := lookup(t, d, a3); ok {
		t.Fatal("Refresh created a registration")
	}
	if got, _ := lookup(t, d, b1); got != sess(b1, "n2", "s4") {
		t.Fatalf("Refresh by another node changed %+v", got)
	}
	if lost, err := d.Refresh(ctx(t), "n1", nil, long); err != nil || len(lost) != 0 {
		t.Fatalf("empty Refresh = %v, %v", lost, err)
	}
}

func testRefreshMany(t *testing.T, d directory.Directory) {
	// More sessions than one batch of the Redis backend.
	var in []directory.DeviceSession
	for u := range 30 {
		for id := range 50 {
			dv := dev(fmt.Sprintf("user%d", u), uint32(id+1))
			s := fmt.Sprintf("s-%v", dv)
			mustRegister(t, d, sess(dv, "n1", s), long)
			in = append(in, directory.DeviceSession{Device: dv, Session: s})
		}
	}
	gone := []int{3, 1000, 1001, 1499}
	for _, i := range gone {
		mustUnregister(t, d, in[i].Device, in[i].Session)
	}
	lost, err := d.Refresh(ctx(t), "n1", in, long)
	if err != nil {
		t.Fatal(err)
	}
	var want []directory.DeviceSession
	for _, i := range gone {
		want = append(want, in[i])
	}
	if fmt.Sprint(lost) != fmt.Sprint(want) {
		t.Fatalf("Refresh lost %v, want %v", lost, want)
	}
}

func watch(t *testing.T, d directory.Directory) <-chan directory.PresenceEvent {
	t.Helper()
	c, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	ch, err := d.Watch(c)
	if err != nil {
		t.Fatalf("Watch: %v", err)
	}
	return ch
}

// eventsOf reads events until stop's online event, returning user's.
func eventsOf(t *testing.T, ch <-chan directory.PresenceEvent, user, stop string) []directory.PresenceEvent {
	t.Helper()
	var out []directory.PresenceEvent
	for {
		ev := next(t, ch)
		if ev.User == stop && ev.Online {
			return out
		}
		if ev.User == user {
			out = append(out, ev)
		}
	}
}

func testEvents(t *testing.T, d directory.Directory) {
	ch := watch(t, d)
	a1, a2 := dev("alice", 1), dev("alice", 2)
	mustRegister(t, d, sess(a1, "n1", "s1"), long)
	mustRegister(t, d, sess(a2, "n2", "s2"), long) // no transition
	mustRegister(t, d, sess(a1, "n3", "s3"), long) // no transition
	mustUnregister(t, d, a1, "s1")                 // stale
	mustUnregister(t, d, a1, "s3")                 // a2 left
	mustUnregister(t, d, a2, "s2")                 // offline
	mustRegister(t, d, sess(dev("zed", 1), "n1", "z"), long)
	evs := eventsOf(t, ch, "alice", "zed")
	if len(evs) != 2 || !evs[0].Online || evs[1].Online {
		t.Fatalf("events for alice = %+v, want online then offline", evs)
	}
	p := presence(t, d, "alice")
	if !evs[1].LastSeen.Equal(p.LastSeen) || p.LastSeen.IsZero() {
		t.Fatalf("offline event last seen %v, Presence says %v", evs[1].LastSeen, p.LastSeen)
	}
}

func testExpiryEvents(t *testing.T, d directory.Directory) {
	// Nobody reads alice's presence: the sweep must notice the expiry.
	ch := watch(t, d)
	mustRegister(t, d, sess(dev("alice", 1), "n1", "s1"), 200*time.Millisecond)
	if ev := next(t, ch); ev.User != "alice" || !ev.Online {
		t.Fatalf("first event %+v, want alice online", ev)
	}
	ev := next(t, ch)
	if ev.User != "alice" || ev.Online || ev.LastSeen.IsZero() {
		t.Fatalf("second event %+v, want alice offline with last seen", ev)
	}
}

func testWatchClose(t *testing.T, d directory.Directory) {
	c, cancel := context.WithCancel(context.Background())
	ch, err := d.Watch(c)
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	end := time.After(deadline)
	for {
		select {
		case _, ok := <-ch:
			if !ok {
				return
			}
		case <-end:
			t.Fatal("Watch channel not closed after its context ended")
		}
	}
}

func testConcurrency(t *testing.T, d directory.Directory) {
	users := []string{"alice", "bob", "carol"}
	const workers, rounds, devices = 12, 40, 3
	var (
		mu   sync.Mutex
		kept = map[string]bool{} // sessions whose owner did not unregister them
		wg   sync.WaitGroup
	)
	for w := range workers {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 7))
			node := fmt.Sprintf("n%d", w%4)
			for r := range rounds {
				dv := dev(users[rng.IntN(len(users))], uint32(1+rng.IntN(devices)))
				id := fmt.Sprintf("w%d-r%d", w, r)
				if _, _, err := d.Register(ctx(t), sess(dv, node, id), long); err != nil {
					t.Errorf("Register: %v", err)
					return
				}
				if rng.IntN(3) == 0 {
					if _, err := d.Refresh(ctx(t), node, []directory.DeviceSession{{Device: dv, Session: id}}, long); err != nil {
						t.Errorf("Refresh: %v", err)
						return
					}
				}
				if rng.IntN(4) == 0 {
					mu.Lock()
					kept[id] = true
					mu.Unlock()
					continue
				}
				if _, err := d.Unregister(ctx(t), dv, id); err != nil {
					t.Errorf("Unregister: %v", err)
					return
				}
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	for _, u := range users {
		all, err := d.LookupUser(ctx(t), u)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range all {
			if !kept[s.ID] {
				t.Errorf("%v is registered to %s, which its owner unregistered", s.Device, s.ID)
			}
			if got, ok := lookup(t, d, s.Device); !ok || got != s {
				t.Errorf("Lookup(%v) = %+v, %v; LookupUser says %+v", s.Device, got, ok, s)
			}
		}
		if p := presence(t, d, u); p.Online != (len(all) > 0) {
			t.Errorf("%s: Presence online %v with %d registrations", u, p.Online, len(all))
		}
		for i, s := range all {
			off := mustUnregister(t, d, s.Device, s.ID)
			if off != (i == len(all)-1) {
				t.Errorf("%s: Unregister %d of %d reported offline %v", u, i+1, len(all), off)
			}
		}
		if p := presence(t, d, u); p.Online {
			t.Errorf("%s: online after all devices left", u)
		}
	}
}
