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
	"sync"
	"sync/atomic"
	"time"

	pebbledb "github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox"
)

// Defaults for Options.
const (
	DefaultCacheSize         = 32 << 20
	DefaultMinFreeBytes      = 64 << 20
	DefaultFreeSpaceInterval = 100 * time.Millisecond
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
}

// Store is a mailbox.Store kept in a Pebble database. See the package
// documentation.
type Store struct {
	db    *pebbledb.DB
	log   *slog.Logger
	locks *lockTable
	space *spaceGuard // nil when the free-space check is off
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
}

var (
	_ mailbox.Store   = (*Store)(nil)
	_ mailbox.Depther = (*Store)(nil)
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
	db, err := pebbledb.Open(dir, &pebbledb.Options{
		FS:                 opts.FS,
		Cache:              cache,
		Logger:             pebbleLogger{log},
		EventListener:      eventListener(log),
		FormatMajorVersion: formatMajorVersion,
	})
	if err != nil {
		return nil, fmt.Errorf("mailbox/pebble: open %s: %w", dir, err)
	}
	s := &Store{
		db:     db,
		log:    log,
		locks:  newLockTable(),
		failed: make(chan struct{}),
	}
	if err := s.init(dir, opts); err != nil {
		return nil, errors.Join(err, db.Close())
	}
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

// Append implements mailbox.Store.
//
// Seqs are allocated while holding the append lock of every device in the
// batch, and the lock is kept until Pebble has sequenced and published the
// batch (DB.ApplyNoSyncWait), but not while the WAL is synced
// (Batch.SyncWait). See the package documentation for why that is enough.
func (s *Store) Append(ctx context.Context, b mailbox.Batch) (mailbox.Result, error) {
	if err := s.enter(); err != nil {
		return mailbox.Result{}, err
	}
	defer s.mu.RUnlock()
	if err := ctx.Err(); err != nil {
		return mailbox.Result{}, err
	}
	if len(b.Items) == 0 && b.Key == "" {
		return mailbox.Result{Seqs: []uint64{}}, nil
	}
	devIDs := make([][]byte, len(b.Items))
	size := len(b.Key) + len(b.Receipt) + 32
	for i, it := range b.Items {
		id, err := deviceID(it.Device)
		if err != nil {
			return mailbox.Result{}, err
		}
		devIDs[i] = id
		size += 2*len(id) + len(it.Data) + 48
	}
	when := b.Time
	if when.IsZero() {
		when = time.Now()
	}

	if b.Key != "" {
		kl, err := s.locks.acquire(ctx, lockKeyPrefix+b.Key, s.failed)
		if err != nil {
			return mailbox.Result{}, s.lockErr(err)
		}
		// Held until the batch is durable: a concurrent duplicate must not
		// report "accepted" for a batch whose WAL sync might still fail.
		defer s.locks.release(kl)
		receipt, found, err := s.lookupKey(b.Key)
		if err != nil {
			return mailbox.Result{}, err
		}
		if found {
			return mailbox.Result{Duplicate: true, Receipt: receipt}, nil
		}
	}

	// Checked after the duplicate lookup: a retried send is answered even
	// when the disk is full, since answering it writes nothing.
	if err := s.space.check(s.minFree, uint64(size)); err != nil {
		return mailbox.Result{}, err
	}
	names := make([]string, len(devIDs))
	for i, id := range devIDs {
		names[i] = lockAppendPrefix + string(id)
	}
	held, err := s.locks.acquireAll(ctx, names, s.failed)
	if err != nil {
		return mailbox.Result{}, s.lockErr(err)
	}
	// Released by the commit goroutine as soon as the batch is published;
	// this covers the paths that never get there.
	var releaseOnce sync.Once
	releaseDevices := func() { releaseOnce.Do(func() { s.locks.releaseAll(held) }) }
	defer releaseDevices()

	// Another append may have failed the store while we waited; Pebble's
	// commit pipeline must not be entered again then (see guard.go).
	if err := s.failure(); err != nil {
		return mailbox.Result{}, err
	}
	byName := make(map[string]*lock, len(held))
	for _, l := range held {
		if !l.highKnown {
			h, err := s.readHigh([]byte(l.name[len(lockAppendPrefix):]))
			if err != nil {
				return mailbox.Result{}, err
			}
			l.high, l.highKnown = h, true
		}
		byName[l.name] = l
	}
	next := make(map[*lock]uint64, len(held))
	for _, l := range held {
		next[l] = l.high
	}
	seqs := make([]uint64, len(b.Items))
	batch := s.db.NewBatch()
	for i, it := range b.Items {
		l := byName[names[i]]
		next[l]++
		seqs[i] = next[l]
		if err := batch.Set(entryKey(devIDs[i], seqs[i]), timedValue(when, it.Data), nil); err != nil {
			batch.Close()
			return mailbox.Result{}, err
		}
	}
	for l, high := range next {
		// Never reuse a seq: the high-water mark survives deleting every
		// entry, and it is written in the same atomic batch as the entries.
		v := binary.BigEndian.AppendUint64(nil, high)
		if err := batch.Set(highKey([]byte(l.name[len(lockAppendPrefix):])), v, nil); err != nil {
			batch.Close()
			return mailbox.Result{}, err
		}
	}
	if b.Key != "" {
		if err := batch.Set(idemKey(b.Key), timedValue(when, b.Receipt), nil); err != nil {
			batch.Close()
			return mailbox.Result{}, err
		}
	}
	if err := ctx.Err(); err != nil {
		batch.Close()
		return mailbox.Result{}, err
	}
	size = batch.Len()

	// From here on the batch is Pebble's: ctx is no longer consulted, since
	// a commit cannot be called back.
	err = s.runCommit(func() error {
		defer batch.Close()
		if err := s.db.ApplyNoSyncWait(batch, pebbledb.Sync); err != nil {
			return err
		}
		// Published: visible to readers, in seq order with every earlier
		// batch for the same devices. Later appends may go ahead.
		for l, high := range next {
			l.high = high
		}
		s.depth.Add(int64(len(b.Items)))
		releaseDevices()
		return batch.SyncWait()
	})
	if err != nil {
		return mailbox.Result{}, err
	}
	s.space.wrote(size)
	return mailbox.Result{Seqs: seqs, Receipt: b.Receipt}, nil
}

// readHigh returns the high-water seq of a device (0 if it never had an
// entry).
func (s *Store) readHigh(devID []byte) (uint64, error) {
	v, closer, err := s.db.Get(highKey(devID))
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
	var out []mailbox.Entry
	for ok := it.First(); ok && len(out) < limit; ok = it.Next() {
		e, err := decodeEntry(it.Key(), it.Value())
		if err != nil {
			it.Close()
			return nil, err
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
	var out []mailbox.Entry
	for _, seq := range seqs {
		k := entryKey(id, seq)
		v, closer, err := s.db.Get(k)
		if errors.Is(err, pebbledb.ErrNotFound) {
			continue
		}
		if err != nil {
			batch.Close()
			return nil, fmt.Errorf("mailbox/pebble: %w", err)
		}
		e, err := decodeEntry(k, v)
		closer.Close()
		if err != nil {
			batch.Close()
			return nil, err
		}
		out = append(out, e)
		if err := batch.Delete(k, nil); err != nil {
			batch.Close()
			return nil, err
		}
	}
	if len(out) == 0 {
		batch.Close()
		return nil, nil
	}
	if err := s.runCommit(func() error {
		defer batch.Close()
		return s.db.Apply(batch, pebbledb.NoSync)
	}); err != nil {
		return nil, err
	}
	s.depth.Add(-int64(len(out)))
	return out, nil
}

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
	held, err := s.locks.acquireAll(ctx, names, s.failed)
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
		if err := batch.Delete(k, nil); err != nil {
			batch.Close()
			return 0, err
		}
		n++
	}
	if n == 0 {
		batch.Close()
		return 0, nil
	}
	if err := s.runCommit(func() error {
		defer batch.Close()
		return s.db.Apply(batch, pebbledb.NoSync)
	}); err != nil {
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
	if err := s.runCommit(func() error {
		defer batch.Close()
		return s.db.Apply(batch, pebbledb.NoSync)
	}); err != nil {
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
	failure := s.failure()
	if failure != nil && (s.pebbleWedged.Load() || s.commits.Load() > 0) {
		return fmt.Errorf("mailbox/pebble: database left open after a failure, the process must exit: %w", failure)
	}
	err := s.db.Close()
	if err != nil {
		err = fmt.Errorf("mailbox/pebble: close: %w", err)
	}
	if failure != nil {
		return errors.Join(failure, err)
	}
	return err
}
