// Package pebble is the single-node mailbox.Store, kept in a Pebble
// database (github.com/cockroachdb/pebble/v2).
//
// # Layout
//
// Entries are keyed by device then seq, so a device's mailbox is one
// contiguous key range and Read is one bounded iterator. Each device also
// has a high-water key holding the highest seq it was ever given, written
// in the same batch as the entries; it is never deleted, so seqs are not
// reused even after every entry was deleted and the store reopened (it
// costs a few dozen bytes per device ever written to). Idempotency keys are
// stored with their receipt and time. keys.go documents the encoding; the
// testdata/format-v1 fixture pins it, and Pebble's own on-disk format is
// pinned to a named FormatMajorVersion so that upgrading Pebble does not
// ratchet the files without a decision.
//
// # Appends, seqs and visibility
//
// An Append is one Pebble batch, committed with Sync: it returns after the
// WAL holding it has been fsynced. Appends are group-committed twice over:
// the store's committer (commit.go), one goroutine, takes every batch that
// is waiting when it is free, copies them into one Pebble batch and commits
// that with one call (each batch stays atomic: the group is); and Pebble
// writes the groups that arrive while a sync is in flight together and
// shares the next sync among them, while a second goroutine, the syncer,
// waits for each group's sync in order. So concurrent appends cost far
// fewer than one fsync and one trip through Pebble's commit pipeline each.
// StartAppend (mailbox.Sequencer) returns once a batch is queued for the
// committer, with its seqs, and lets the caller wait for its sync later,
// so that one connection can order several sends one after another
// without waiting for each fsync (or for the committer: the locks that
// order a device's batches are the committer's to release).
//
// Seqs need care: readers page through a mailbox with "after seq N", so if
// seq 7 became visible before seq 6, a reader could take 7, move past it,
// and never see 6. The store holds a per-device append lock from reading
// the device's high-water seq until the committer has had Pebble sequence
// and publish the batch's group (DB.ApplyNoSyncWait), and releases it
// before the WAL sync is waited for (Batch.SyncWait, on the syncer). That is enough because Pebble assigns its internal
// sequence numbers, writes the WAL, and makes batches visible all in one
// order: a device's batches therefore become visible, reach the WAL, and
// become durable in seq order, and the high-water key's last write is its
// largest. The lock is held for microseconds, not for an fsync, so appends
// to the same device (a busy group chat) still share syncs. Multi-device
// batches take their locks in sorted order, so they cannot deadlock.
// ApplyNoSyncWait is marked experimental in Pebble (CockroachDB uses it
// for its Raft log); Pebble is pinned, and the conformance suite checks
// the ordering under concurrency.
//
// Pebble makes a synced batch visible before its WAL sync completes (with
// DB.Apply too). Had Read returned such an entry, a device could be shown
// a message that a crash then erased; the sender, never told "accepted",
// resends, the retry is stored under a new server id, and the device shows
// the message twice with nothing to tell the copies apart (the delivery
// checker's SIGKILL runs found exactly this). So each append fences the
// seqs it takes, before its batch can become visible, and lifts the fence
// once the batch is durable or has failed; Read stops below a device's
// lowest fence (fence.go). Readers therefore see only durable entries, and
// a device is notified of new entries only after they are durable anyway.
//
// An idempotency key is locked from the duplicate check until the batch
// is durable, so concurrent duplicates store once and none of them reports
// "accepted" before the first is on disk. Duplicates are answered even when
// the disk is full, since answering them writes nothing.
//
// Delete reads the entries and deletes them in one batch under a
// per-device delete lock (separate from the append lock: deletes touch only
// existing seqs, appends only new ones), so concurrent deletes of the same
// entry return and count it once. Deletes are not synced. A delete that
// needs only the seqs (mailbox.DeleteAppend.SeqsOnly) does not read the
// entries the store knows present: those this process appended and has
// not deleted since, up to Options.LiveEntries of them (live.go).
// StartDeleteAppend (mailbox.DeleteAppender, an acknowledgement and its
// receipts) writes the deletions and the appended entries into one batch,
// taking the items' append locks while it holds the delete lock (no path
// takes them the other way round); with items the batch is synced like an
// append, so the two are durable, or lost, together. Expire scans
// every entry and idempotency key, reading the time at the front of each
// value, so it costs time proportional to everything the store holds: run
// it every hour or so, not per request. Depth is an atomic counter,
// initialised at Open by counting the entry keys (so Open also takes time
// proportional to the entries held).
//
// # What Pebble does when a write fails
//
// Read from Pebble v2.1.7's source (db.go, commit.go, record/log_writer.go,
// version_set.go) and confirmed by this package's tests with
// vfs/errorfs:
//
//   - When a WAL write or fsync fails, every synced batch waiting for that
//     sync gets the error, after it was applied to the memtable and made
//     visible. DB.Apply then calls Logger.Fatalf("pebble: fatal commit
//     error"), and Pebble's default logger calls os.Exit(1): the process
//     dies. (A Logger whose Fatalf returns is worse: Apply then reports
//     success for a batch that is not durable.)
//   - The log writer's error is sticky. Later synced commits get it too, and
//     once the current 32 KiB WAL block fills, the next commit panics inside
//     Pebble while holding the commit pipeline's mutex: every later commit,
//     and DB.Close, blocks forever.
//   - If the failure hits while Pebble rotates the WAL (each time a memtable
//     fills, about every 4 MiB written), it panics between unlocking DB.mu
//     and a deferred unlock of it. That is a fatal runtime error ("unlock of
//     unlocked mutex"), which no recover can catch: the process dies.
//   - A failed MANIFEST write (after a flush or compaction) calls
//     Logger.Fatalf on a background goroutine: the process exits. Failed
//     flushes and compactions themselves are reported and retried.
//
// So Pebble is fail-stop for WAL and MANIFEST I/O errors, and a full disk
// would kill the server. The store therefore:
//
//   - Refuses writes before the disk is full. Append checks that the data
//     directory's file system keeps Options.MinFreeBytes (64 MiB by default)
//     free after the batch; Delete and Expire, which free space, need half
//     of it. The free space is asked with statfs (vfs.FS.GetDiskUsage) at
//     most every 100ms, and the bytes written in between are subtracted.
//     Refusals wrap mailbox.ErrUnavailable, write nothing, and stop when
//     space is freed. The reserve also leaves room for Pebble's flushes and
//     compactions, which need free space to run.
//   - Survives the failures that can be survived. Its Logger panics for the
//     one Fatalf above, which happens on the committing goroutine after
//     Pebble released its locks; every other Fatalf logs and exits as
//     Pebble's default does, since Pebble's state is then half-updated on
//     one of its own goroutines. Commits run on the committer goroutine,
//     which recovers panics, and the caller stops waiting as soon as the
//     store has failed, so an append that reaches Pebble's wedged commit
//     mutex does not hang its caller.
//   - Stops after the first commit failure. Every method then returns an
//     error wrapping mailbox.ErrUnavailable (and the cause, such as
//     syscall.ENOSPC or EIO) until the store is reopened, which in practice
//     means restarting the process. Reads are refused too, because the
//     memtable may hold the failed batch, which must not be delivered as if
//     it had been accepted. Close releases the database if no goroutine is
//     stuck inside Pebble; otherwise it says so and leaves it for the
//     process exit.
//
// Nothing the store acknowledged is lost by any of this. What cannot be
// promised, by this or any store, is the fate of an Append that failed
// because an fsync failed: its bytes may have reached the disk anyway (the
// tests see this when an earlier, successful sync covered them), so after
// a restart it may be present. Retrying with the same Batch.Key resolves it:
// the retry gets either the stored receipt or a fresh append.
package pebble
