package pebble

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	pebbledb "github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/bloom"
	"github.com/cockroachdb/pebble/v2/sstable"
	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox"
)

// Defaults for Options.
const (
	DefaultCacheSize         = 32 << 20
	DefaultMinFreeBytes      = 64 << 20
	DefaultFreeSpaceInterval = 100 * time.Millisecond
	DefaultMinSyncInterval   = time.Millisecond
)

// formatMajorVersion pins Pebble's on-disk format, so that upgrading Pebble
// does not silently ratchet the files to a format an older binary cannot
// read. It is the newest format of Pebble v2.1.7.
const formatMajorVersion = pebbledb.FormatValueSeparation

// Options configures Open. The zero value is ready to use.
type Options struct {
	// FS is the file system holding the store; nil means the operating
	// system's (with Pebble's disk-stall detection).
	FS vfs.FS
	// Logger receives Pebble's messages and the store's failures; nil
	// discards them.
	Logger *slog.Logger
	// CacheSize is the size in bytes of Pebble's block cache; zero means
	// DefaultCacheSize. Mailboxes are mostly read soon after they are
	// written, from the memtable, so a small cache does.
	CacheSize int64
	// MemTableSize is the size in bytes of Pebble's memtable; zero means
	// Pebble's default (4 MiB). Most entries are deleted within moments of
	// being written, and an entry and its deletion that meet in one
	// memtable cancel out when it is flushed (the deletion is a single
	// delete), but a larger memtable costs more per insert and lookup
	// (a deeper skiplist, more cache misses) than it saves: 32 MiB was
	// ≈ 40 % slower per message than 4 MiB (docs/performance.md).
	MemTableSize uint64
	// MinFreeBytes is the free space below which Append refuses to write
	// (with an error wrapping mailbox.ErrUnavailable). Delete and Expire,
	// which free space, keep working down to half of it. Zero means
	// DefaultMinFreeBytes; negative turns the check off. Leave room for
	// Pebble's flushes and compactions, which need free space to run.
	MinFreeBytes int64
	// FreeSpace reports the bytes available to the store; nil means asking
	// FS about the store's directory. If it returns vfs.ErrUnsupported at
	// Open (as an in-memory FS does), the check is off.
	FreeSpace func() (uint64, error)
	// FreeSpaceInterval is how long an answer from FreeSpace is reused;
	// zero means DefaultFreeSpaceInterval, negative asks on every write.
	FreeSpaceInterval time.Duration
	// MinSyncInterval is, while writers are concurrent, the least time
	// from the end of one WAL sync to the start of the next; zero means
	// DefaultMinSyncInterval, negative syncs as soon as a sync is asked
	// for. Writes that ask for a sync in between wait for the next one,
	// which then covers them all: under load the group commit's groups
	// grow, where each sync would otherwise carry a handful of writes.
	// It applies only while synced writes are concurrent: after a sync
	// that covered more than one, or one written while another waited
	// for its sync (as PostgreSQL's commit_delay applies only with
	// commit_siblings), so a lone writer is never delayed, and a write
	// that comes more than the interval after the last sync is synced at
	// once. Measured on the development VM at 4,000 msg/s: about half
	// the fdatasyncs, 9-19 % less server CPU per message; no change at
	// saturation, where groups are large anyway (docs/performance.md).
	MinSyncInterval time.Duration
	// LiveEntries is how many of the entries it appended the store
	// remembers as present until they are deleted, so that an ack that
	// only needs to know an entry is there does not read it (live.go);
	// zero means DefaultLiveEntries, negative turns it off.
	LiveEntries int
}

// Store is a mailbox.Store kept in a Pebble database. See the package
// documentation.
type Store struct {
	db    *pebbledb.DB
	log   *slog.Logger
	locks *lockTable
	// fences keeps readers off entries not yet durable (fence.go).
	fences *fenceTable
	space  *spaceGuard // nil when the free-space check is off
	// minFree is the reserve for appends; deletes use half of it.
	minFree uint64
	depth   atomic.Int64

	// mu is held shared by every operation and exclusively by Close, so
	// that Close waits for operations in flight.
	mu     sync.RWMutex
	closed bool

	// expireMu serialises Expire calls: Expire deletes idempotency keys it
	// read earlier without a lock, which is only safe if no other Expire
	// can delete and an Append re-create the same key in between.
	expireMu sync.Mutex

	// failed is closed when the store fails (see fail); failErr is set
	// before.
	failed   chan struct{}
	failOnce sync.Once
	failErr  error
	// commits counts goroutines inside Pebble's commit pipeline;
	// pebbleWedged records that Pebble panicked there. Either means
	// DB.Close could block forever.
	commits      atomic.Int64
	pebbleWedged atomic.Bool

	// The committer (commit.go): queue feeds it, syncs carries committed
	// groups to the syncer, and stopped is closed when both have ended.
	queue   commitQueue
	syncs   chan syncGroup
	stopped chan struct{}
	// groupsCommitted counts the committer's Pebble commits (the
	// benchmarks report it).
	groupsCommitted atomic.Int64
	// syncPending counts the requests committed with a sync and not yet
	// durable; concurrentSyncs is set when one is committed while another
	// is pending (or with another), and taken by Pebble's question after
	// each WAL sync: it decides whether the next sync waits
	// (MinSyncInterval).
	syncPending     atomic.Int64
	concurrentSyncs *atomic.Bool
	// highReads counts high-water marks read from Pebble (the tests of
	// the lock table's kept marks check it).
	highReads atomic.Int64
	// live is the set of entries known present (live.go); nil if off.
	live *liveSet
	// entryReads counts entries a delete read to learn whether they are
	// present (the tests of live check it).
	entryReads atomic.Int64
}

