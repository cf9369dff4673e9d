package pebble

import (
	"hash/maphash"
	"sync"
	"sync/atomic"
)

// DefaultLiveEntries is Options.LiveEntries' default: 5.0 MiB when full,
// 80 bytes an entry (BenchmarkLiveSetMemory).
const DefaultLiveEntries = 64 << 10

// liveSet remembers entries this process appended and has not deleted
// since, as far as it has room, so that a delete that needs nothing of
// an entry but to know it is there (mailbox.DeleteAppend.SeqsOnly: an ack
// whose envelopes the connection kept) does not read it. That read was
// the largest single cost of an ack: ≈ 7 % of the server's CPU with 1:1
// pairs, 8 % in a group fan-out, since a Pebble Get builds an iterator
// over every memtable and level even for an entry in the newest memtable.
//
// The invariant: an entry in the set is in the store. The committer adds
// an append's entries before it applies the append's batch (an apply that
// fails fails the store: nothing is served after it), and every deletion
// of an entry takes it out of the set, under its device's delete lock,
// before the deletion is written. An entry missing from the set (appended
// before the process started, or when the set was full, or taken out by a
// delete that then failed) is read, as before: the set only ever saves a
// read, it never answers "absent".
type liveSet struct {
	max    int64
	n      atomic.Int64
	seed   maphash.Seed
	shards [liveShards]liveShard
}

const liveShards = 32

type liveShard struct {
	mu sync.Mutex
	m  map[liveKey]struct{}
	_  [48]byte // a 64-byte cache line each (mutex 8, map 8)
}

// liveKey names an entry: its device's deviceID (as a string) and seq.
type liveKey struct {
	dev string
	seq uint64
}

// newLiveSet returns a set of at most max entries; nil (every method a
// no-op) if max is not positive.
func newLiveSet(max int) *liveSet {
	if max <= 0 {
		return nil
	}
	l := &liveSet{max: int64(max), seed: maphash.MakeSeed()}
	for i := range l.shards {
		l.shards[i].m = map[liveKey]struct{}{}
	}
	return l
}

func (l *liveSet) shard(dev string, seq uint64) *liveShard {
	h := maphash.String(l.seed, dev) ^ seq*0x9e3779b97f4a7c15
	return &l.shards[h%liveShards]
}

// add records that dev's entries first to last (inclusive) are in the
// store, while there is room.
func (l *liveSet) add(dev string, first, last uint64) {
	if l == nil {
		return
	}
	for seq := first; seq <= last; seq++ {
		if l.n.Add(1) > l.max {
			l.n.Add(-1)
			return
		}
		sh := l.shard(dev, seq)
		sh.mu.Lock()
		sh.m[liveKey{dev, seq}] = struct{}{}
		sh.mu.Unlock()
	}
}

// take forgets dev's entry seq, and reports whether it was in the set
// (so in the store). The caller holds dev's delete lock and is deleting
// the entry.
func (l *liveSet) take(dev string, seq uint64) bool {
	if l == nil {
		return false
	}
	sh := l.shard(dev, seq)
	k := liveKey{dev, seq}
	sh.mu.Lock()
	_, ok := sh.m[k]
	if ok {
		delete(sh.m, k)
	}
	sh.mu.Unlock()
	if ok {
		l.n.Add(-1)
	}
	return ok
}

// len returns the number of entries in the set.
func (l *liveSet) len() int {
	if l == nil {
		return 0
	}
	return int(l.n.Load())
}
