// Package cache keeps users' device lists in memory in front of an account
// store, so that the look-ups every send and receipt makes (the addressed
// set must be exactly the recipient's and the sender's devices) cost a map
// read instead of a database round trip.
//
// A Store wraps an accounts.Store: it embeds it, so every method but
// Devices (and the changes below) passes straight through, including any
// method added to the interface later. Devices is served from a bounded
// LRU of users (DefaultSize by default). An entry is dropped
//
//   - when a device list changes through this Store (CreateUser, AddDevice,
//     RemoveDevice), before the call returns;
//   - when Invalidate names its user: in a cluster, every node broadcasts
//     its changes and every node invalidates what it hears (package
//     cluster, DeviceBus), since the node that changes a list is rarely
//     the one that sends;
//   - when Flush is called (the broadcasts may have been missed: a NATS
//     reconnection);
//   - after the TTL (DefaultTTL), which bounds how long a missed
//     broadcast, or a change made behind the Store's back, can go unseen.
//
// Negative results (accounts.ErrNotFound) and errors are never cached: a
// user created on another node is found at once.
//
// A look-up that misses reads the store and inserts what it read only if
// no invalidation of its shard happened meanwhile (a generation counter per
// shard), so a list read before a change can never be put back after the
// change's invalidation.
package cache

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/ident"
)

// Defaults.
const (
	// DefaultSize is how many users' device lists a Store holds: about
	// 240 bytes each with two devices (BenchmarkEntryMemory), some 24 MB.
	DefaultSize = 100_000
	// DefaultTTL is how long a device list is served from memory after
	// it was read.
	DefaultTTL = 30 * time.Second
)

// maxShards spreads the users over locks (and generation counters) so that
// concurrent look-ups rarely wait on each other.
const maxShards = 64

// Options configures a Store. The zero value means the defaults.
type Options struct {
	// Size is the most users whose device lists are held; the least
	// recently used is dropped first. Zero means DefaultSize.
	Size int
	// TTL is how long a device list read from the store is served from
	// memory. Zero means DefaultTTL.
	TTL time.Duration
	// OnChange, if set, is called with the user after every change of a
	// device list made through the Store (AddDevice, RemoveDevice), once
	// the store has it; a cluster broadcasts it to the other nodes.
	OnChange func(user string)
	// Registry, if set, gets the cache's metrics.
	Registry prometheus.Registerer

	now func() time.Time // for tests; default time.Now
}

// Store is an accounts.Store whose device lists are cached. It is safe for
// concurrent use.
type Store struct {
	accounts.Store

	keys     accounts.KeyStore // nil if the wrapped store keeps no keys
	ttl      time.Duration
	onChange func(string)
	now      func() time.Time
	epoch    time.Time // expiry times are durations since epoch
	seed     maphash.Seed
	shards   []shard // a power of two of them

	hits, misses, evictions prometheus.Counter
	invalidations           *prometheus.CounterVec
}

var (
	_ accounts.Store    = (*Store)(nil)
	_ accounts.KeyStore = (*Store)(nil)
)

// SetLastSeenBatch implements accounts.LastSeenBatcher with the wrapped
// store's batch, if it has one (last-seen times are not cached).
func (s *Store) SetLastSeenBatch(ctx context.Context, seen map[string]time.Time) error {
	return accounts.SetLastSeenBatch(ctx, s.Store, seen)
}

// New wraps st. It fails if the options are out of range or the metrics
// cannot be registered.
func New(st accounts.Store, opts Options) (*Store, error) {
	if st == nil {
		return nil, errors.New("accounts/cache: no store to wrap")
	}
	if opts.Size == 0 {
		opts.Size = DefaultSize
	}
	if opts.TTL == 0 {
		opts.TTL = DefaultTTL
	}
	if opts.Size < 1 {
		return nil, fmt.Errorf("accounts/cache: size %d: want at least 1 user", opts.Size)
	}
	if opts.TTL < 0 {
		return nil, fmt.Errorf("accounts/cache: ttl %v: want a positive duration", opts.TTL)
	}
	if opts.now == nil {
		opts.now = time.Now
	}
	c := &Store{
		Store: st, ttl: opts.TTL, onChange: opts.OnChange, now: opts.now, epoch: opts.now(), seed: maphash.MakeSeed(),
		hits: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "courier_device_cache_hits_total", Help: "Device-list look-ups served from memory.",
		}),
		misses: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "courier_device_cache_misses_total", Help: "Device-list look-ups that read the account store (absent, expired or unknown users).",
		}),
		evictions: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "courier_device_cache_evictions_total", Help: "Device lists dropped to keep the cache within its size.",
		}),
		invalidations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "courier_device_cache_invalidations_total",
			Help: "Device-list invalidations, by reason: change (made on this node), remote (heard from another node), flush (whole cache).",
		}, []string{"reason"}),
	}
	c.keys, _ = st.(accounts.KeyStore)
	// Spread the capacity over the shards, at least one user each, so
	// that the cache holds Size users at most.
	n := maxShards
	for n > opts.Size {
		n /= 2
	}
	c.shards = make([]shard, n)
	for i := range c.shards {
		per := opts.Size / n
		if i < opts.Size%n {
			per++
		}
		c.shards[i].init(per)
	}
	if opts.Registry != nil {
		entries := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "courier_device_cache_entries", Help: "Users whose device lists are held in memory.",
		}, func() float64 { return float64(c.Len()) })
		for _, col := range []prometheus.Collector{c.hits, c.misses, c.evictions, c.invalidations, entries} {
			if err := opts.Registry.Register(col); err != nil {
				return nil, fmt.Errorf("accounts/cache: register metrics: %w", err)
			}
		}
	}
	// Create the label values so that they show as 0 before the first.
	for _, r := range []string{reasonChange, reasonRemote, reasonFlush} {
		c.invalidations.WithLabelValues(r)
	}
	return c, nil
}

