package pebble

import (
	"hash/maphash"
	"slices"
	"sync"
)

// Pebble makes a synced batch visible to readers before its WAL sync
// completes (see the package documentation). A reader that delivered such
// an entry and then lost it in a crash would have shown the device a
// message that was never accepted; the sender's retry would then be
// stored again under a new server id, and the device would see it twice
// with nothing to tell the copies apart. So every append fences the seqs
// it is about to publish, before they can become visible, and lifts the
// fence once they are durable (or the store has failed): Read stops below
// the lowest fenced seq of the device.
//
// Appends to one device are fenced in seq order (under its append lock)
// and complete in commit order, so a device's fences form a short FIFO,
// most often of one; the map holds only devices with an append in flight.
type fenceTable struct {
	seed   maphash.Seed
	shards [32]fenceShard
}

type fenceShard struct {
	mu sync.Mutex
	m  map[string]fences // deviceID -> its appends not yet durable
}

// fences are the first seqs of a device's appends not yet durable: the
// oldest, and those behind it. The usual one fence is held without a
// slice, so fencing an append allocates nothing (it was two allocations
// of a 1:1 message and its receipt, and one per member of a group send).
type fences struct {
	first uint64 // seqs start at 1: never 0 in the map
	more  []uint64
}

func newFenceTable() *fenceTable {
	t := &fenceTable{seed: maphash.MakeSeed()}
	for i := range t.shards {
		t.shards[i].m = make(map[string]fences)
	}
	return t
}

func (t *fenceTable) shard(devID string) *fenceShard {
	return &t.shards[maphash.String(t.seed, devID)%uint64(len(t.shards))]
}

// add fences seqs from first on for devID.
func (t *fenceTable) add(devID string, first uint64) {
	sh := t.shard(devID)
	sh.mu.Lock()
	if fs, ok := sh.m[devID]; ok {
		fs.more = append(fs.more, first)
		sh.m[devID] = fs
	} else {
		sh.m[devID] = fences{first: first}
	}
	sh.mu.Unlock()
}

// remove lifts the fence at first for devID.
func (t *fenceTable) remove(devID string, first uint64) {
	sh := t.shard(devID)
	sh.mu.Lock()
	fs, ok := sh.m[devID]
	switch {
	case !ok:
	case fs.first == first && len(fs.more) == 0:
		delete(sh.m, devID)
	case fs.first == first:
		fs.first, fs.more = fs.more[0], fs.more[1:]
		if len(fs.more) == 0 {
			fs.more = nil
		}
		sh.m[devID] = fs
	default:
		if i := slices.Index(fs.more, first); i >= 0 {
			fs.more = slices.Delete(fs.more, i, i+1)
			sh.m[devID] = fs
		}
	}
	sh.mu.Unlock()
}

// limit returns the lowest fenced seq of devID, or 0 if none is fenced.
func (t *fenceTable) limit(devID string) uint64 {
	sh := t.shard(devID)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	fs := sh.m[devID]
	low := fs.first // 0 if none
	for _, f := range fs.more {
		if f < low {
			low = f
		}
	}
	return low
}
