package jetstream

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
)

// Limits of one group commit (see the package doc, Group commit). The
// server refuses atomic batches of more than 1000 messages by default
// (max_batch_size); a replicated stream proposes a batch as one Raft entry.
const (
	maxGroupMsgs     = 128
	maxGroupBytes    = 256 << 10
	maxGroupInflight = 2 // groups sent and not yet acknowledged, per Store
)

// errRetryAlone is given to every member of a group the server refused:
// the batch was not stored (an atomic batch is all or nothing), and the
// reason may be any one member (an idempotency key that exists), so each
// member tries again on its own.
var errRetryAlone = errors.New("jetstream mailbox: group refused; retry alone")

// pendingAppend is one Append waiting in a group commit.
type pendingAppend struct {
	ctx   context.Context
	msgs  []outMsg
	key   string // the key subject, or ""
	bytes int
	done  chan groupResult // buffered: the committer never blocks on it
}

type groupResult struct {
	seqs []uint64
	err  error
}

// committer gathers the appends that arrive while earlier ones are being
// committed and writes each gathering as one atomic batch: a group commit.
// Every member still gets all-or-nothing (the group is stored whole or not
// at all) and its own consecutive seqs, and returns only once the group's
// commit was acknowledged, so nothing weaker than a lone batch is promised.
type committer struct {
	s *Store

	mu       sync.Mutex
	queue    []*pendingAppend
	inflight int // running senders, at most maxGroupInflight

	// sent counts groups of more than one append sent; refused those the
	// server refused (their members retried alone).
	sent, refused atomic.Uint64
}

// submit queues msgs (one append) for the next group and waits for its
// outcome. An error is what a lone publish would return, or errRetryAlone
// when the group holding msgs was refused by the server.
func (c *committer) submit(ctx context.Context, msgs []outMsg, key string) ([]uint64, error) {
	p := &pendingAppend{ctx: ctx, msgs: msgs, key: key, done: make(chan groupResult, 1)}
	for _, m := range msgs {
		p.bytes += len(m.subject) + len(m.data) + 64
	}
	c.mu.Lock()
	c.queue = append(c.queue, p)
	start := c.inflight < maxGroupInflight
	if start {
		c.inflight++
		c.s.ops.Add(1) // the caller holds an op, so Close is not past Wait
	}
	c.mu.Unlock()
	if start {
		go c.run()
	}
	select {
	case r := <-p.done:
		return r.seqs, r.err
	case <-ctx.Done():
		// Still queued: the sender drops it unsent. Already sent: the
		// outcome is unknown, as for any append that returns an error.
		return nil, ctx.Err()
	}
}

// run sends groups until the queue is empty.
func (c *committer) run() {
	defer c.s.ops.Done()
	for {
		c.mu.Lock()
		group := c.take()
		if len(group) == 0 {
			c.inflight--
			c.mu.Unlock()
			return
		}
		c.mu.Unlock()
		c.send(group)
	}
}

// take removes the next group from the queue: members in arrival order
// within the size limits, never two with the same key (one of them must be
// refused, and it would take the whole group with it), and not those whose
// caller gave up (they are answered with their context's error, never
// sent). c.mu is held.
func (c *committer) take() []*pendingAppend {
	var (
		group []*pendingAppend
		rest  = c.queue[:0]
		n, sz int
		keys  map[string]bool
	)
	for _, p := range c.queue {
		if err := p.ctx.Err(); err != nil {
			p.done <- groupResult{err: err}
			continue
		}
		fits := len(group) == 0 || n+len(p.msgs) <= maxGroupMsgs && sz+p.bytes <= maxGroupBytes
		if !fits || p.key != "" && keys[p.key] {
			rest = append(rest, p)
			continue
		}
		if p.key != "" {
			if keys == nil {
				keys = map[string]bool{}
			}
			keys[p.key] = true
		}
		group = append(group, p)
		n += len(p.msgs)
		sz += p.bytes
	}
	clear(c.queue[len(rest):])
	c.queue = rest
	return group
}

// send writes one group as one publish (a lone single message) or one
// atomic batch, and answers its members.
func (c *committer) send(group []*pendingAppend) {
	var msgs []outMsg
	if len(group) == 1 {
		msgs = group[0].msgs
	} else {
		for _, p := range group {
			msgs = append(msgs, p.msgs...)
		}
	}
	if len(group) > 1 {
		c.sent.Add(1)
	}
	ctx, cancel := context.WithTimeout(context.Background(), c.s.opts.Timeout)
	seqs, err := c.s.publish(ctx, msgs)
	cancel()
	if err != nil {
		var ae *apiError
		if len(group) > 1 && errors.As(err, &ae) {
			c.refused.Add(1)
			err = fmt.Errorf("%w: %w", errRetryAlone, err)
		}
		for _, p := range group {
			p.done <- groupResult{err: err}
		}
		return
	}
	for _, p := range group {
		p.done <- groupResult{seqs: seqs[:len(p.msgs):len(p.msgs)]}
		seqs = seqs[len(p.msgs):]
	}
}