var (
	_ mailbox.Store          = (*Store)(nil)
	_ mailbox.Depther        = (*Store)(nil)
	_ mailbox.Sequencer      = (*Store)(nil)
	_ mailbox.DeleteAppender = (*Store)(nil)
	_ mailbox.Instrumented   = (*Store)(nil)
)

// Open opens the store in dir, creating it if needed.
func Open(dir string, opts Options) (*Store, error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	cacheSize := opts.CacheSize
	if cacheSize <= 0 {
		cacheSize = DefaultCacheSize
	}
	cache := pebbledb.NewCache(cacheSize)
	defer cache.Unref() // the DB holds its own reference
	po := &pebbledb.Options{
		FS:                 opts.FS,
		Cache:              cache,
		Logger:             pebbleLogger{log},
		EventListener:      eventListener(log),
		FormatMajorVersion: formatMajorVersion,
		MemTableSize:       opts.MemTableSize,
	}
	concurrentSyncs := new(atomic.Bool) // synced writes were concurrent since the last WAL sync
	if minSync := opts.MinSyncInterval; minSync >= 0 {
		if minSync == 0 {
			minSync = DefaultMinSyncInterval
		}
		// Asked by Pebble's WAL writer after each sync, once the sync's
		// waiters are released (so a lone writer's next write may already
		// be committed: why it is not a count of writes).
		po.WALMinSyncInterval = func() time.Duration {
			if concurrentSyncs.Swap(false) {
				return minSync
			}
			return 0
		}
	}
	// Every send looks its idempotency key up, and nearly always does not
	// find it: bloom filters let those lookups skip the tables that cannot
	// hold it (L0's setting carries to the other levels).
	po.Levels[0].FilterPolicy = bloom.FilterPolicy(10)
	// What stays on disk is mostly idempotency keys (kept for the
	// retention period) and entries of offline devices, and it is read
	// rarely: a first attempt's key is not looked up (Batch.KeyIsNew), and
	// a device reads its entries once, when it connects. So the LSM is
	// tuned for writing: L0 may hold more files before it is compacted
	// (each compaction then merges more and rewrites Lbase less often) and
	// Lbase is larger, at the cost of a few more files to consult per
	// read; and nothing is compressed, since entries are ciphertext that
	// does not compress and the keys are small. Measured by
	// BenchmarkMessageCycle over 1.2 M messages: 35-36 -> 26-29 µs of CPU
	// per message (docs/performance.md).
	po.L0CompactionThreshold = 16
	po.L0StopWritesThreshold = 64
	po.LBaseMaxBytes = 256 << 20
	for i := range po.Levels {
		po.Levels[i].Compression = func() *sstable.CompressionProfile { return sstable.NoCompression }
	}
	db, err := pebbledb.Open(dir, po)
	if err != nil {
		return nil, fmt.Errorf("mailbox/pebble: open %s: %w", dir, err)
	}
	s := &Store{
		db:     db,
		log:    log,
		locks:  newLockTable(),
		fences: newFenceTable(),
		failed: make(chan struct{}),

		concurrentSyncs: concurrentSyncs,
	}
	if err := s.init(dir, opts); err != nil {
		return nil, errors.Join(err, db.Close())
	}
	s.queue.init()
	s.syncs = make(chan syncGroup, 64)
	s.stopped = make(chan struct{})
	go s.committer()
	go s.syncer()
	return s, nil
}

func (s *Store) init(dir string, opts Options) error {
	if err := s.checkFormat(); err != nil {
		return err
	}
	n, err := s.countEntries()
	if err != nil {
		return err
	}
	s.depth.Store(n)
	switch {
	case opts.LiveEntries == 0:
		s.live = newLiveSet(DefaultLiveEntries)
	case opts.LiveEntries > 0:
		s.live = newLiveSet(opts.LiveEntries)
	}

	if opts.MinFreeBytes < 0 {
		return nil
	}
	s.minFree = DefaultMinFreeBytes
	if opts.MinFreeBytes > 0 {
		s.minFree = uint64(opts.MinFreeBytes)
	}
	free := opts.FreeSpace
	if free == nil {
		fs := opts.FS
		if fs == nil {
			fs = vfs.Default
		}
		free = func() (uint64, error) {
			u, err := fs.GetDiskUsage(dir)
			return u.AvailBytes, err
		}
	}
	if _, err := free(); errors.Is(err, vfs.ErrUnsupported) {
		s.log.Info("mailbox/pebble: free space unknown on this file system; disk-full guard off", "dir", dir)
		return nil
	}
	interval := opts.FreeSpaceInterval
	if interval == 0 {
		interval = DefaultFreeSpaceInterval
	}
	s.space = &spaceGuard{free: free, interval: interval}
	return nil
}

