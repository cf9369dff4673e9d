// Package jetstream is the clustered mailbox.Store, kept in one NATS
// JetStream stream (github.com/nats-io/nats.go, nats-server 2.12 or newer).
//
// # Layout
//
// One stream (Options.Stream, default COURIER_MAILBOX; file storage,
// Options.Replicas replicas, limits retention, AllowDirect and
// AllowAtomicPublish on, DenyPurge) holds two kinds of subjects under
// Options.SubjectPrefix (default courier.mailbox):
//
//   - <prefix>.d.<user>.<id>: a device's mailbox, one message per entry.
//     User names are [a-z0-9_-] (ident.ValidUser, checked on every call),
//     so they are safe subject tokens, and "d" keeps devices apart from
//     keys whatever a user is called.
//   - <prefix>.k.<hex SHA-256 of the key>: an idempotency key; the body is
//     the batch's Receipt.
//
// Every message carries a Courier-Time header: the batch's append time in
// Unix nanoseconds (Batch.Time, which callers may set, so it is not the
// stream's own timestamp). The body of an entry is Item.Data, untouched.
//
// # Seqs
//
// An entry's seq is its stream sequence. Stream sequences are shared by all
// devices, start at 1, only grow, and are never reused, even after every
// message was deleted, the stream was reopened, or a server crashed (the
// stream's last sequence is part of its recovered state), which is all the
// interface asks. Nothing per device needs to be stored.
//
// # Appends and atomicity
//
// A batch of one message (one item without a key, or a key without items)
// is one JetStream publish. A larger batch is one atomic batch publish
// (ADR-50; nats-server 2.12): the messages carry Nats-Batch-Id (a NUID),
// Nats-Batch-Sequence 1..n, and the last one Nats-Batch-Commit: 1. nats.go
// has no API for it, so the store speaks the header protocol itself:
// messages 1..n-1 are published without a reply subject (a failure among
// them makes the commit fail as an incomplete batch) and only the commit
// waits for its acknowledgement. The server stages the batch and then
// stores all of it or none, under consecutive sequences (the stream
// processes its inbound messages on one goroutine and commits a batch
// while holding its isolation lock; on a replicated stream the batch is
// one multi-entry Raft proposal), so the commit's ack (last seq, count)
// gives every item's seq. The conformance suite checks that Result.Seqs
// name the entries under 32 concurrent writers. Direct gets take the same
// isolation lock, so no reader sees part of a batch.
//
// The server allows 50 open (started, uncommitted) atomic batches per
// stream by default (jetstream { limits { max_batch_inflight_per_stream }}).
// A Store writes each batch's messages back to back under a mutex, so the
// server sees at most one open batch per Store connection at a time;
// deployments with more than ~50 courier nodes on one stream must raise
// the limit. A batch holds at most 1000 messages (max_batch_size).
//
// Append returns after the commit (or single publish) was acknowledged.
// An error leaves the outcome unknown (a lost ack); retrying with the same
// Key resolves it, as the interface says.
//
// # Group commit
//
// nats-server 2.14 commits a stream's atomic batches one at a time, and on
// an R1 file stream stages each batch in a temporary file store of its own
// (a directory, a metadata file and a block, created and removed per
// batch): about 2 ms of file-system work per batch, more than the fsync of
// its messages. So the Store commits every append that needs a batch (a
// keyed append, or more than one item) through a group commit: appends
// that arrive while earlier groups are being committed (at most 2 groups
// in flight per Store) queue up, and the next group takes them in arrival
// order (up to 128 messages and 256 KiB, never two with the same key) and
// writes them as one atomic batch, each append's messages contiguous. The
// commit's ack gives the group's last seq, hence every member's seqs. Each
// member returns only after the group's commit was acknowledged (by the
// stream's quorum on a replicated stream), and is stored whole or not at
// all like the group: grouping promises nothing weaker than a batch of its
// own. What it changes is that members share fate: when the server
// refuses a group (a member's key exists, or any other error answered by
// the server, which means nothing of the group was stored), every member
// retries on its own, as below. When the ack is lost (timeout, connection
// closed), every member gets the error, and its outcome is unknown, as for
// a lone append. An append whose caller gives up while it is still queued
// is dropped unsent. A single item without a key stays one plain publish
// (cheaper for the server than any batch, and pipelined on the connection
// with every other request). Groups are kept small because the server
// holds the stream's lock while it commits a batch, writing and fsyncing
// its messages one by one, and reads wait for it: with groups of up to 512
// messages and R3 reads made entirely through the leader (see Reads), the
// readers of the conformance suite's ConcurrentWriters test (32 writers)
// hit the 10 s call timeout now and then on this loaded machine.
//
// Two appends with one key never share a group: one of them must be
// refused, and it must not take the others down with it.
//
// # Idempotency keys
//
// JetStream's own Nats-Msg-Id de-duplication lasts only the duplicate
// window (2 minutes by default) and is not supported inside atomic
// batches, so keys are messages of their own, on the key subject, written
// inside the same atomic batch as the entries with the header
// Nats-Expected-Last-Subject-Sequence: 0: the server stores the batch only
// if that subject holds no message. So a keyed append is sent straight
// away, without looking the key up first (duplicates are rare: client
// retries after a lost ack). When the server refuses it (error 10071, or
// 10164 while an append with that key is in flight) or refuses its group,
// Append looks the key up through the stream leader
// ($JS.API.STREAM.MSG.GET), which sees every committed write: found, it
// returns Duplicate and the stored receipt; absent, it publishes the
// batch on its own, and on another conflict looks again after a short
// pause that grows, until it finds the winner's receipt or its own publish
// succeeds (if the winner failed). A key lives until Expire or MaxAge
// removes it; deleting entries does not touch it.
//
// # Reads
//
// On a single-replica stream Read is a batched direct get
// ($JS.API.DIRECT.GET.<stream> with seq = after+1, next_by_subj = the
// device subject, batch = limit, at most 1024 messages and 4 MiB per
// request, repeated while the server reports more): one round trip for a
// typical page, served from the per-subject index without a consumer.
// nats.go has no batched direct get, so this is spoken directly (a 204 EOB
// status ends the batch, 404 means nothing). Direct gets take the stream's
// isolation lock, so no reader sees part of an atomic batch.
//
// On a replicated stream every current replica answers direct gets (they
// share a queue group), and a replica can be behind the leader, or ahead
// of it (a follower may apply a committed entry before the leader does).
// Each replica applies the log in order, so a direct get's answer is
// always a prefix of the device's mailbox and a reader paging with "after"
// never skips an entry; but a Read right after an Append may miss it, and
// a later Read may return fewer entries than an earlier one. The
// conformance suite's ConcurrentWriters test (monotonic reads) fails that
// way on R3 (checked while writing this package). So by default Read on a
// replicated stream checks the replica's answer against the stream leader
// ($JS.API.STREAM.MSG.GET), which answers after applying in order and
// acknowledges appends only after applying them: after the batched direct
// get, one leader request for the device's last entry (last_by_subj),
// whose seq L the answer is compared with. Both are prefixes of one log,
// so the replica's entries up to min(its last, L) are exactly the
// leader's (but for deletes one of them applied first: an entry being
// deleted may show or not). If the replica's answer ends at L, or fills
// the page below L, it is the leader's; if it goes past L (the replica is
// ahead), the entries past L are dropped; if it ends before L (the
// replica is behind), the rest is read from the leader, one message per
// request (that API has no batch), from where the replica stopped. So a
// Read costs two round trips plus one per entry the answering replica
// lacked, sees every returned Append, and never shrinks while the leader
// stays the same. (Before, every entry was read through the leader, one
// round trip each: a Read of a few hundred entries under load could take
// seconds.) Options.StaleReads skips the leader check, for callers that
// re-read on their next trigger anyway. Lookups that must be current (a
// key after a conflict, entries a Delete's direct get did not find) always
// go to the leader.
//
// # Delete
//
// Delete reads the requested seqs that belong to the device (one batched
// direct get from the lowest seq, then the leader for any it missed), and
// then deletes each with $JS.API.STREAM.MSG.DELETE (no_erase), in parallel.
// Only a delete the server reports as having removed the message returns
// its entry, so concurrent deletes of the same entry return it exactly
// once. A seq on another device's subject is ignored. Deletes are
// acknowledged by the stream's quorum but, like appends, reach the disk
// per the server's sync setting (the interface does not need them durable).
//
// # Expire and MaxAge
//
// Expire(cutoff) scans the whole stream in batched direct gets and deletes
// every message, entry or key, whose Courier-Time is before cutoff,
// returning how many entries it removed. It costs a read of everything the
// stream holds (and one delete request per expired message), like the
// single-node store's scan: run it rarely. In production set
// Options.MaxAge to the retention period: the server then removes entries
// and keys older than that by itself (by the time it stored them, which is
// the append time unless the caller back-dated Batch.Time), and Expire
// only has to catch back-dated batches. The conformance suite's Expire
// test (back-dated times, exact cutoff semantics) is satisfied by Expire
// itself, with MaxAge unset.
//
// # Depth
//
// Depth creates a consumer filtered on <prefix>.d.*.* (R1, in memory, no
// acks, deleted straight after) and returns its pending count, which the
// server computes from its subject index without reading messages: the
// entries of every device, written by any Store on the stream. A count is
// reused for Options.DepthCacheTTL (1s) while this Store wrote nothing.
//
// # Durability: what "accepted" means
//
// A JetStream publish ack (and an atomic batch's commit ack) is sent after
// the stream leader applied the message, and on a replicated stream only
// after a quorum of replicas stored it in their Raft logs. Whether
// "stored" means "on stable storage" is the server's sync setting, which a
// client cannot see:
//
//   - By default nats-server fsyncs its stream files every 2 minutes
//     (jetstream { sync_interval: 2m }). An ack then means the message is in
//     the page cache of a quorum of servers: it survives process crashes and
//     the loss of a minority of machines, but a simultaneous power cut of a
//     quorum (one rack, one zone) can lose up to the last interval.
//   - With jetstream { sync_interval: always } every message is fsynced
//     before it is acknowledged: what mailbox.Store's contract ("on stable
//     storage, not just in a page cache") literally requires.
//
// Courier requires sync_interval: always for an R1 stream (a single
// server: there is no other copy). For R3 in production, courier requires
// the three replicas in different failure domains, and sync_interval:
// always unless the operator accepts the correlated-power-loss window
// above; deploy/ should set it explicitly either way. The cost is real:
// nats-server 2.14 does not group-commit fsyncs across publishes, so a
// stream with sync_interval: always takes about one fsync per message
// whatever the concurrency (BenchmarkAppend on this machine: ~1.8k
// single-item appends/s from 1 appender, ~2.3k from 64, against ~15k and
// ~57k with the default sync).
//
// Atomic batches cost more than their messages: on an R1 file-backed
// stream the server stages every batch in a temporary file store of its
// own, about 2 ms per batch here whatever the sync setting, and batches of
// one stream are committed one at a time. On a replicated stream the
// staging is in memory and the batch is one Raft proposal. Every keyed
// append with items is an atomic batch (entries + key), so keyed appends,
// courier's common case, are bounded by this per batch, and the group
// commit (above) spreads one batch's cost over every append waiting: with
// sync_interval: always, BenchmarkAppendDurable's keyed appends went from
// ~370 to ~760 a second with 16 appenders and from ~300 to ~840 with 64
// (medians of 5 on a shared machine; docs/performance.md has the figures
// and commands). The messages themselves are still fsynced one by one by
// the server.
//
// The tests run in-process servers with SyncAlways (sync_interval:
// always). Crash is simulated by copying the running server's store
// directory (the image a kill -9 leaves; with SyncAlways also what a power
// cut leaves, since nothing acknowledged is only in the page cache),
// shutting the server down, and starting a new one on the copy.
//
// # Server version
//
// Open refuses a server older than 2.12 (ErrServerTooOld), checked from
// the connected server's version and again from the stream configuration
// the server returns (a 2.11 stream leader in a mixed cluster drops
// AllowAtomicPublish). The Store does not own the connection: Close waits
// for running calls and leaves it open.
package jetstream
