package client

import "sync"

// SeenStore remembers the server ids of mailbox entries (messages and
// receipts) the application has handled, so that an entry delivered again
// (delivery is at least once) is acknowledged without being reported twice.
// A persistent SeenStore extends that across restarts.
//
// MarkSeen is called after Config.Handler has returned for the entry and
// before the entry is acknowledged. Implementations must be safe for
// concurrent use.
type SeenStore interface {
	Seen(serverID string) (bool, error)
	MarkSeen(serverID string) error
}

// DefaultSeenLimit is how many server ids the default in-memory SeenStore
// remembers; the oldest are forgotten first.
const DefaultSeenLimit = 100_000

// NewMemorySeen returns an in-memory SeenStore that remembers the last
// limit ids (DefaultSeenLimit if limit <= 0). It is the default; it forgets
// everything when the process ends.
func NewMemorySeen(limit int) SeenStore {
	if limit <= 0 {
		limit = DefaultSeenLimit
	}
	return &memSeen{limit: limit, set: map[string]struct{}{}}
}

type memSeen struct {
	mu    sync.Mutex
	limit int
	set   map[string]struct{}
	ring  []string // insertion order, used as a ring once full
	next  int
}

func (m *memSeen) Seen(id string) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	_, ok := m.set[id]
	return ok, nil
}

func (m *memSeen) MarkSeen(id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.set[id]; ok {
		return nil
	}
	m.set[id] = struct{}{}
	if len(m.ring) < m.limit {
		m.ring = append(m.ring, id)
		return nil
	}
	delete(m.set, m.ring[m.next])
	m.ring[m.next] = id
	m.next = (m.next + 1) % m.limit
	return nil
}