// checkFormat stamps a new store with the format version and refuses to
// open a store in another format.
func (s *Store) checkFormat() error {
	v, closer, err := s.db.Get(formatKey)
	if errors.Is(err, pebbledb.ErrNotFound) {
		it, err := s.db.NewIter(nil)
		if err != nil {
			return err
		}
		empty := !it.First()
		if err := errors.Join(it.Error(), it.Close()); err != nil {
			return fmt.Errorf("mailbox/pebble: %w", err)
		}
		if !empty {
			return errors.New("mailbox/pebble: directory holds a Pebble database that is not a mailbox store")
		}
		return s.db.Set(formatKey, []byte(formatV1), pebbledb.Sync)
	}
	if err != nil {
		return fmt.Errorf("mailbox/pebble: reading format: %w", err)
	}
	defer closer.Close()
	if string(v) != formatV1 {
		return fmt.Errorf("mailbox/pebble: unsupported store format %q (want %q)", v, formatV1)
	}
	return nil
}

// countEntries counts the entries held, for Depth. It reads keys only, but
// it still visits every entry: Open takes time proportional to the number
// of entries held.
func (s *Store) countEntries() (int64, error) {
	it, err := s.db.NewIter(&pebbledb.IterOptions{
		LowerBound: []byte{tagEntry},
		UpperBound: tagEnd(tagEntry),
	})
	if err != nil {
		return 0, err
	}
	var n int64
	for ok := it.First(); ok; ok = it.Next() {
		n++
	}
	if err := errors.Join(it.Error(), it.Close()); err != nil {
		return 0, fmt.Errorf("mailbox/pebble: counting entries: %w", err)
	}
	return n, nil
}

// enter admits an operation: on success the caller holds s.mu shared and
// must release it.
func (s *Store) enter() error {
	s.mu.RLock()
	if s.closed {
		s.mu.RUnlock()
		return mailbox.ErrClosed
	}
	if err := s.failure(); err != nil {
		s.mu.RUnlock()
		return err
	}
	return nil
}

// lockErr turns an error from the lock table into the error to return.
func (s *Store) lockErr(err error) error {
	if errors.Is(err, errAborted) {
		return s.failure()
	}
	return err
}

// Append implements mailbox.Store: StartAppend, then waiting for the
// batch to be durable. Once the batch is queued ctx is no longer
// consulted, since a commit cannot be called back.
func (s *Store) Append(ctx context.Context, b mailbox.Batch) (mailbox.Result, error) {
	p, err := s.startAppend(ctx, b)
	if err != nil {
		return mailbox.Result{}, err
	}
	return p.Wait(context.WithoutCancel(ctx))
}

// StartAppend implements mailbox.Sequencer: it returns once the batch is
// queued for the committer (its seqs assigned, after those of every batch
// queued before for the same devices; it becomes visible to readers when
// the committer publishes it, in queue order), and the returned Pending
// reports when it is durable, or that its commit failed. The batch is
// committed whether or not Wait is called.
//
// Seqs are allocated while holding the append lock of every device in the
// batch, and the lock is kept until the committer has published the batch
// (commit.go), but not while the WAL is synced. See the package
// documentation for why that is enough.
func (s *Store) StartAppend(ctx context.Context, b mailbox.Batch) (mailbox.Pending, error) {
	p, err := s.startAppend(ctx, b)
	if err != nil {
		return nil, err
	}
	return p, nil
}

// pending is an append (or a delete) that has been queued.
type pending struct {
	s    *Store
	req  *commitReq // nil: already done (a duplicate, an empty batch)
	res  mailbox.Result
	size int
}

// Wait implements mailbox.Pending.
func (p *pending) Wait(ctx context.Context) (mailbox.Result, error) {
	if p.req == nil {
		return p.res, nil
	}
	select {
	case <-p.req.done:
		if p.req.err != nil {
			return mailbox.Result{}, p.req.err
		}
		return p.res, nil
	case <-p.s.failed:
		return mailbox.Result{}, p.s.failure()
	case <-ctx.Done():
		return mailbox.Result{}, ctx.Err()
	}
}

