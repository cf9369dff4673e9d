package pebble

import (
	"sync"

	pebbledb "github.com/cockroachdb/pebble/v2"

	"github.com/courier-im/courier/internal/mailbox"
)

// The committer: every write the store makes goes through one long-lived
// goroutine, which takes whatever batches are waiting when it is free,
// copies them into one Pebble batch, and commits that with one call. A
// second goroutine, the syncer, waits for the WAL syncs of the committed
// groups in order, so the committer applies the next group while the
// previous one is being synced.
//
// Grouping keeps every batch's atomicity (a group is one Pebble batch, all
// or nothing), and visibility order is queue order: a batch is published
// no earlier than every batch queued before it. Appends queue with their
// device locks held and release them once their group is published (see
// Append), so a device's batches are published in seq order.
//
// Why not let Pebble group commits by itself, as it does for concurrent
// DB.Apply calls? It does share the fsyncs, but each commit still costs a
// trip through its commit pipeline, and each caller needed a goroutine of
// its own (see runCommit's history in guard.go) to survive a wedged commit
// pipeline. One committer does both jobs for every caller at once.

// maxGroupBytes bounds the bytes copied into one group, so that a group
// stays well under Pebble's large-batch threshold (half a memtable).
const maxGroupBytes = 1 << 20

// commitReq is one unit of work for the committer: a batch to commit, or a
// function to run alone (tests use it to stand in for Pebble).
type commitReq struct {
	batch *pebbledb.Batch
	// sync asks for the WAL to be synced before done is closed.
	sync bool
	fn   func() error

	// For appends (see startAppend): the device locks held until the
	// batch is published and the high-water seqs to record then, the key
	// lock held until it is durable, the number of entries and the bytes
	// written.
	isAppend bool
	held     []*lock
	highs    []uint64
	// marks are, per held lock, the high-water mark the batch writes,
	// or 0 if it writes none (addEntries).
	marks   []uint64
	keyLock *lock
	// fenced is, per held lock, the first seq the batch takes for that
	// device, kept from readers until the batch completes (fence.go).
	fenced    []uint64
	fencedIDs []string
	// small holds held, highs, marks, fenced and fencedIDs for an append to
	// at most smallAppend devices (a 1:1 message, a receipt), so that it
	// allocates none of them.
	small struct {
		held [smallAppend]*lock
		nums [3 * smallAppend]uint64
		ids  [smallAppend]string
	}
	items int
	size  int
	// delHeld are the delete locks of a StartDeleteAppend, released once
	// its batch is published (or fails), so that a later delete of the
	// same device reads what this one left; delOne holds a single one
	// without an allocation. removed is how many entries it deletes,
	// uncounted from the store's depth once published.
	delHeld []*lock
	delOne  [1]*lock
	removed int
	// done is closed once the request is complete: durable if sync, else
	// published; err is set before. The caller that queued the request
	// does not wait for it to be published: the locks it holds until
	// then (append, delete) are the committer's to release, and its
	// caller waits for done.
	done chan struct{}
	err  error
}

// smallAppend is how many devices' figures a commitReq holds inline.
const smallAppend = 2

// newCommitReq makes a request whose caller waits for done only.
func newCommitReq(b *pebbledb.Batch, sync bool) *commitReq {
	return &commitReq{batch: b, sync: sync, done: make(chan struct{})}
}

func (r *commitReq) complete(s *Store, err error) {
	r.releaseDeleteLocks(s)
	r.err = err
	if r.isAppend {
		r.releaseLocks(s)
		r.unfence(s)
		if err == nil {
			s.space.wrote(r.size)
		}
	}
	close(r.done)
}

// publishedAppend runs on the committer once an append's batch is
// published: visible to readers, in seq order with every earlier batch for
// the same devices. Later appends to its devices may go ahead.
func (r *commitReq) publishedAppend(s *Store) {
	for i, l := range r.held {
		l.high = r.highs[i]
		if r.marks[i] != 0 {
			l.mark = r.marks[i]
		}
	}
	s.depth.Add(int64(r.items))
	s.locks.releaseAll(r.held)
	r.held = nil
}

