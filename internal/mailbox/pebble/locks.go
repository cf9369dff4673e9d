package pebble

import (
	"context"
	"hash/maphash"
	"slices"
	"sync"
)

// lockTable hands out named exclusive locks that a waiter can give up on
// (context cancelled, store failed), which sync.Mutex cannot do. Entries
// exist only while someone holds or waits for them, so the table stays as
// small as the number of devices being written at the moment.
type lockTable struct {
	seed   maphash.Seed
	shards [64]lockShard
}

type lockShard struct {
	mu sync.Mutex
	m  map[string]*lock
	// highs keeps the high-water seqs of devices whose append lock entry
	// was dropped (nobody held or waited for it), so that the next append
	// to a device that is written now and then, not continuously, does not
	// read its mark from Pebble: that Get costs several µs once the mark is
	// in an sstable. Only appends move a mark, each under its device's lock,
	// so a kept value is current until the lock entry is made again and
	// takes it back. At most maxKeptHighs per shard; past that an arbitrary
	// one is forgotten (and read again when needed).
	highs map[string]keptHigh
}

// maxKeptHighs bounds each shard's highs: 64 shards × 2,048 devices,
// ≈ 10 MB at most with 40-byte names.
const maxKeptHighs = 2048

type lock struct {
	name string
	// ch has capacity one: a goroutine holds the lock while its token is in
	// the channel. Blocked senders are served in FIFO order.
	ch   chan struct{}
	refs int // holders and waiters; guarded by the shard's mu

	// high caches the device's high-water seq while the entry exists, so
	// appends to a busy device do not re-read it. Only the holder of the
	// lock reads or writes it.
	high      uint64
	mark      uint64 // the device's stored high-water mark, ≥ high (see seqReserve)
	highKnown bool
}

// keptHigh is what the lock table keeps of a forgotten lock: its device's
// high-water seq and stored mark.
type keptHigh struct{ high, mark uint64 }

func newLockTable() *lockTable {
	t := &lockTable{seed: maphash.MakeSeed()}
	for i := range t.shards {
		t.shards[i].m = make(map[string]*lock)
		t.shards[i].highs = make(map[string]keptHigh)
	}
	return t
}

func (t *lockTable) shard(name string) *lockShard {
	return &t.shards[maphash.String(t.seed, name)%uint64(len(t.shards))]
}

func (t *lockTable) ref(name string) *lock {
	sh := t.shard(name)
	sh.mu.Lock()
	l := sh.m[name]
	if l == nil {
		if l, _ = lockPool.Get().(*lock); l == nil {
			l = &lock{ch: make(chan struct{}, 1)}
		}
		l.name = name
		if h, ok := sh.highs[name]; ok {
			l.high, l.mark, l.highKnown = h.high, h.mark, true
			delete(sh.highs, name)
		}
		sh.m[name] = l
	}
	l.refs++
	sh.mu.Unlock()
	return l
}

func (t *lockTable) unref(l *lock) {
	sh := t.shard(l.name)
	sh.mu.Lock()
	l.refs--
	free := l.refs == 0
	if free {
		delete(sh.m, l.name)
		if l.highKnown {
			if len(sh.highs) >= maxKeptHighs {
				for name := range sh.highs {
					delete(sh.highs, name)
					break
				}
			}
			sh.highs[l.name] = keptHigh{l.high, l.mark}
		}
	}
	sh.mu.Unlock()
	if free {
		// Nobody holds or waits for it, and its channel is empty (the last
		// holder took its token back before unref).
		*l = lock{ch: l.ch}
		lockPool.Put(l)
	}
}

// lockPool recycles lock entries (and their channels), which the table
// creates and drops for nearly every append.
var lockPool sync.Pool

// acquire takes the lock called name. It gives up when ctx is done (returning
// ctx's error) or when abort is closed (returning errAborted).
func (t *lockTable) acquire(ctx context.Context, name string, abort <-chan struct{}) (*lock, error) {
	l := t.ref(name)
	// A free lock is taken without the full select, which locks all three
	// channels: most acquisitions find their lock free.
	select {
	case l.ch <- struct{}{}:
		return l, nil
	default:
	}
	select {
	case l.ch <- struct{}{}:
		return l, nil
	case <-ctx.Done():
		t.unref(l)
		return nil, ctx.Err()
	case <-abort:
		t.unref(l)
		return nil, errAborted
	}
}

func (t *lockTable) release(l *lock) {
	<-l.ch
	t.unref(l)
}

// acquireAll takes every lock in names (in sorted order, once each). Taking locks in one global order is what keeps two batches that
// share devices from deadlocking. The locks are appended to held (which
// may be nil, or a caller's buffer to fill without allocating), sorted by
// name; names is left as it was.
func (t *lockTable) acquireAll(ctx context.Context, names []string, abort <-chan struct{}, held []*lock) ([]*lock, error) {
	if len(names) > 1 {
		names = slices.Clone(names)
		slices.Sort(names)
		names = slices.Compact(names)
	}
	held = held[:0]
	for _, n := range names {
		l, err := t.acquire(ctx, n, abort)
		if err != nil {
			t.releaseAll(held)
			return nil, err
		}
		held = append(held, l)
	}
	return held, nil
}

func (t *lockTable) releaseAll(held []*lock) {
	for _, l := range held {
		t.release(l)
	}
}

// Lock names. Idempotency keys sort before devices so that an append with a
// key takes the key's lock first and a duplicate waits there without
// holding any device. Deletes use their own per-device name: they touch
// only existing entries and appends only new ones, so the two never need to
// wait for each other.
const (
	lockKeyPrefix    = "\x00"
	lockAppendPrefix = "\x01"
	lockDeletePrefix = "\x02"
)