func (s *Store) startAppend(ctx context.Context, b mailbox.Batch) (*pending, error) {
	if err := s.enter(); err != nil {
		return nil, err
	}
	defer s.mu.RUnlock()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if len(b.Items) == 0 && b.Key == "" {
		return &pending{res: mailbox.Result{Seqs: []uint64{}}}, nil
	}
	// The append lock of a device is named by its deviceID, which is also
	// what its keys hold: names[i][1:] is item i's deviceID.
	names := make([]string, len(b.Items))
	size := len(b.Key) + len(b.Receipt) + 32
	for i, it := range b.Items {
		name, err := appendLockName(it.Device)
		if err != nil {
			return nil, err
		}
		names[i] = name
		size += 2*len(name) + len(it.Data) + 48
	}
	when := b.Time
	if when.IsZero() {
		when = time.Now()
	}

	r := &commitReq{sync: true, isAppend: true, done: make(chan struct{})}
	queued := false
	defer func() {
		if !queued {
			r.releaseLocks(s)
			r.unfence(s)
		}
	}()
	// The key lock, if any, is held until the batch is durable: a
	// concurrent duplicate must not report "accepted" for a batch whose WAL
	// sync might still fail.
	if b.Key != "" {
		kl, err := s.locks.acquire(ctx, lockKeyPrefix+b.Key, s.failed)
		if err != nil {
			return nil, s.lockErr(err)
		}
		r.keyLock = kl
		// A key the caller vouches is new is not looked up: the lookup
		// nearly always misses, and a miss walks every memtable and
		// level. The lock is still taken, so that a retry of this batch
		// sent while it is in flight waits for it and then finds its key.
		if !b.KeyIsNew {
			receipt, found, err := s.lookupKey(b.Key)
			if err != nil {
				return nil, err
			}
			if found {
				return &pending{res: mailbox.Result{Duplicate: true, Receipt: receipt}}, nil
			}
		}
	}

	// Checked after the duplicate lookup: a retried send is answered even
	// when the disk is full, since answering it writes nothing.
	if err := s.space.check(s.minFree, uint64(size)); err != nil {
		return nil, err
	}
	batch := s.db.NewBatch()
	seqs, err := s.addEntries(ctx, r, batch, names, b.Items, when)
	if err != nil {
		batch.Close()
		return nil, err
	}
	nanos := uint64(when.UnixNano())
	if b.Key != "" {
		op := batch.SetDeferred(1+len(b.Key), 8+len(b.Receipt))
		op.Key[0] = tagKey
		copy(op.Key[1:], b.Key)
		binary.BigEndian.PutUint64(op.Value, nanos)
		copy(op.Value[8:], b.Receipt)
		if err := op.Finish(); err != nil {
			batch.Close()
			return nil, err
		}
	}
	if err := ctx.Err(); err != nil {
		batch.Close()
		return nil, err
	}

	// From here on the batch is the committer's.
	r.batch = batch
	r.items = len(b.Items)
	r.size = batch.Len()
	if !s.queue.push(r) {
		batch.Close()
		return nil, s.closedErr()
	}
	queued = true
	// Ordered: the seqs are taken, and the device locks, which the
	// committer releases once the batch is published, keep every later
	// append of these devices behind it. Not waiting for the publication
	// here spares the caller a wake-up: Wait waits for the sync anyway,
	// and reports a failed commit as it reports a failed sync.
	return &pending{s: s, req: r, res: mailbox.Result{Seqs: seqs, Receipt: b.Receipt}}, nil
}

// addEntries writes items into batch for the append r: it takes the
// append locks named in names (one per item, see appendLockName) into
// r.held, fences the seqs it assigns, and writes the entries and the
// devices' high-water marks. It returns the items' seqs. On error the
// caller closes batch; r's locks and fences are released by whoever
// completes or abandons r.
func (s *Store) addEntries(ctx context.Context, r *commitReq, batch *pebbledb.Batch, names []string, items []mailbox.Item, when time.Time) ([]uint64, error) {
	var buf []*lock
	if len(names) <= smallAppend {
		buf = r.small.held[:0]
	}
	held, err := s.locks.acquireAll(ctx, names, s.failed, buf)
	if err != nil {
		return nil, s.lockErr(err)
	}
	// Released by the committer as soon as the batch is published (see
	// publishedAppend), or by the caller's releaseLocks on the paths that
	// never get there.
	r.held = held

	// Another append may have failed the store while we waited; Pebble's
	// commit pipeline must not be entered again then (see guard.go).
	if err := s.failure(); err != nil {
		return nil, err
	}
	n := len(held)
	var nums []uint64
	var ids []string
	if n <= smallAppend {
		nums, ids = r.small.nums[:3*n], r.small.ids[:n]
	} else {
		nums, ids = make([]uint64, 3*n), make([]string, n)
	}
	r.highs, r.marks, r.fenced, r.fencedIDs = nums[:n:n], nums[n:2*n:2*n], nums[2*n:], ids
	for i, l := range held {
		if !l.highKnown {
			h, err := s.readHigh(l.name[len(lockAppendPrefix):])
			if err != nil {
				return nil, err
			}
			// Every seq up to the stored mark may have been taken.
			l.high, l.mark, l.highKnown = h, h, true
		}
		r.highs[i] = l.high
	}
	// Fence the seqs this batch will take, before it can become visible;
	// the fences are lifted when it completes (or never gets queued).
	for i, l := range held {
		r.fenced[i] = l.high + 1
		r.fencedIDs[i] = l.name[len(lockAppendPrefix):]
		s.fences.add(r.fencedIDs[i], r.fenced[i])
	}
	seqs := make([]uint64, len(items))
	nanos := uint64(when.UnixNano())
	for i, it := range items {
		// held is sorted by name, without duplicates.
		h, _ := slices.BinarySearchFunc(held, names[i], func(l *lock, name string) int { return strings.Compare(l.name, name) })
		r.highs[h]++
		seqs[i] = r.highs[h]
		devID := names[i][len(lockAppendPrefix):]
		op := batch.SetDeferred(1+len(devID)+8, 8+len(it.Data))
		k := append(op.Key[:0], tagEntry)
		k = append(k, devID...)
		binary.BigEndian.AppendUint64(k, seqs[i])
		binary.BigEndian.PutUint64(op.Value, nanos)
		copy(op.Value[8:], it.Data)
		if err := op.Finish(); err != nil {
			return nil, err
		}
	}
	for i, l := range held {
		// Never reuse a seq: the high-water mark survives deleting every
		// entry, and it is written in the same atomic batch as the
		// entries that pass the one stored. It is written ahead
		// (seqReserve), so most appends write no mark (see seqReserve).
		if r.highs[i] <= l.mark {
			continue
		}
		r.marks[i] = r.highs[i] + seqReserve
		devID := l.name[len(lockAppendPrefix):]
		op := batch.SetDeferred(1+len(devID), 8)
		op.Key[0] = tagHigh
		copy(op.Key[1:], devID)
		binary.BigEndian.PutUint64(op.Value, r.marks[i])
		if err := op.Finish(); err != nil {
			return nil, err
		}
	}
	return seqs, nil
}