const (
	reasonChange = "change"
	reasonRemote = "remote"
	reasonFlush  = "flush"
)

// Unwrap returns the wrapped store.
func (c *Store) Unwrap() accounts.Store { return c.Store }

// Devices implements accounts.Store: from memory when the user's list is
// held and fresh, otherwise from the store. The slice returned is the
// caller's own.
func (c *Store) Devices(ctx context.Context, user string) ([]accounts.Device, error) {
	return c.devices(ctx, user, false)
}

// DevicesView implements accounts.DeviceViewer: Devices, without copying
// a list held in memory. The caller must not modify the slice.
func (c *Store) DevicesView(ctx context.Context, user string) ([]accounts.Device, error) {
	return c.devices(ctx, user, true)
}

// devices returns user's devices; shared: a list held is returned itself,
// not a copy.
func (c *Store) devices(ctx context.Context, user string, shared bool) ([]accounts.Device, error) {
	sh := c.shard(user)
	now := c.now().Sub(c.epoch)
	sh.mu.Lock()
	if e := sh.m[user]; e != nil {
		if now < e.expires {
			sh.touch(e)
			devs := e.devs // never modified once stored
			sh.mu.Unlock()
			c.hits.Inc()
			if shared {
				return devs, nil
			}
			return slices.Clone(devs), nil
		}
		sh.remove(e)
	}
	gen := sh.gen
	sh.mu.Unlock()
	c.misses.Inc()

	devs, err := c.Store.Devices(ctx, user)
	if err != nil {
		return devs, err
	}
	held := slices.Clone(devs) // the caller may modify devs
	sh.mu.Lock()
	// An invalidation since the read began may concern this user: what
	// was read may predate the change, so it is not kept.
	if sh.gen == gen {
		if sh.put(user, held, now+c.ttl) {
			c.evictions.Inc()
		}
	}
	sh.mu.Unlock()
	return devs, nil
}

// CreateUser implements accounts.Store. Unknown users are not cached, so a
// new user needs no broadcast; the local entry is dropped all the same.
func (c *Store) CreateUser(ctx context.Context, name, deviceName string, credHash []byte) (accounts.User, accounts.Device, error) {
	u, d, err := c.Store.CreateUser(ctx, name, deviceName, credHash)
	c.invalidate(name, reasonChange)
	return u, d, err
}

// AddDevice implements accounts.Store and invalidates the user's list, here
// and (OnChange) elsewhere.
func (c *Store) AddDevice(ctx context.Context, user, deviceName string, credHash []byte) (accounts.Device, error) {
	d, err := c.Store.AddDevice(ctx, user, deviceName, credHash)
	c.changed(user, err)
	return d, err
}

// RemoveDevice implements accounts.Store and invalidates the user's list,
// here and (OnChange) elsewhere.
func (c *Store) RemoveDevice(ctx context.Context, dev ident.Device) error {
	err := c.Store.RemoveDevice(ctx, dev)
	c.changed(dev.User, err)
	return err
}

// changed invalidates user's list after a change made through the Store.
// A failed call may still have committed (a timeout after the commit), so
// only the failures that say nothing changed skip the broadcast.
func (c *Store) changed(user string, err error) {
	c.invalidate(user, reasonChange)
	if c.onChange != nil && !errors.Is(err, accounts.ErrNotFound) && !errors.Is(err, accounts.ErrExists) {
		c.onChange(user)
	}
}

