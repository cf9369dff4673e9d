package cache

import (
	"context"
	"slices"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/courier-im/courier/internal/accounts"
)

// DefaultGroups is how many groups a Groups cache holds: at most 1,024
// members of about 40 bytes each (name and flag), some 40 KB per large
// group, so 40 MB if every one held were that large.
const DefaultGroups = 1024

// Groups is a GroupStore whose groups are kept in memory and checked,
// on every look-up, against the store's version of the group
// (accounts.GroupVersioner): every change of members or admins moves the
// version, so a group held at the version the store reads is the group as
// it is. A message to a group reads one row instead of one per member (a
// group of 1,024 members: 1.7 ms of SQLite per send), and no change is
// ever served late, wherever it was made: another node of a cluster, or
// another process on the same SQLite file. Everything but Group passes
// straight through to the wrapped store. Safe for concurrent use.
type Groups struct {
	accounts.GroupStore
	versions accounts.GroupVersioner
	max      int

	mu sync.Mutex
	m  map[string]accounts.Group

	hits, misses prometheus.Counter
}

// NewGroups returns gs behind a cache of at most size groups (0:
// DefaultGroups), or gs itself if it cannot read a version alone or size
// is negative. reg, if set, gets the cache's hit and miss counters.
func NewGroups(gs accounts.GroupStore, size int, reg prometheus.Registerer) accounts.GroupStore {
	v, ok := gs.(accounts.GroupVersioner)
	if !ok || size < 0 {
		return gs
	}
	if size == 0 {
		size = DefaultGroups
	}
	c := &Groups{GroupStore: gs, versions: v, max: size, m: make(map[string]accounts.Group),
		hits: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "courier_group_cache_hits_total", Help: "Group look-ups served from memory (the version read matched).",
		}),
		misses: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "courier_group_cache_misses_total", Help: "Group look-ups that read the members from the store (not held, or the version moved).",
		}),
	}
	if reg != nil {
		reg.MustRegister(c.hits, c.misses)
	}
	return c
}

// Group implements accounts.GroupStore. The members it returns are the
// caller's own.
func (c *Groups) Group(ctx context.Context, id string) (accounts.Group, error) {
	v, err := c.versions.GroupVersion(ctx, id)
	if err != nil {
		return accounts.Group{}, err
	}
	c.mu.Lock()
	g, ok := c.m[id]
	c.mu.Unlock()
	if ok && g.Version == v {
		c.hits.Inc()
		g.Members = slices.Clone(g.Members)
		return g, nil
	}
	c.misses.Inc()
	// A newer version than v (changed since) is as good: it is one
	// membership, read in one statement.
	g, err = c.GroupStore.Group(ctx, id)
	if err != nil {
		return g, err
	}
	held := g
	held.Members = slices.Clone(g.Members)
	c.mu.Lock()
	if old, ok := c.m[id]; !ok || old.Version < held.Version {
		if !ok && len(c.m) >= c.max {
			for k := range c.m { // an arbitrary one
				delete(c.m, k)
				break
			}
		}
		c.m[id] = held
	}
	c.mu.Unlock()
	return g, nil
}

var _ accounts.GroupStore = (*Groups)(nil)