// appendLockName is the name of dev's append lock: the prefix, then dev's
// deviceID.
func appendLockName(dev ident.Device) (string, error) {
	if len(dev.User) == 0 || len(dev.User) > maxUserBytes {
		return "", fmt.Errorf("%w: %q", errBadDevice, dev.User)
	}
	var b strings.Builder
	b.Grow(len(lockAppendPrefix) + 1 + len(dev.User) + 4)
	b.WriteString(lockAppendPrefix)
	b.WriteByte(byte(len(dev.User)))
	b.WriteString(dev.User)
	var id [4]byte
	binary.BigEndian.PutUint32(id[:], dev.ID)
	b.Write(id[:])
	return b.String(), nil
}

// seqReserve is how far past the seqs it takes an append writes a
// device's high-water mark: the mark is a bound below which every seq
// may have been taken, not the last one taken. So a device's mark is
// written once every seqReserve+1 entries rather than with every append,
// one key fewer per append for the memtable, the WAL and the flushes to
// carry (two of the seven keys a 1:1 message and its receipt wrote). The
// price: when the mark is read back (after a restart, or after the lock
// table forgot the device), seqs go on from the mark, leaving a gap of
// at most seqReserve. Seqs only have to increase and never repeat; no
// reader counts on them being consecutive (acks already leave gaps).
const seqReserve = 255

// readHigh returns the high-water mark of a device (0 if it never had an
// entry): no seq up to it may be taken again.
func (s *Store) readHigh(devID string) (uint64, error) {
	s.highReads.Add(1)
	var buf [1 + 1 + maxUserBytes + 4]byte
	k := append(append(buf[:0], tagHigh), devID...)
	v, closer, err := s.db.Get(k)
	if errors.Is(err, pebbledb.ErrNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("mailbox/pebble: %w", err)
	}
	defer closer.Close()
	if len(v) != 8 {
		return 0, errCorrupt
	}
	return binary.BigEndian.Uint64(v), nil
}

// lookupKey returns the receipt stored with an idempotency key.
func (s *Store) lookupKey(key string) ([]byte, bool, error) {
	v, closer, err := s.db.Get(idemKey(key))
	if errors.Is(err, pebbledb.ErrNotFound) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("mailbox/pebble: %w", err)
	}
	defer closer.Close()
	_, receipt, err := splitTimedValue(v)
	if err != nil {
		return nil, false, err
	}
	return bytes.Clone(receipt), true, nil
}

// Read implements mailbox.Store. A limit of zero or less returns nothing.
func (s *Store) Read(ctx context.Context, dev ident.Device, after uint64, limit int) ([]mailbox.Entry, error) {
	if err := s.enter(); err != nil {
		return nil, err
	}
	defer s.mu.RUnlock()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	id, err := deviceID(dev)
	if err != nil {
		return nil, err
	}
	if limit <= 0 || after == math.MaxUint64 {
		return nil, nil
	}
	it, err := s.db.NewIter(&pebbledb.IterOptions{
		LowerBound: entryKey(id, after+1),
		UpperBound: entryPrefixEnd(id),
	})
	if err != nil {
		return nil, fmt.Errorf("mailbox/pebble: %w", err)
	}
	// The fence is looked up after the iterator took its view: every entry
	// in that view that was not durable then was fenced then, and is either
	// still fenced now or durable by now (fence.go). Looking it up before
	// would miss an append fenced and published in between.
	fence := s.fences.limit(string(id))
	var out []mailbox.Entry
	for ok := it.First(); ok && len(out) < limit; ok = it.Next() {
		e, err := decodeEntry(it.Key(), it.Value())
		if err != nil {
			it.Close()
			return nil, err
		}
		if fence != 0 && e.Seq >= fence {
			break
		}
		out = append(out, e)
	}
	if err := errors.Join(it.Error(), it.Close()); err != nil {
		return nil, fmt.Errorf("mailbox/pebble: %w", err)
	}
	return out, nil
}

