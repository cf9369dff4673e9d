package cache

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/accounts/sqlite"
)

// countingGroups is a SQLite store that counts its full group reads.
type countingGroups struct {
	*sqlite.Store
	loads atomic.Int64
}

func (s *countingGroups) Group(ctx context.Context, id string) (accounts.Group, error) {
	s.loads.Add(1)
	return s.Store.Group(ctx, id)
}

func openGroups(t *testing.T) *countingGroups {
	t.Helper()
	st, err := sqlite.Open(filepath.Join(t.TempDir(), "accounts.db"), sqlite.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	for _, u := range []string{"alice", "bob", "carol", "dave"} {
		if _, _, err := st.CreateUser(t.Context(), u, "", []byte{1}); err != nil {
			t.Fatal(err)
		}
	}
	return &countingGroups{Store: st}
}

func memberNames(g accounts.Group) []string {
	var out []string
	for _, m := range g.Members {
		out = append(out, m.User)
	}
	return out
}

// A group is read in full once per version: a change made behind the
// cache's back (another node, another process) is seen by the next
// look-up, and a group that is gone is not found.
func TestGroupsFollowVersions(t *testing.T) {
	ctx := t.Context()
	st := openGroups(t)
	c := NewGroups(st, 0, nil)
	ch, err := st.CreateGroup(ctx, "alice", []string{"bob"})
	if err != nil {
		t.Fatal(err)
	}
	id := ch.Group.ID
	for range 3 {
		g, err := c.Group(ctx, id)
		if err != nil || g.Version != 1 || !slices.Equal(memberNames(g), []string{"alice", "bob"}) {
			t.Fatalf("Group = %+v, %v", g, err)
		}
		g.Members[0].User = "mallory" // the caller's own copy
	}
	if n := st.loads.Load(); n != 1 {
		t.Fatalf("%d full reads for three look-ups of one version, want 1", n)
	}
	// Changed on the store itself, not through the cache.
	if _, err := st.AddMembers(ctx, id, "alice", []string{"carol"}); err != nil {
		t.Fatal(err)
	}
	g, err := c.Group(ctx, id)
	if err != nil || g.Version != 2 || !slices.Equal(memberNames(g), []string{"alice", "bob", "carol"}) {
		t.Fatalf("after a change: %+v, %v", g, err)
	}
	if _, err := st.SetAdmin(ctx, id, "alice", "bob", true); err != nil {
		t.Fatal(err)
	}
	if g, err := c.Group(ctx, id); err != nil || g.Version != 3 || !g.Members[1].Admin {
		t.Fatalf("after an admin change: %+v, %v", g, err)
	}
	if n := st.loads.Load(); n != 3 {
		t.Fatalf("%d full reads for three versions, want 3", n)
	}
	if g := c.(*Groups); value(t, g.hits) != 2 || value(t, g.misses) != 3 {
		t.Fatalf("hits %v, misses %v; want 2 and 3", value(t, g.hits), value(t, g.misses))
	}
	for _, u := range []string{"bob", "carol", "alice"} {
		if _, err := st.RemoveMember(ctx, id, u, u); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.Group(ctx, id); !errors.Is(err, accounts.ErrNotFound) {
		t.Fatalf("a deleted group: %v, want ErrNotFound", err)
	}
	if _, err := c.Group(ctx, "no such group"); !errors.Is(err, accounts.ErrNotFound) {
		t.Fatalf("a malformed id: %v, want ErrNotFound", err)
	}
	// Changes through the cache pass to the store.
	ch, err = c.CreateGroup(ctx, "dave", []string{"alice"})
	if err != nil {
		t.Fatal(err)
	}
	if g, err := st.Store.Group(ctx, ch.Group.ID); err != nil || !slices.Equal(memberNames(g), []string{"dave", "alice"}) {
		t.Fatalf("created through the cache: %+v, %v", g, err)
	}
}

// The cache holds at most its size, and concurrent look-ups and changes
// never return a membership other than the store's at some version.
func TestGroupsBoundedAndConcurrent(t *testing.T) {
	ctx := t.Context()
	st := openGroups(t)
	c := NewGroups(st, 2, nil).(*Groups)
	var ids []string
	for range 3 {
		ch, err := st.CreateGroup(ctx, "alice", []string{"bob"})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, ch.Group.ID)
		if _, err := c.Group(ctx, ch.Group.ID); err != nil {
			t.Fatal(err)
		}
	}
	if n := len(c.m); n > 2 {
		t.Fatalf("cache holds %d groups, size 2", n)
	}
	// Members by version: v1 alice, bob; then carol and dave join one at a
	// time, so version v has 1+v members.
	id := ids[0]
	var wg sync.WaitGroup
	stop := make(chan struct{})
	var bad atomic.Value
	for range 4 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				g, err := c.Group(ctx, id)
				if err != nil {
					bad.Store(err.Error())
					return
				}
				if len(g.Members) != int(g.Version)+1 {
					bad.Store("a group whose members do not match its version")
					return
				}
			}
		})
	}
	for _, u := range []string{"carol", "dave"} {
		if _, err := st.AddMembers(ctx, id, "alice", []string{u}); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
	if v := bad.Load(); v != nil {
		t.Fatal(v)
	}
	if g, err := c.Group(ctx, id); err != nil || g.Version != 3 || len(g.Members) != 4 {
		t.Fatalf("at the end: %+v, %v", g, err)
	}
}

// A store that cannot read a version alone is not wrapped.
func TestGroupsNeedVersions(t *testing.T) {
	var gs accounts.GroupStore = struct{ accounts.GroupStore }{}
	if got := NewGroups(gs, 0, nil); got != gs {
		t.Fatalf("NewGroups wrapped a store without GroupVersion: %T", got)
	}
	st := openGroups(t)
	if got := NewGroups(st, -1, nil); got != accounts.GroupStore(st) {
		t.Fatalf("size -1 did not turn the cache off: %T", got)
	}
}

// BenchmarkGroup compares the look-up of a group of 1,024 members on
// SQLite with the same through the cache (a version read and a copy).
//
//	go test -run '^$' -bench BenchmarkGroup -benchmem ./internal/accounts/cache/
func BenchmarkGroup(b *testing.B) {
	ctx := context.Background()
	st, err := sqlite.Open(filepath.Join(b.TempDir(), "accounts.db"), sqlite.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	users := make([]string, 1024)
	for i := range users {
		users[i] = fmt.Sprintf("member%04d", i)
		if _, _, err := st.CreateUser(ctx, users[i], "", []byte{1}); err != nil {
			b.Fatal(err)
		}
	}
	ch, err := st.CreateGroup(ctx, users[0], users[1:])
	if err != nil {
		b.Fatal(err)
	}
	for _, s := range []struct {
		name  string
		store accounts.GroupStore
	}{{"sqlite", st}, {"cached", NewGroups(st, 0, nil)}} {
		b.Run(s.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				g, err := s.store.Group(ctx, ch.Group.ID)
				if err != nil || len(g.Members) != 1024 {
					b.Fatal(len(g.Members), err)
				}
			}
		})
	}
}
