package gateway

import (
	"context"
	"sync"
	"time"

	"github.com/courier-im/courier/internal/accounts"
)

// seenTimeout bounds one batch of last-seen writes.
const seenTimeout = 10 * time.Second

// seenWriter records the last-seen times of users who went offline, in
// batches: a write to the account store is one fsync'd commit, and a
// server shutting down (or a network blip) takes thousands of users
// offline within a second, which one commit each would take tens of
// seconds to record. Disconnects only queue the time; one goroutine writes
// what has queued with one accounts.SetLastSeenBatch, and what queues
// while it writes goes in the next batch. Until its batch is committed a
// time is served from here (lastSeen), so presence never goes back.
type seenWriter struct {
	store accounts.Store
	log   func(msg string, args ...any)

	mu      sync.Mutex
	pending map[string]time.Time // queued, not yet being written
	writing map[string]time.Time // the batch being written
	stopped bool                 // stop has been called: write directly

	kick chan struct{} // cap 1: there is something pending
	stop chan struct{}
	done chan struct{}
}

func newSeenWriter(store accounts.Store, warn func(msg string, args ...any)) *seenWriter {
	w := &seenWriter{
		store: store,
		log:   warn,
		kick:  make(chan struct{}, 1),
		stop:  make(chan struct{}),
		done:  make(chan struct{}),
	}
	go w.run()
	return w
}

// add queues user's last-seen time t.
func (w *seenWriter) add(user string, t time.Time) {
	w.mu.Lock()
	if w.stopped {
		// After the last flush: written here, best effort (the store may
		// be closing).
		w.mu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), seenTimeout)
		defer cancel()
		if err := w.store.SetLastSeen(ctx, user, t); err != nil {
			w.log("record last seen", "user", user, "err", err)
		}
		return
	}
	if w.pending == nil {
		w.pending = map[string]time.Time{}
	}
	if t.After(w.pending[user]) {
		w.pending[user] = t
	}
	w.mu.Unlock()
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

// lastSeen returns the time queued or being written for user, if any.
func (w *seenWriter) lastSeen(user string) (time.Time, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	t, ok := w.pending[user]
	if u, ok2 := w.writing[user]; ok2 && u.After(t) {
		t, ok = u, true
	}
	return t, ok
}

func (w *seenWriter) run() {
	defer close(w.done)
	for {
		select {
		case <-w.kick:
			w.flush()
		case <-w.stop:
			w.flush()
			return
		}
	}
}

// flush writes what is pending as one batch.
func (w *seenWriter) flush() {
	w.mu.Lock()
	batch := w.pending
	w.pending = nil
	w.writing = batch
	w.mu.Unlock()
	if len(batch) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), seenTimeout)
	err := accounts.SetLastSeenBatch(ctx, w.store, batch)
	cancel()
	if err != nil {
		w.log("record last seen", "users", len(batch), "err", err)
	}
	w.mu.Lock()
	w.writing = nil
	w.mu.Unlock()
}

// close writes what is pending and stops the writer; later times are
// written one by one as they come. It waits for the last batch, or for
// ctx to end.
func (w *seenWriter) close(ctx context.Context) error {
	w.mu.Lock()
	first := !w.stopped
	w.stopped = true
	w.mu.Unlock()
	if first {
		close(w.stop)
	}
	select {
	case <-w.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
