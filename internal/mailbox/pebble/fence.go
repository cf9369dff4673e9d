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
// and complete in commit order, so a device's fences form a short FIFO;
// the slice stays empty for idle devices, and the map holds only devices
// with an append in flight.
type fenceTable struct {
	seed   maphash.Seed
	shards [32]fenceShard
}

type fenceShard struct {
	mu sync.Mutex
	m  map[string][]uint64 // deviceID -> first seqs of appends not yet durable, ascending
}

func newFenceTable() *fenceTable {
	t := &fenceTable{seed: maphash.MakeSeed()}
	for i := range t.shards {
		t.shards[i].m = make(map[string][]uint64)
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
	sh.m[devID] = append(sh.m[devID], first)
	sh.mu.Unlock()
}

// remove lifts the fence at first for devID.
func (t *fenceTable) remove(devID string, first uint64) {
	sh := t.shard(devID)
	sh.mu.Lock()
	fs := sh.m[devID]
	if i := slices.Index(fs, first); i >= 0 {
		fs = slices.Delete(fs, i, i+1)
	}
	if len(fs) == 0 {
		delete(sh.m, devID)
	} else {
		sh.m[devID] = fs
	}
	sh.mu.Unlock()
}

// limit returns the lowest fenced seq of devID, or 0 if none is fenced.
func (t *fenceTable) limit(devID string) uint64 {
	sh := t.shard(devID)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	var low uint64
	for _, f := range sh.m[devID] {
		if low == 0 || f < low {
			low = f
		}
	}
	return low
}
