package gateway

import (
	"cmp"
	"slices"
	"sync"
	"time"

	"github.com/courier-im/courier/internal/delivery"
	"github.com/courier-im/courier/internal/ident"
)

// Delivery from the append.
//
// When this process makes an entry durable for a device connected here,
// delivery hands the entry (seq and encoded envelope, shared read-only)
// to the connection with the notification (NotifyEntry), and a connection
// that has sent everything before it writes it without reading its
// mailbox. The mailbox stays the source of truth: a connection reads it
// when it connects, and whenever a handed entry is not exactly the next
// one it owes the device. A handed entry is used only if
//
//   - the connection is caught up: its last mailbox read found fewer
//     entries than it asked for, and nothing since has asked for a read
//     (Notify without an entry, a handed entry it could not use, a full
//     window, a full queue);
//   - its seq is lastSent+1: no entry can lie between the last one sent
//     and it, and it has not been sent (seqs of a device only grow);
//     concurrent appends to one device may complete, and be handed, out
//     of order: a queue is sorted before use, and a gap means a read;
//   - the window has room; and
//   - its append began after the connection's first mailbox read began.
//     An entry durable before that may have been delivered by an earlier
//     connection of the device and acked (deleted) since, and a
//     notification can be late (its goroutine descheduled between the
//     append's end and NotifyEntry): the new connection's read, which no
//     longer finds the entry, is what counts, not the late hand.
//
// Entries with seq at or below lastSent were sent already (by a read that
// found them first) and are dropped. Anything else falls back to a read,
// which finds the entry too, since it is durable: unless an earlier entry
// of the device is not durable yet, as a mailbox may stop its reads below
// such an entry (the Pebble store's read fence). So the connection counts
// itself caught up only once it has sent up to the highest seq it dropped
// (owed); until then every notification, the one of that earlier entry
// included, makes it read.

// handQueue bounds the entries waiting in a connection's handoff; past it
// they are dropped and the connection reads its mailbox instead.
const handQueue = 64

// handoff holds the entries handed to a connection until its writer (or,
// on the epoll transport, its pump) takes them. An idle connection holds
// no queue: queues come from handBufs and go back once taken.
type handoff struct {
	mu    sync.Mutex
	q     *[]delivery.StoredEntry // handed, not yet taken (guarded by mu)
	stale bool                    // the mailbox may hold entries q does not (guarded by mu)

	// The consumer's (writer's or pump's) own state.
	caughtUp bool                    // see above; false until the first read found the end
	idle     bool                    // no read is owed: the last found the end, and nothing asked for one since
	taken    *[]delivery.StoredEntry // the queue it took last, until done
	owed     uint64                  // the highest seq handed and not used
	since    int64                   // monoOf the time the first mailbox read began; 0: none yet
}

// handBufs holds the queues of connections that have nothing handed.
var handBufs = sync.Pool{New: func() any {
	q := make([]delivery.StoredEntry, 0, 8)
	return &q
}}

// monoEpoch is the origin of monoOf.
var monoEpoch = time.Now()

// monoOf returns t as nanoseconds on the monotonic clock since monoEpoch,
// plus one (so never 0 for a time after it).
func monoOf(t time.Time) int64 { return int64(t.Sub(monoEpoch)) + 1 }

// hand queues e for the consumer. It never blocks.
func (h *handoff) hand(e delivery.StoredEntry) {
	h.mu.Lock()
	if h.q == nil {
		h.q = handBufs.Get().(*[]delivery.StoredEntry)
	}
	if len(*h.q) < handQueue {
		*h.q = append(*h.q, e)
	} else {
		h.stale = true
	}
	h.mu.Unlock()
}

// markStale records that the mailbox has entries that were not handed.
func (h *handoff) markStale() {
	h.mu.Lock()
	h.stale = true
	h.mu.Unlock()
}

// next takes the entries handed since it was last called and returns
// those the connection may send now without reading its mailbox, in seq
// order, given the last seq it sent and the room in its window, and
// whether the mailbox must be read (for the others, or because something
// asked for a read). The entries are the consumer's until it calls done.
func (h *handoff) next(lastSent uint64, room int) ([]delivery.StoredEntry, bool) {
	h.mu.Lock()
	qp, stale := h.q, h.stale
	h.q, h.stale = nil, false
	h.mu.Unlock()
	if stale {
		h.caughtUp, h.idle = false, false
	}
	if qp == nil {
		return h.usable(nil, lastSent, room)
	}
	h.taken = qp
	q := *qp
	if len(q) > 1 {
		slices.SortFunc(q, func(a, b delivery.StoredEntry) int { return cmp.Compare(a.Seq, b.Seq) })
	}
	return h.usable(q, lastSent, room)
}

// done gives the queue next took back, without the references it held
// (the shared envelope bytes), so that an idle connection keeps none.
func (h *handoff) done() {
	if qp := h.taken; qp != nil {
		clear(*qp)
		*qp = (*qp)[:0]
		handBufs.Put(qp)
		h.taken = nil
	}
}

// reading records that the consumer is about to read the mailbox.
func (h *handoff) reading() {
	if h.since == 0 {
		h.since = monoOf(time.Now())
	}
}

// readDone records what a mailbox read found: the end of the mailbox
// (fewer entries than asked for), or not, with lastSent the last seq sent
// after it. At the end no read is owed until something asks for one, even
// if the connection is not caught up (it owes a dropped entry the read did
// not find): the notification of what it waits for will ask.
func (h *handoff) readDone(atEnd bool, lastSent uint64) {
	h.idle = atEnd
	h.caughtUp = atEnd && lastSent >= h.owed
}

// drop records that the entries of hs are not used: the mailbox must be
// read up to them.
func (h *handoff) drop(hs []delivery.StoredEntry) {
	for _, e := range hs {
		h.owed = max(h.owed, e.Seq)
		h.idle = false
	}
}

// usable returns the leading entries of hs (taken, sorted) that the
// connection may send without reading its mailbox, given the last seq it
// sent and the room in its window, and whether the mailbox must be read
// for the rest. It reuses hs.
func (h *handoff) usable(hs []delivery.StoredEntry, lastSent uint64, room int) ([]delivery.StoredEntry, bool) {
	if !h.caughtUp {
		h.drop(hs)
		return hs[:0], !h.idle
	}
	out := hs[:0]
	next := lastSent
	for i, e := range hs {
		if e.Seq <= next {
			continue // sent already, or handed twice
		}
		if e.Seq != next+1 || len(out) == room || monoOf(e.Began) <= h.since {
			h.caughtUp, h.idle = false, false
			h.drop(hs[i:])
			return out, true
		}
		out = append(out, e)
		next = e.Seq
	}
	return out, false
}

// NotifyEntry implements delivery.EntryNotifier: Notify, handing the
// entry to dev's connection (handoff.go). It never blocks.
func (g *Gateway) NotifyEntry(dev ident.Device, e delivery.StoredEntry) {
	g.mu.Lock()
	c := g.connLocked(dev)
	g.mu.Unlock()
	if c != nil {
		c.hand.hand(e)
		if e.Few && c.gr == nil {
			c.pumpHere()
			return
		}
		c.poke()
	}
}

var _ delivery.EntryNotifier = (*Gateway)(nil)