// publish runs on the committer once r's batch is published: it
// releases what r held until then and uncounts the entries it deleted.
func (r *commitReq) publish(s *Store) {
	if r.isAppend {
		r.publishedAppend(s)
	}
	if r.removed != 0 {
		s.depth.Add(-int64(r.removed))
		r.removed = 0
	}
	r.releaseDeleteLocks(s)
}

// releaseDeleteLocks releases the delete locks r still holds.
func (r *commitReq) releaseDeleteLocks(s *Store) {
	if r.delHeld != nil {
		s.locks.releaseAll(r.delHeld)
		r.delHeld = nil
	}
}

// unfence lifts the append's read fences. The held locks are gone by
// then, so the device ids come from the lock names kept in fencedIDs.
func (r *commitReq) unfence(s *Store) {
	for i, id := range r.fencedIDs {
		s.fences.remove(id, r.fenced[i])
	}
	r.fenced, r.fencedIDs = nil, nil
}

// releaseLocks releases whatever locks an append still holds.
func (r *commitReq) releaseLocks(s *Store) {
	if r.held != nil {
		s.locks.releaseAll(r.held)
		r.held = nil
	}
	if r.keyLock != nil {
		s.locks.release(r.keyLock)
		r.keyLock = nil
	}
}

// commitQueue is the committer's inbox.
type commitQueue struct {
	mu     sync.Mutex
	cond   sync.Cond
	reqs   []*commitReq
	closed bool
}

func (q *commitQueue) init() { q.cond.L = &q.mu }

// push queues r; it reports false once the queue is closed.
func (q *commitQueue) push(r *commitReq) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return false
	}
	q.reqs = append(q.reqs, r)
	if len(q.reqs) == 1 {
		q.cond.Signal()
	}
	return true
}

// take waits for requests and returns all that are queued, or nil once the
// queue is closed and empty. spare is reused for the next take.
func (q *commitQueue) take(spare []*commitReq) []*commitReq {
	q.mu.Lock()
	defer q.mu.Unlock()
	for len(q.reqs) == 0 && !q.closed {
		q.cond.Wait()
	}
	reqs := q.reqs
	q.reqs = spare[:0]
	return reqs
}

func (q *commitQueue) close() {
	q.mu.Lock()
	q.closed = true
	q.cond.Broadcast()
	q.mu.Unlock()
}

// syncGroup is a committed group whose WAL sync the syncer waits for.
type syncGroup struct {
	batch *pebbledb.Batch
	reqs  []*commitReq
}

// commit queues r and waits until it is done or the store fails.
func (s *Store) commit(r *commitReq) error {
	if !s.queue.push(r) {
		return s.closedErr()
	}
	select {
	case <-r.done:
		return r.err
	case <-s.failed:
		return s.failure()
	}
}

// closedErr is what a request gets when the queue is already closed: the
// store failed or is closing (in which case no operation is in flight, see
// Close).
func (s *Store) closedErr() error {
	if err := s.failure(); err != nil {
		return err
	}
	return mailbox.ErrClosed
}

// committer runs until the queue is closed and drained.
func (s *Store) committer() {
	defer close(s.syncs)
	var spare []*commitReq
	for {
		all := s.queue.take(spare)
		if len(all) == 0 {
			return
		}
		for reqs := all; len(reqs) > 0; {
			n, bytes := 1, len(reqs[0].batchRepr())
			if reqs[0].fn == nil {
				for n < len(reqs) && reqs[n].fn == nil && bytes+len(reqs[n].batchRepr()) <= maxGroupBytes {
					bytes += len(reqs[n].batchRepr())
					n++
				}
			}
			s.commitGroup(reqs[:n])
			reqs = reqs[n:]
		}
		// The next take reuses this array (not the empty tail the loop
		// ends on, which has no room: each push would then grow a new
		// one), without holding on to the requests.
		clear(all)
		spare = all[:0]
	}
}

