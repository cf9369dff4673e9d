// Package mailbox defines the per-device mailbox: the durable, ordered
// queue that holds what was accepted for a device until the device
// acknowledges it. Backends live in sub-packages (pebble for a single node)
// and must pass the mailboxtest conformance suite.
package mailbox

import (
	"context"
	"errors"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/courier-im/courier/internal/ident"
)

// Entry is one item in a device's mailbox.
type Entry struct {
	// Seq is the entry's position in the device's mailbox: greater than
	// zero, strictly increasing in append order within the device, and
	// never reused. Seqs need not be dense, nor private to a device (a
	// backend may number all devices' entries from one sequence).
	Seq uint64
	// Time is when the entry was appended (used for retention).
	Time time.Time
	// Data is opaque to the mailbox (an encoded envelope).
	Data []byte
}

// Item is one entry to append to one device's mailbox.
type Item struct {
	Device ident.Device
	Data   []byte
}

// Batch is a set of appends made durable together, all or nothing.
type Batch struct {
	// Key, when not empty, makes the append idempotent: if a batch with the
	// same key was committed before (and has not expired), nothing is
	// appended and Append returns the Receipt stored with that earlier
	// batch and Duplicate set.
	Key string
	// KeyIsNew says the caller vouches that no earlier batch used Key (the
	// client's first attempt at a message). The store then records Key, so
	// that later retries find it, without looking it up first: a false
	// claim can append the same batch twice. Key must still be set, and a
	// retry of Key made while this batch is in flight must still wait for
	// it and find it, as it would without KeyIsNew. A backend whose
	// duplicate check costs nothing extra may ignore KeyIsNew (jetstream
	// does: its de-duplication is part of the publish).
	KeyIsNew bool
	// Receipt is stored with Key and returned for duplicates (for example
	// the server id and time of the message).
	Receipt []byte
	Items   []Item
	// Time is the append time recorded in every entry; zero means now.
	Time time.Time
}

// Result reports what Append did.
type Result struct {
	// Seqs holds the seq assigned to each item, in order (nil for duplicates).
	Seqs      []uint64
	Duplicate bool
	Receipt   []byte
}

// Store is a mailbox backend. All methods are safe for concurrent use.
type Store interface {
	// Append makes every item of b durable (on stable storage, not just in
	// a page cache) before it returns without error. It is atomic: all
	// items or none. An error means the outcome is unknown to the caller:
	// usually nothing was appended, but an fsync that failed after the
	// write may still have left the batch on disk. Retrying with the same
	// Key is always safe: it appends the batch or reports the earlier one.
	Append(ctx context.Context, b Batch) (Result, error)
	// Read returns up to limit entries of dev's mailbox with Seq > after, in
	// seq order.
	Read(ctx context.Context, dev ident.Device, after uint64, limit int) ([]Entry, error)
	// Delete removes the entries with the given seqs from dev's mailbox and
	// returns those that were present (a seq already deleted or never
	// appended is ignored). Deletes need not be durable before returning: a
	// delete lost in a crash means a redelivery, which clients de-duplicate.
	Delete(ctx context.Context, dev ident.Device, seqs []uint64) ([]Entry, error)
	// Expire removes entries and idempotency keys appended before cutoff,
	// returning how many entries it removed.
	Expire(ctx context.Context, cutoff time.Time) (int, error)
	// Close releases the store; pending appends have been made durable.
	Close() error
}

// Sequencer is an optional capability of a Store: an Append split in two,
// so that a caller can order several appends one after another without
// waiting for each to be durable in turn (a connection with several sends
// in flight). Store.Append must behave as StartAppend followed by Wait.
type Sequencer interface {
	// StartAppend does what Append does up to the point where b is ordered:
	// when it returns without error, every entry of b has its seq, after
	// the seqs of every batch whose StartAppend or Append returned before
	// this call was made (for the same devices), and b will be committed
	// whether or not Wait is called. b may already be visible to Read
	// before it is durable. An error means nothing was appended, or, as
	// for Append, that the outcome is unknown.
	StartAppend(ctx context.Context, b Batch) (Pending, error)
}