// decodeEntry decodes an entry, copying what Pebble owns.
func decodeEntry(k, v []byte) (mailbox.Entry, error) {
	_, seq, ok := splitEntryKey(k)
	if !ok {
		return mailbox.Entry{}, errCorrupt
	}
	t, data, err := splitTimedValue(v)
	if err != nil {
		return mailbox.Entry{}, err
	}
	return mailbox.Entry{Seq: seq, Time: t, Data: bytes.Clone(data)}, nil
}

// Delete implements mailbox.Store. The entries are returned in seq order.
// The deletion is written without waiting for the WAL sync.
func (s *Store) Delete(ctx context.Context, dev ident.Device, seqs []uint64) ([]mailbox.Entry, error) {
	if err := s.enter(); err != nil {
		return nil, err
	}
	defer s.mu.RUnlock()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	id, err := deviceID(dev)
	if err != nil {
		return nil, err
	}
	if len(seqs) == 0 {
		return nil, nil
	}
	if err := s.space.check(s.minFree/2, 0); err != nil {
		return nil, err
	}
	seqs = slices.Clone(seqs)
	slices.Sort(seqs)
	seqs = slices.Compact(seqs)

	// The per-device delete lock makes "present" and "deleted" one step, so
	// that two concurrent deletes of a seq (or a delete and Expire) return
	// and count the entry once.
	l, err := s.locks.acquire(ctx, lockDeletePrefix+string(id), s.failed)
	if err != nil {
		return nil, s.lockErr(err)
	}
	defer s.locks.release(l)

	batch := s.db.NewBatch()
	out, err := s.deleteInto(batch, id, seqs, false)
	if err != nil || len(out) == 0 {
		batch.Close()
		return nil, err
	}
	if err := s.commit(newCommitReq(batch, false)); err != nil {
		return nil, err
	}
	s.depth.Add(-int64(len(out)))
	return out, nil
}