func (r *commitReq) batchRepr() []byte {
	if r.batch == nil {
		return nil
	}
	return r.batch.Repr()
}

// enterPebble counts a goroutine into Pebble's commit pipeline, unless the
// store has failed (then nothing may enter it again; see guard.go).
func (s *Store) enterPebble() error {
	s.commits.Add(1)
	if err := s.failure(); err != nil {
		s.commits.Add(-1)
		return err
	}
	return nil
}

func (s *Store) commitGroup(group []*commitReq) {
	fail := func(err error) {
		for _, r := range group {
			if r.batch != nil {
				r.batch.Close()
			}
			r.complete(s, err)
		}
	}
	if err := s.enterPebble(); err != nil {
		fail(err)
		return
	}
	if r := group[0]; r.fn != nil {
		err := s.protect(r.fn)
		s.commits.Add(-1)
		r.complete(s, s.failOn(err))
		return
	}
	b := group[0].batch
	sync := group[0].sync
	if len(group) > 1 {
		b = s.db.NewBatch()
		for _, r := range group {
			sync = sync || r.sync
			if err := b.Apply(r.batch, nil); err != nil {
				s.commits.Add(-1)
				b.Close()
				fail(err)
				return
			}
			r.batch.Close()
			r.batch = nil
		}
	}
	// The appends' entries are known present from now on (live.go):
	// added before the apply makes them visible, so that no delete can
	// find one the set does not know yet and the set then learn of it
	// after the delete; an apply that fails fails the store.
	for _, r := range group {
		if r.isAppend {
			for i, id := range r.fencedIDs {
				s.live.add(id, r.fenced[i], r.highs[i])
			}
		}
	}
	if sync {
		// Writers are concurrent if this group carries more than one
		// synced write, or one arrives while another is not yet durable;
		// set before the commit, so that the sync that covers them finds
		// it set (MinSyncInterval). A lone writer's next write comes only
		// once its last is durable (the syncer uncounts it first), so it
		// never sets it, however late Pebble asks after a sync.
		n := 0
		for _, r := range group {
			if r.sync {
				n++
			}
		}
		if before := s.syncPending.Add(int64(n)) - int64(n); n > 1 || before > 0 {
			s.concurrentSyncs.Store(true)
		}
	}
	err := s.protect(func() error {
		if sync {
			return s.db.ApplyNoSyncWait(b, pebbledb.Sync)
		}
		return s.db.Apply(b, pebbledb.NoSync)
	})
	s.commits.Add(-1)
	s.groupsCommitted.Add(1)
	err = s.failOn(err)
	if err != nil {
		b.Close()
		for _, r := range group {
			r.batch = nil
		}
		fail(err)
		return
	}
	for _, r := range group {
		r.batch = nil
		r.publish(s)
	}
	if !sync {
		b.Close()
		for _, r := range group {
			r.complete(s, nil)
		}
		return
	}
	waiting := make([]*commitReq, 0, len(group))
	for _, r := range group {
		if r.sync {
			waiting = append(waiting, r)
		} else {
			r.complete(s, nil)
		}
	}
	s.syncs <- syncGroup{batch: b, reqs: waiting}
}

// syncer waits for the WAL sync of each committed group, in commit order.
func (s *Store) syncer() {
	for g := range s.syncs {
		// Once the store has failed nothing enters Pebble again, and a batch
		// whose sync was not waited for is not closed (Pebble may still
		// hold it).
		err := s.enterPebble()
		if err == nil {
			err = s.protect(g.batch.SyncWait)
			s.commits.Add(-1)
			err = s.failOn(err)
			g.batch.Close()
		}
		s.syncPending.Add(-int64(len(g.reqs)))
		for _, r := range g.reqs {
			r.complete(s, err)
		}
	}
	close(s.stopped)
}