// Pending is an append that has been ordered but may not yet be durable.
type Pending interface {
	// Wait returns once the batch is durable, with Append's result and
	// errors, or when ctx is done (the append goes on; the outcome is then
	// unknown to the caller). Wait may be called more than once.
	Wait(ctx context.Context) (Result, error)
}

// DeleteAppender is an optional capability of a Store: a Delete and the
// appends it gives rise to (the receipts of an acknowledgement) as one
// operation, atomic and made durable together: after a crash either the
// entries are gone and the appended items present, or neither.
type DeleteAppender interface {
	// StartDeleteAppend removes the entries of d.Device with the given
	// seqs (as Delete: seqs absent are ignored), passes those it removed
	// to d.Then, and appends the items Then returns in the same atomic
	// write. It returns, once the write is ordered as StartAppend's is, the
	// removed entries in seq order and a Pending for the appended items
	// (their seqs, in order, are the Result's). Nothing is removed or
	// appended when it returns an error, or when Then does.
	//
	// When Then appends nothing, the write need not be durable before Wait
	// returns, as for Delete. Two concurrent calls never remove the same
	// entry, so an entry's items are appended at most once.
	StartDeleteAppend(ctx context.Context, d DeleteAppend) ([]Entry, Pending, error)
}

// DeleteAppend is the work of a DeleteAppender.StartDeleteAppend.
type DeleteAppend struct {
	Device ident.Device
	Seqs   []uint64
	// Then returns the items to append for the entries removed (in seq
	// order, at least one). It is called while the store holds the
	// device's delete lock: it must not call the store. Nil appends
	// nothing.
	Then func(removed []Entry) ([]Item, error)
	// Time is the append time recorded in every item; zero means now.
	Time time.Time
	// SeqsOnly says the caller needs only the seqs of the removed entries
	// (it knows their envelopes): the store may then pass and return
	// entries with Seq alone, and skip reading entries it knows present.
	SeqsOnly bool
}

// ManyDeleteAppender is an optional capability of a Store: StartDeleteAppend
// over the entries of several devices at once, one atomic write whose
// appended items are made from all the entries it removed. It lets the
// acks of many devices that arrive together (the members of a group
// acking one message) become one write and one receipt per recipient
// device, rather than one of each per ack.
type ManyDeleteAppender interface {
	// StartDeleteAppendMany is StartDeleteAppend for d: it removes the
	// entries named by each of d.Deletes, passes those removed to d.Then
	// (removed[i] those of d.Deletes[i]), and appends the items Then
	// returns in the same atomic write. It returns the removed entries
	// (in seq order, per deletion) and a Pending for the appended items.
	// The devices of d.Deletes must be distinct.
	StartDeleteAppendMany(ctx context.Context, d DeleteAppendMany) ([][]Entry, Pending, error)
}

// DeleteAppendMany is the work of a ManyDeleteAppender.StartDeleteAppendMany.
type DeleteAppendMany struct {
	// Deletes name the entries to remove: the Device, Seqs and SeqsOnly of
	// each are used as in DeleteAppend (their Then and Time are not).
	Deletes []DeleteAppend
	// Then returns the items to append for the entries removed (at least
	// one in all), removed[i] being those of Deletes[i]. It is called
	// while the store holds every device's delete lock: it must not call
	// the store. Nil appends nothing.
	Then func(removed [][]Entry) ([]Item, error)
	// Time is the append time recorded in every item; zero means now.
	Time time.Time
}

// Depther is an optional capability: the number of entries held across all
// mailboxes, for the mailbox depth metric.
type Depther interface {
	Depth() int64
}

// Instrumented is an optional capability: metrics of the store's own (such
// as its WAL's fsync latency), which the server registers beside its own.
type Instrumented interface {
	Collectors() []prometheus.Collector
}

// ErrUnavailable wraps errors that mean the store cannot accept writes now
// (disk full, read-only, I/O error). Nothing was appended; the caller may
// retry later.
var ErrUnavailable = errors.New("mailbox: storage unavailable")

// ErrClosed is returned by a closed store.
var ErrClosed = errors.New("mailbox: closed")
