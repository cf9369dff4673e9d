package client

import "sync"

// queue is an unbounded FIFO with a wake-up channel for one consumer.
// Producers never block: the dispatcher's producers include the connection
// reader, which must keep reading (replies too) while Handler works.
type queue[T any] struct {
	mu    sync.Mutex
	items []T
	wake  chan struct{} // has a value when items may be non-empty
}

func newQueue[T any]() *queue[T] {
	return &queue[T]{wake: make(chan struct{}, 1)}
}

func (q *queue[T]) push(v T) {
	q.mu.Lock()
	q.items = append(q.items, v)
	q.mu.Unlock()
	q.poke()
}

func (q *queue[T]) poke() {
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// drain removes and returns everything queued.
func (q *queue[T]) drain() []T {
	q.mu.Lock()
	defer q.mu.Unlock()
	items := q.items
	q.items = nil
	return items
}

// first returns the oldest item without removing it.
func (q *queue[T]) first() (T, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.items) == 0 {
		var zero T
		return zero, false
	}
	return q.items[0], true
}

// dropFirst removes the oldest item.
func (q *queue[T]) dropFirst() {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.items) > 0 {
		var zero T
		q.items[0] = zero
		q.items = q.items[1:]
	}
}