// deleteInto writes into batch the deletion of the entries of device id
// with the given seqs (sorted, without duplicates) that are present, and
// returns those entries; with seqsOnly, an entry known present (live.go)
// is not read, and returned with its Seq only. The caller holds the
// device's delete lock.
func (s *Store) deleteInto(batch *pebbledb.Batch, id []byte, seqs []uint64, seqsOnly bool) ([]mailbox.Entry, error) {
	var out []mailbox.Entry
	var idStr string
	if s.live != nil {
		idStr = string(id)
	}
	for _, seq := range seqs {
		k := entryKey(id, seq)
		// Taken out of the set either way: the entry is being deleted.
		if s.live.take(idStr, seq) && seqsOnly {
			out = append(out, mailbox.Entry{Seq: seq})
			if err := batch.SingleDelete(k, nil); err != nil {
				return nil, err
			}
			continue
		}
		s.entryReads.Add(1)
		v, closer, err := s.db.Get(k)
		if errors.Is(err, pebbledb.ErrNotFound) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("mailbox/pebble: %w", err)
		}
		e, err := decodeEntry(k, v)
		closer.Close()
		if err != nil {
			return nil, err
		}
		out = append(out, e)
		if err := batch.SingleDelete(k, nil); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// StartDeleteAppend implements mailbox.DeleteAppender: the deletions and
// the entries d.Then returns are one Pebble batch, so one commit, one WAL
// record (atomic across a crash) and one share of a group's fsync. The
// device's delete lock is held from reading the entries until the batch is
// published, so that concurrent deletes remove each entry once; the items'
// append locks are taken while it is held (no path takes them the other
// way round). A batch with items is synced, and Wait waits for it; a batch
// of deletions alone is not, like Delete's.
func (s *Store) StartDeleteAppend(ctx context.Context, d mailbox.DeleteAppend) ([]mailbox.Entry, mailbox.Pending, error) {
	var then func([][]mailbox.Entry) ([]mailbox.Item, error)
	if d.Then != nil {
		then = func(removed [][]mailbox.Entry) ([]mailbox.Item, error) { return d.Then(removed[0]) }
	}
	removed, p, err := s.startDeleteAppend(ctx, []mailbox.DeleteAppend{d}, then, d.Time)
	if err != nil {
		return nil, nil, err
	}
	return removed[0], p, nil
}

// StartDeleteAppendMany implements mailbox.ManyDeleteAppender: as
// StartDeleteAppend, with the delete locks of all the devices held (taken
// in the lock table's global order) and every deletion in the one batch.
func (s *Store) StartDeleteAppendMany(ctx context.Context, d mailbox.DeleteAppendMany) ([][]mailbox.Entry, mailbox.Pending, error) {
	seen := make(map[ident.Device]bool, len(d.Deletes))
	for _, del := range d.Deletes {
		if seen[del.Device] {
			return nil, nil, fmt.Errorf("mailbox/pebble: device %v named twice in one delete", del.Device)
		}
		seen[del.Device] = true
	}
	return s.startDeleteAppend(ctx, d.Deletes, d.Then, d.Time)
}

// startDeleteAppend is StartDeleteAppend and StartDeleteAppendMany: the
// devices of dels are distinct.
func (s *Store) startDeleteAppend(ctx context.Context, dels []mailbox.DeleteAppend, then func([][]mailbox.Entry) ([]mailbox.Item, error), when time.Time) ([][]mailbox.Entry, mailbox.Pending, error) {
	if err := s.enter(); err != nil {
		return nil, nil, err
	}
	defer s.mu.RUnlock()
	if err := ctx.Err(); err != nil {
		return nil, nil, err
	}
	ids := make([][]byte, len(dels))
	seqs := make([][]uint64, len(dels))
	some := false
	for i, d := range dels {
		id, err := deviceID(d.Device)
		if err != nil {
			return nil, nil, err
		}
		ids[i] = id
		if len(d.Seqs) > 0 {
			some = true
			ss := slices.Clone(d.Seqs)
			slices.Sort(ss)
			seqs[i] = slices.Compact(ss)
		}
	}
	// done is the Pending of a call that writes nothing.
	done := func() *pending { return &pending{res: mailbox.Result{Seqs: []uint64{}}} }
	removed := make([][]mailbox.Entry, len(dels))
	if !some {
		return removed, done(), nil
	}
	if err := s.space.check(s.minFree/2, 0); err != nil {
		return nil, nil, err
	}

	// The delete locks are held until the batch is published (by the
	// committer), or released here if it is never queued.
	r := newCommitReq(nil, false)
	if len(dels) == 1 {
		dl, err := s.locks.acquire(ctx, lockDeletePrefix+string(ids[0]), s.failed)
		if err != nil {
			return nil, nil, s.lockErr(err)
		}
		r.delOne[0] = dl
		r.delHeld = r.delOne[:]
	} else {
		names := make([]string, len(dels))
		for i, id := range ids {
			names[i] = lockDeletePrefix + string(id)
		}
		held, err := s.locks.acquireAll(ctx, names, s.failed, nil)
		if err != nil {
			return nil, nil, s.lockErr(err)
		}
		r.delHeld = held
	}

	batch := s.db.NewBatch()
	queued := false
	defer func() {
		if !queued {
			batch.Close()
			r.releaseDeleteLocks(s)
		}
	}()
	n := 0
	for i, d := range dels {
		if len(seqs[i]) == 0 {
			continue
		}
		out, err := s.deleteInto(batch, ids[i], seqs[i], d.SeqsOnly)
		if err != nil {
			return nil, nil, err
		}
		removed[i] = out
		n += len(out)
	}
	if n == 0 {
		return removed, done(), nil
	}
	var items []mailbox.Item
	if then != nil {
		var err error
		if items, err = then(removed); err != nil {
			return nil, nil, err
		}
	}
	r.batch = batch
	var appended []uint64
	if len(items) > 0 {
		r.sync, r.isAppend = true, true
		defer func() {
			if !queued {
				r.releaseLocks(s)
				r.unfence(s)
			}
		}()
		names := make([]string, len(items))
		size := 32
		for i, it := range items {
			name, err := appendLockName(it.Device)
			if err != nil {
				return nil, nil, err
			}
			names[i] = name
			size += 2*len(name) + len(it.Data) + 48
		}
		if err := s.space.check(s.minFree, uint64(size)); err != nil {
			return nil, nil, err
		}
		if when.IsZero() {
			when = time.Now()
		}
		var err error
		if appended, err = s.addEntries(ctx, r, batch, names, items, when); err != nil {
			return nil, nil, err
		}
		r.items = len(items)
	}
	if err := ctx.Err(); err != nil {
		return nil, nil, err
	}

	// From here on the batch, and the locks, are the committer's.
	r.size = batch.Len()
	r.removed = n
	if !s.queue.push(r) {
		return nil, nil, s.closedErr()
	}
	queued = true
	// Not waiting for the publication: as in startAppend.
	if !r.isAppend {
		appended = []uint64{}
	}
	return removed, &pending{s: s, req: r, res: mailbox.Result{Seqs: appended}}, nil
}

var _ mailbox.ManyDeleteAppender = (*Store)(nil)

// expireChunk is how many keys Expire deletes per batch.
const expireChunk = 512

// Expire implements mailbox.Store. It scans every entry and every
// idempotency key (reading the time at the front of each value), so it
// costs time proportional to everything the store holds; run it
// periodically (hourly, say), not per request. Deletions are written
// without waiting for the WAL sync, like Delete's.
func (s *Store) Expire(ctx context.Context, cutoff time.Time) (int, error) {
	if err := s.enter(); err != nil {
		return 0, err
	}
	defer s.mu.RUnlock()
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	s.expireMu.Lock()
	defer s.expireMu.Unlock()
	if err := s.space.check(s.minFree/2, 0); err != nil {
		return 0, err
	}
	n, err := s.expireScan(ctx, tagEntry, cutoff)
	if err != nil {
		return n, err
	}
	_, err = s.expireScan(ctx, tagKey, cutoff)
	return n, err
}

// expireScan deletes the keys with the given tag whose value's time is
// before cutoff, returning how many it deleted.
func (s *Store) expireScan(ctx context.Context, tag byte, cutoff time.Time) (int, error) {
	it, err := s.db.NewIter(&pebbledb.IterOptions{
		LowerBound: []byte{tag},
		UpperBound: tagEnd(tag),
	})
	if err != nil {
		return 0, fmt.Errorf("mailbox/pebble: %w", err)
	}
	defer it.Close()
	var (
		total   int
		pending [][]byte
	)
	flush := func() error {
		if err := ctx.Err(); err != nil {
			return err
		}
		var n int
		var err error
		if tag == tagEntry {
			n, err = s.deleteEntries(ctx, pending)
		} else {
			n, err = s.deleteKeys(pending)
		}
		total += n
		pending = pending[:0]
		return err
	}
	for ok := it.First(); ok; ok = it.Next() {
		t, _, err := splitTimedValue(it.Value())
		if err != nil {
			return total, err
		}
		if !t.Before(cutoff) {
			continue
		}
		pending = append(pending, bytes.Clone(it.Key()))
		if len(pending) == expireChunk {
			if err := flush(); err != nil {
				return total, err
			}
		}
	}
	if err := it.Error(); err != nil {
		return total, fmt.Errorf("mailbox/pebble: %w", err)
	}
	if len(pending) > 0 {
		if err := flush(); err != nil {
			return total, err
		}
	}
	return total, nil
}

// deleteEntries deletes the given entry keys that are still present, under
// their devices' delete locks (see Delete), and returns how many it deleted.
func (s *Store) deleteEntries(ctx context.Context, keys [][]byte) (int, error) {
	names := make([]string, 0, len(keys))
	for _, k := range keys {
		id, _, ok := splitEntryKey(k)
		if !ok {
			return 0, errCorrupt
		}
		names = append(names, lockDeletePrefix+string(id))
	}
	held, err := s.locks.acquireAll(ctx, names, s.failed, nil)
	if err != nil {
		return 0, s.lockErr(err)
	}
	defer s.locks.releaseAll(held)
	batch := s.db.NewBatch()
	n := 0
	for _, k := range keys {
		_, closer, err := s.db.Get(k)
		if errors.Is(err, pebbledb.ErrNotFound) {
			continue // deleted since the scan saw it
		}
		if err != nil {
			batch.Close()
			return 0, fmt.Errorf("mailbox/pebble: %w", err)
		}
		closer.Close()
		if id, seq, ok := splitEntryKey(k); ok {
			s.live.take(string(id), seq)
		}
		if err := batch.SingleDelete(k, nil); err != nil {
			batch.Close()
			return 0, err
		}
		n++
	}
	if n == 0 {
		batch.Close()
		return 0, nil
	}
	if err := s.commit(newCommitReq(batch, false)); err != nil {
		return 0, err
	}
	s.depth.Add(-int64(n))
	return n, nil
}

func (s *Store) deleteKeys(keys [][]byte) (int, error) {
	batch := s.db.NewBatch()
	for _, k := range keys {
		if err := batch.Delete(k, nil); err != nil {
			batch.Close()
			return 0, err
		}
	}
	if err := s.commit(newCommitReq(batch, false)); err != nil {
		return 0, err
	}
	return len(keys), nil
}

// Depth implements mailbox.Depther: the number of entries held.
func (s *Store) Depth() int64 { return s.depth.Load() }

// Close implements mailbox.Store. It waits for operations in flight; every
// Append that returned without error is already durable. Calling Close
// again returns mailbox.ErrClosed.
//
// After a storage failure Close releases the database if Pebble allows it;
// if a goroutine is stuck inside Pebble's commit pipeline it cannot, and it
// returns an error saying so: the process should then exit.
func (s *Store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return mailbox.ErrClosed
	}
	s.closed = true
	// No operation is in flight (they hold mu), but committed groups may
	// still be waiting for their sync: the committer and syncer drain them.
	s.queue.close()
	failure := s.failure()
	if failure != nil && (s.pebbleWedged.Load() || s.commits.Load() > 0) {
		return fmt.Errorf("mailbox/pebble: database left open after a failure, the process must exit: %w", failure)
	}
	<-s.stopped
	err := s.db.Close()
	if err != nil {
		err = fmt.Errorf("mailbox/pebble: close: %w", err)
	}
	if failure != nil {
		return errors.Join(failure, err)
	}
	return err
}
