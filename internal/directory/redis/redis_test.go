package redis_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/courier-im/courier/internal/directory"
	"github.com/courier-im/courier/internal/directory/directorytest"
	dirredis "github.com/courier-im/courier/internal/directory/redis"
	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/testenv"
)

// client connects to the test Redis and returns a fresh random prefix
// whose keys are deleted when the test ends.
func client(t *testing.T) (*goredis.Client, string) {
	t.Helper()
	rdb := goredis.NewClient(&goredis.Options{Addr: testenv.RedisAddr(t)})
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	prefix := "courier-test:" + hex.EncodeToString(b[:]) + ":"
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		iter := rdb.Scan(ctx, 0, prefix+"*", 100).Iterator()
		for iter.Next(ctx) {
			if err := rdb.Del(ctx, iter.Val()).Err(); err != nil {
				t.Errorf("cleanup: %v", err)
			}
		}
		if err := iter.Err(); err != nil {
			t.Errorf("cleanup: %v", err)
		}
		rdb.Close()
	})
	return rdb, prefix
}

func newDir(t *testing.T, rdb *goredis.Client, prefix string) *dirredis.Directory {
	d := dirredis.New(rdb, dirredis.Options{Prefix: prefix, SweepEvery: 20 * time.Millisecond})
	t.Cleanup(func() { d.Close() })
	return d
}

func TestConformance(t *testing.T) {
	directorytest.Run(t, func(t *testing.T) directory.Directory {
		rdb, prefix := client(t)
		return newDir(t, rdb, prefix)
	})
}

// Two nodes, each with its own Directory and connection, share state and
// see each other's transitions.
func TestTwoInstances(t *testing.T) {
	rdb, prefix := client(t)
	d1 := newDir(t, rdb, prefix)
	rdb2 := goredis.NewClient(&goredis.Options{Addr: testenv.RedisAddr(t)})
	t.Cleanup(func() { rdb2.Close() })
	d2 := newDir(t, rdb2, prefix)

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ch, err := d2.Watch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	a1 := ident.Device{User: "alice", ID: 1}
	if _, _, err := d1.Register(ctx, directory.Session{Device: a1, Node: "n1", ID: "s1"}, time.Minute); err != nil {
		t.Fatal(err)
	}
	if s, ok, err := d2.Lookup(ctx, a1); err != nil || !ok || s.Node != "n1" {
		t.Fatalf("other instance's Lookup = %+v, %v, %v", s, ok, err)
	}
	prev, replaced, err := d2.Register(ctx, directory.Session{Device: a1, Node: "n2", ID: "s2"}, time.Minute)
	if err != nil || !replaced || prev.Node != "n1" || prev.ID != "s1" {
		t.Fatalf("Register on n2 = %+v, %v, %v", prev, replaced, err)
	}
	if off, err := d1.Unregister(ctx, a1, "s1"); err != nil || off {
		t.Fatalf("stale Unregister from n1 = %v, %v", off, err)
	}
	if off, err := d2.Unregister(ctx, a1, "s2"); err != nil || !off {
		t.Fatalf("Unregister from n2 = %v, %v", off, err)
	}
	for _, online := range []bool{true, false} {
		select {
		case ev := <-ch:
			if ev.User != "alice" || ev.Online != online {
				t.Fatalf("event %+v, want alice online=%v", ev, online)
			}
		case <-ctx.Done():
			t.Fatal("timed out waiting for an event")
		}
	}
}

// With no sweep running, reads still see expiry, and Sweep finds a dead
// node's users without anyone reading them.
func TestSweep(t *testing.T) {
	rdb, prefix := client(t)
	d := dirredis.New(rdb, dirredis.Options{Prefix: prefix, SweepEvery: -1, SweepBatch: 2})
	defer d.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ch, err := d.Watch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	users := []string{"u1", "u2", "u3", "u4", "u5"}
	for i, u := range users {
		s := directory.Session{Device: ident.Device{User: u, ID: 1}, Node: "dead", ID: "s" + u}
		if _, _, err := d.Register(ctx, s, time.Duration(100+i)*time.Millisecond); err != nil {
			t.Fatal(err)
		}
	}
	// Sweep until every user has gone offline (several batches of 2).
	offline := map[string]bool{}
	for len(offline) < len(users) {
		if _, err := d.Sweep(ctx); err != nil {
			t.Fatal(err)
		}
		for drained := false; !drained; {
			select {
			case ev := <-ch:
				if !ev.Online {
					if ev.LastSeen.IsZero() {
						t.Fatalf("offline event without last seen: %+v", ev)
					}
					offline[ev.User] = true
				}
			case <-time.After(50 * time.Millisecond):
				drained = true
			case <-ctx.Done():
				t.Fatalf("timed out; offline so far: %v", offline)
			}
		}
	}
	for _, u := range users {
		if p, err := d.Presence(ctx, u); err != nil || p.Online || p.LastSeen.IsZero() {
			t.Fatalf("Presence(%s) = %+v, %v", u, p, err)
		}
	}
	if n, err := d.Sweep(ctx); err != nil || n != 0 {
		t.Fatalf("Sweep after everything expired = %d, %v; want nothing left", n, err)
	}
}