// Invalidate drops user's device list, and makes any look-up of it under
// way keep what it reads to itself. A cluster calls it for the changes
// other nodes broadcast.
func (c *Store) Invalidate(user string) { c.invalidate(user, reasonRemote) }

func (c *Store) invalidate(user, reason string) {
	sh := c.shard(user)
	sh.mu.Lock()
	sh.gen++
	if e := sh.m[user]; e != nil {
		sh.remove(e)
	}
	sh.mu.Unlock()
	c.invalidations.WithLabelValues(reason).Inc()
}

// Flush drops every device list held, as if each user were invalidated.
func (c *Store) Flush() {
	for i := range c.shards {
		sh := &c.shards[i]
		sh.mu.Lock()
		sh.gen++
		sh.init(sh.cap)
		sh.mu.Unlock()
	}
	c.invalidations.WithLabelValues(reasonFlush).Inc()
}

// Len is the number of users whose device lists are held (expired ones
// included until they are looked up or pushed out).
func (c *Store) Len() int {
	n := 0
	for i := range c.shards {
		sh := &c.shards[i]
		sh.mu.Lock()
		n += len(sh.m)
		sh.mu.Unlock()
	}
	return n
}

func (c *Store) shard(user string) *shard {
	return &c.shards[maphash.String(c.seed, user)&uint64(len(c.shards)-1)]
}

// errNoKeys is what the KeyStore methods return over a store that keeps no
// keys.
func (c *Store) errNoKeys() error {
	return fmt.Errorf("accounts/cache: the wrapped store %T keeps no prekeys (accounts.KeyStore)", c.Store)
}

// PutKeys implements accounts.KeyStore by passing the call through.
func (c *Store) PutKeys(ctx context.Context, dev ident.Device, up accounts.KeyUpload) (int, error) {
	if c.keys == nil {
		return 0, c.errNoKeys()
	}
	return c.keys.PutKeys(ctx, dev, up)
}

// KeyStatus implements accounts.KeyStore by passing the call through.
func (c *Store) KeyStatus(ctx context.Context, dev ident.Device) (accounts.KeyStatus, error) {
	if c.keys == nil {
		return accounts.KeyStatus{}, c.errNoKeys()
	}
	return c.keys.KeyStatus(ctx, dev)
}

// TakeBundles implements accounts.KeyStore by passing the call through.
func (c *Store) TakeBundles(ctx context.Context, user string, device uint32) ([]accounts.Bundle, error) {
	if c.keys == nil {
		return nil, c.errNoKeys()
	}
	return c.keys.TakeBundles(ctx, user, device)
}

// IdentityKeys implements accounts.KeyStore by passing the call through.
func (c *Store) IdentityKeys(ctx context.Context, user string) (map[uint32][]byte, error) {
	if c.keys == nil {
		return nil, c.errNoKeys()
	}
	return c.keys.IdentityKeys(ctx, user)
}

// shard is one lock's share of the cache: a map and an LRU list (most
// recently used first), and the generation that every invalidation of one
// of its users, or a flush, increments.
type shard struct {
	mu   sync.Mutex
	gen  uint64
	cap  int
	m    map[string]*entry
	root entry // sentinel: root.next is the most recently used
}

type entry struct {
	user       string
	devs       []accounts.Device
	expires    time.Duration // since Store.epoch
	prev, next *entry
}

func (sh *shard) init(capacity int) {
	sh.cap = capacity
	sh.m = make(map[string]*entry)
	sh.root.prev, sh.root.next = &sh.root, &sh.root
}

func (sh *shard) unlink(e *entry) {
	e.prev.next, e.next.prev = e.next, e.prev
	e.prev, e.next = nil, nil
}

func (sh *shard) pushFront(e *entry) {
	e.prev, e.next = &sh.root, sh.root.next
	e.prev.next, e.next.prev = e, e
}

func (sh *shard) touch(e *entry) {
	if sh.root.next != e {
		sh.unlink(e)
		sh.pushFront(e)
	}
}

func (sh *shard) remove(e *entry) {
	sh.unlink(e)
	delete(sh.m, e.user)
}

// put holds devs for user, replacing what was held, and reports whether the
// least recently used entry was dropped to make room.
func (sh *shard) put(user string, devs []accounts.Device, expires time.Duration) (evicted bool) {
	if e := sh.m[user]; e != nil {
		e.devs, e.expires = devs, expires
		sh.touch(e)
		return false
	}
	if len(sh.m) >= sh.cap {
		sh.remove(sh.root.prev)
		evicted = true
	}
	e := &entry{user: user, devs: devs, expires: expires}
	sh.m[user] = e
	sh.pushFront(e)
	return evicted
}
