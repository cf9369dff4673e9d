package client

import "sync"

// DefaultTrackerLimit is how many messages a Tracker remembers when its
// limit is not set: the oldest are forgotten first.
const DefaultTrackerLimit = 100_000

// Tracker is the receipt state machine: it keeps, per message sent, the
// furthest Status reached, and moves it only forward. A message is found by
// its server id or its client message id, whichever is known; an entry first
// known by one id learns the other when a later reference carries both.
//
// Receipts are delivered at least once and in no particular order with
// respect to each other, so a Tracker is what makes them harmless: Advance
// reports whether anything changed, and duplicates and late arrivals (a
// "delivered" after a "read") change nothing.
//
// The zero Tracker is ready to use, with DefaultTrackerLimit. A Tracker is
// safe for concurrent use.
type Tracker struct {
	// Limit bounds the messages remembered (DefaultTrackerLimit if zero).
	// Set it before first use.
	Limit int

	mu       sync.Mutex
	byServer map[string]*trackEntry
	byClient map[string]*trackEntry
	order    []*trackEntry // oldest first from head; may hold dropped entries
	head     int
	live     int
}

type trackEntry struct {
	ref     MessageRef
	peer    string
	status  Status
	dropped bool
}

// Track registers a message that is about to be sent, as StatusPending,
// with the peer it is addressed to. Tracking a known message changes only
// what was unknown about it.
func (t *Tracker) Track(ref MessageRef, peer string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	e := t.find(ref, true)
	if e == nil {
		return
	}
	if e.peer == "" {
		e.peer = peer
	}
	e.status = max(e.status, StatusPending)
}

// Advance moves the message named by ref to s if s is further than where it
// stands, and reports whether it moved. An unknown message starts out
// unknown, so its first Advance always moves it.
func (t *Tracker) Advance(ref MessageRef, s Status) bool {
	if s < StatusPending {
		return false
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	e := t.find(ref, true)
	if e == nil || s <= e.status {
		return false
	}
	e.status = s
	return true
}

// Status returns where the message with this server id or client message
// id stands, or StatusUnknown.
func (t *Tracker) Status(id string) Status {
	t.mu.Lock()
	defer t.mu.Unlock()
	if e := t.lookup(id); e != nil {
		return e.status
	}
	return StatusUnknown
}

// Peer returns the peer recorded for the message with this server id or
// client message id, or "".
func (t *Tracker) Peer(id string) string {
	t.mu.Lock()
	defer t.mu.Unlock()
	if e := t.lookup(id); e != nil {
		return e.peer
	}
	return ""
}

// Forget drops the message with this server id or client message id.
func (t *Tracker) Forget(id string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if e := t.lookup(id); e != nil {
		t.drop(e)
	}
}

func (t *Tracker) lookup(id string) *trackEntry {
	if e := t.byServer[id]; e != nil {
		return e
	}
	return t.byClient[id]
}

// find returns the entry for ref, merging what ref teaches (an id the
// entry lacked; two entries that turn out to be one message), and creates
// it, with StatusUnknown, if create is set. t.mu is held.
func (t *Tracker) find(ref MessageRef, create bool) *trackEntry {
	if ref.ServerID == "" && ref.ClientMsgID == "" {
		return nil
	}
	if t.byServer == nil {
		t.byServer = map[string]*trackEntry{}
		t.byClient = map[string]*trackEntry{}
	}
	var bs, bc *trackEntry
	if ref.ServerID != "" {
		bs = t.byServer[ref.ServerID]
	}
	if ref.ClientMsgID != "" {
		bc = t.byClient[ref.ClientMsgID]
	}
	e := bs
	switch {
	case bs != nil && bc != nil && bs != bc:
		// Known twice: first by server id alone (a receipt), and by client id
		// alone (the outbox). Keep one entry with the furthest state.
		bs.status = max(bs.status, bc.status)
		if bs.peer == "" {
			bs.peer = bc.peer
		}
		t.drop(bc)
	case bs == nil && bc != nil:
		e = bc
	case bs == nil && bc == nil:
		if !create {
			return nil
		}
		e = &trackEntry{status: StatusUnknown}
		t.order = append(t.order, e)
		t.live++
		t.evict()
	}
	if ref.ServerID != "" && e.ref.ServerID == "" {
		e.ref.ServerID = ref.ServerID
		t.byServer[ref.ServerID] = e
	}
	if ref.ClientMsgID != "" && e.ref.ClientMsgID == "" {
		e.ref.ClientMsgID = ref.ClientMsgID
		t.byClient[ref.ClientMsgID] = e
	}
	return e
}

func (t *Tracker) drop(e *trackEntry) {
	if e.dropped {
		return
	}
	e.dropped = true
	t.live--
	if e.ref.ServerID != "" && t.byServer[e.ref.ServerID] == e {
		delete(t.byServer, e.ref.ServerID)
	}
	if e.ref.ClientMsgID != "" && t.byClient[e.ref.ClientMsgID] == e {
		delete(t.byClient, e.ref.ClientMsgID)
	}
}

// evict forgets the oldest entries beyond the limit, and compacts order
// when dropped entries take most of it (amortised O(1) per entry).
func (t *Tracker) evict() {
	limit := t.Limit
	if limit <= 0 {
		limit = DefaultTrackerLimit
	}
	for t.live > limit && t.head < len(t.order) {
		t.drop(t.order[t.head])
		t.order[t.head] = nil
		t.head++
	}
	if n := len(t.order) - t.head; t.head > n || n > 2*t.live+16 {
		kept := make([]*trackEntry, 0, t.live+1)
		for _, e := range t.order[t.head:] {
			if !e.dropped {
				kept = append(kept, e)
			}
		}
		t.order, t.head = kept, 0
	}
}
