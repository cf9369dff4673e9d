package jetstream

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"
)

// Defaults for Options.
const (
	DefaultStream        = "COURIER_MAILBOX"
	DefaultSubjectPrefix = "courier.mailbox"
	DefaultTimeout       = 10 * time.Second
	DefaultDepthCacheTTL = time.Second
)

// MinServerVersion is the oldest nats-server the store works with: atomic
// batch publish (AllowAtomicPublish) arrived in 2.12.
const MinServerVersion = "2.12.0"

// ErrServerTooOld is returned by Open when the server (or the stream's
// servers) cannot do atomic batch publishes.
var ErrServerTooOld = errors.New("jetstream mailbox: nats-server " + MinServerVersion + " or newer is required (atomic batch publish)")

// Options configure a Store.
type Options struct {
	// Stream is the JetStream stream's name. Default DefaultStream.
	Stream string
	// SubjectPrefix is the first token(s) of every subject the stream holds
	// (see the package doc). Default DefaultSubjectPrefix. It must not
	// overlap another stream's subjects.
	SubjectPrefix string
	// Replicas is the stream's replication factor: 1 (default) for a
	// single server, 3 in production.
	Replicas int
	// MaxAge, when positive, is the stream's MaxAge: the server removes
	// messages older than this (by the time the server stored them) on its
	// own, entries and idempotency keys alike. Zero keeps messages until
	// Delete or Expire.
	MaxAge time.Duration
	// Timeout bounds each call whose context has no deadline. Default
	// DefaultTimeout.
	Timeout time.Duration
	// DepthCacheTTL is how long Depth reuses a count when this Store has
	// written nothing since (other Stores sharing the stream may have).
	// Default DefaultDepthCacheTTL.
	DepthCacheTTL time.Duration
	// StaleReads makes Read on a replicated stream a batched direct get,
	// answered by any current replica (one round trip per page), without
	// checking it against the stream leader (one more round trip, and one
	// per entry the replica lacked; see the package doc, Reads). A
	// replica can be behind the leader or ahead of it, so such a Read may
	// miss entries an Append already returned, and a later Read may return
	// fewer than an earlier one; it never skips an entry (see the package
	// doc). Ignored for one replica, where the direct get is exact.
	StaleReads bool
	// Logger receives warnings (a Depth that failed). Default slog.Default().
	Logger *slog.Logger
}

// Store is a mailbox.Store kept in a NATS JetStream stream. See the package
// documentation for the design.
type Store struct {
	nc     *nats.Conn
	js     jetstream.JetStream
	stream jetstream.Stream
	name   string
	subj   subjects
	opts   Options
	log    *slog.Logger
	mux    *replyMux
	groups *committer

	replicated bool // the stream has more than one replica

	// batchMu keeps the messages of one atomic batch contiguous on the
	// connection, so that the server sees at most one of this Store's
	// batches open at a time (it limits open batches per stream).
	batchMu sync.Mutex

	// ops counts running calls; Close waits for them.
	mu     sync.Mutex
	closed bool
	ops    sync.WaitGroup

	gen        atomic.Uint64 // bumped by every write of this Store
	depthMu    sync.Mutex
	depthVal   int64
	depthGen   uint64
	depthAt    time.Time
	depthValid bool
}

var (
	_ mailbox.Store   = (*Store)(nil)
	_ mailbox.Depther = (*Store)(nil)
)

// Open creates the stream if it does not exist (or updates its
// configuration) and returns a Store on it. nc stays the caller's: Close
// does not close it.
func Open(ctx context.Context, nc *nats.Conn, opts Options) (*Store, error) {
	if opts.Stream == "" {
		opts.Stream = DefaultStream
	}
	if opts.SubjectPrefix == "" {
		opts.SubjectPrefix = DefaultSubjectPrefix
	}
	if opts.Replicas == 0 {
		opts.Replicas = 1
	}
	if opts.Timeout <= 0 {
		opts.Timeout = DefaultTimeout
	}
	if opts.DepthCacheTTL == 0 {
		opts.DepthCacheTTL = DefaultDepthCacheTTL
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Replicas < 1 || opts.Replicas > 5 {
		return nil, fmt.Errorf("jetstream mailbox: Replicas %d: want 1 to 5", opts.Replicas)
	}
	for _, tok := range strings.Split(opts.SubjectPrefix, ".") {
		if tok == "" || strings.ContainsAny(tok, " \t\r\n*>") {
			return nil, fmt.Errorf("jetstream mailbox: bad SubjectPrefix %q", opts.SubjectPrefix)
		}
	}
	if v := nc.ConnectedServerVersion(); !serverVersionAtLeast(v, 2, 12) {
		return nil, fmt.Errorf("%w: connected to %s", ErrServerTooOld, v)
	}
	ctx, cancel := withTimeout(ctx, opts.Timeout)
	defer cancel()

	js, err := jetstream.New(nc)
	if err != nil {
		return nil, err
	}
	subj := subjects{opts.SubjectPrefix}
	cfg := jetstream.StreamConfig{
		Name:               opts.Stream,
		Description:        "courier mailboxes",
		Subjects:           []string{subj.devices(), subj.keys()},
		Retention:          jetstream.LimitsPolicy,
		Discard:            jetstream.DiscardOld,
		Storage:            jetstream.FileStorage,
		Replicas:           opts.Replicas,
		MaxAge:             opts.MaxAge,
		AllowDirect:        true,
		AllowAtomicPublish: true,
		DenyPurge:          true,
	}
	stream, err := js.CreateOrUpdateStream(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("jetstream mailbox: create stream %s: %w", opts.Stream, err)
	}
	got := stream.CachedInfo().Config
	if !got.AllowAtomicPublish {
		// A server older than 2.12 leading the stream drops the field.
		return nil, fmt.Errorf("%w: stream %s does not allow atomic publish", ErrServerTooOld, opts.Stream)
	}
	if !got.AllowDirect {
		return nil, fmt.Errorf("jetstream mailbox: stream %s does not allow direct gets", opts.Stream)
	}
	mux, err := newReplyMux(nc)
	if err != nil {
		return nil, err
	}
	s := &Store{
		nc: nc, js: js, stream: stream, name: opts.Stream, subj: subj,
		opts: opts, log: opts.Logger, mux: mux, replicated: got.Replicas > 1,
	}
	s.groups = &committer{s: s}
	if err := s.waitReady(ctx); err != nil {
		_ = mux.close()
		return nil, err
	}
	return s, nil
}

// waitReady returns once the stream's leader answers a request. A stream
// just created (or whose leader just failed) has none for a moment: its
// replicas elect one, and the leader's interest in the stream's subjects
// reaches the server nc is connected to, after which publishes stop
// meeting "no responders". The leader subscribes to those subjects before
// it answers as leader, and both travel the same route to nc's server, so
// an answer from the leader means publishes reach it too.
func (s *Store) waitReady(ctx context.Context) error {
	probe := directGetRequest{LastFor: s.subj.key("courier-ready-probe")}
	pause := 10 * time.Millisecond
	for {
		tctx, cancel := context.WithTimeout(ctx, time.Second)
		_, _, err := s.mux.leaderGet(tctx, s.name, probe)
		cancel()
		if err == nil {
			return nil
		}
		var ae *apiError
		if errors.As(err, &ae) && !ae.transient() {
			return fmt.Errorf("jetstream mailbox: stream %s: %w", s.name, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w: jetstream mailbox: stream %s has no leader: %w (last: %v)", mailbox.ErrUnavailable, s.name, ctx.Err(), err)
		case <-time.After(pause):
		}
		pause = min(2*pause, 200*time.Millisecond)
	}
}

func withTimeout(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, d)
}

// enter starts a call: it fails on a closed store or a done context.
func (s *Store) enter(ctx context.Context) (context.Context, func(), error) {
	if err := ctx.Err(); err != nil {
		return nil, nil, err
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, nil, mailbox.ErrClosed
	}
	s.ops.Add(1)
	s.mu.Unlock()
	ctx, cancel := withTimeout(ctx, s.opts.Timeout)
	return ctx, func() { cancel(); s.ops.Done() }, nil
}

// wrapErr marks errors that mean the stream could not take the operation.
func wrapErr(err error) error {
	if err == nil || errors.Is(err, mailbox.ErrUnavailable) {
		return err
	}
	var ae *apiError
	if errors.As(err, &ae) && ae.transient() {
		return fmt.Errorf("%w: %w", mailbox.ErrUnavailable, err)
	}
	if errors.Is(err, nats.ErrConnectionClosed) || errors.Is(err, nats.ErrConnectionDraining) {
		return fmt.Errorf("%w: %w", mailbox.ErrUnavailable, err)
	}
	return err
}

// outMsg is one message of an append.
type outMsg struct {
	subject string
	data    []byte
	ts      string // Courier-Time: the append's time, encodeTime
	expNone bool   // the subject must hold no message (idempotency key)
}

// Append implements mailbox.Store.
func (s *Store) Append(ctx context.Context, b mailbox.Batch) (mailbox.Result, error) {
	ctx, done, err := s.enter(ctx)
	if err != nil {
		return mailbox.Result{}, err
	}
	defer done()
	if len(b.Items) == 0 && b.Key == "" {
		return mailbox.Result{}, nil
	}
	for _, it := range b.Items {
		if err := validDevice(it.Device); err != nil {
			return mailbox.Result{}, err
		}
	}
	when := b.Time
	if when.IsZero() {
		when = time.Now()
	}
	ts := encodeTime(when)
	msgs := make([]outMsg, 0, len(b.Items)+1)
	for _, it := range b.Items {
		msgs = append(msgs, outMsg{subject: s.subj.device(it.Device), data: it.Data, ts: ts})
	}
	if b.Key == "" {
		var seqs []uint64
		if len(msgs) == 1 {
			// A plain publish: cheaper for the server than an atomic
			// batch, and pipelined with every other on the connection.
			seqs, err = s.publish(ctx, msgs)
		} else if seqs, err = s.groups.submit(ctx, msgs, ""); errors.Is(err, errRetryAlone) {
			seqs, err = s.publish(ctx, msgs)
		}
		if err != nil {
			return mailbox.Result{}, wrapErr(err)
		}
		return mailbox.Result{Seqs: seqs}, nil
	}

	keySubj := s.subj.key(b.Key)
	msgs = append(msgs, outMsg{subject: keySubj, data: b.Receipt, ts: ts, expNone: true})
	// First try: straight to the server, in a group commit with the other
	// appends waiting (see the package doc, Group commit). The key message
	// makes the server refuse the batch if the key exists, so no lookup is
	// needed before it.
	seqs, err := s.groups.submit(ctx, msgs, keySubj)
	switch {
	case err == nil:
		return mailbox.Result{Seqs: seqs[:len(b.Items)], Receipt: b.Receipt}, nil
	case errors.Is(err, errRetryAlone), isAPIErr(err, errCodeWrongLastSeq, errCodeWrongLastSeqConstant):
		// The key exists (or is in flight), or the group it was in was
		// refused: look the key up through the leader and retry alone.
	default:
		return mailbox.Result{}, wrapErr(err)
	}
	for attempt := 0; ; attempt++ {
		// The leader has every committed key.
		m, found, err := s.mux.leaderGet(ctx, s.name, directGetRequest{LastFor: keySubj})
		if err != nil {
			return mailbox.Result{}, wrapErr(err)
		}
		if found {
			return mailbox.Result{Duplicate: true, Receipt: m.data}, nil
		}
		seqs, err := s.publish(ctx, msgs)
		switch {
		case err == nil:
			return mailbox.Result{Seqs: seqs[:len(b.Items)], Receipt: b.Receipt}, nil
		case isAPIErr(err, errCodeWrongLastSeq, errCodeWrongLastSeqConstant):
			// Another append with this key got there first (or is in
			// flight): look again, after a pause that grows.
			pause := time.Duration(min(attempt+1, 20)) * time.Millisecond
			select {
			case <-time.After(pause):
			case <-ctx.Done():
				return mailbox.Result{}, ctx.Err()
			}
		default:
			return mailbox.Result{}, wrapErr(err)
		}
	}
}

// noLeaderWait bounds how long publish retries while the stream has no
// leader: an election takes well under a second.
const noLeaderWait = 5 * time.Second

// publish stores msgs atomically and returns their stream sequences. One
// message is a plain JetStream publish; more are one atomic batch, whose
// messages the stream stores under consecutive sequences.
//
// A publish that meets "no responders" reached no server that stores the
// stream, so nothing of it was stored: the stream is electing a leader
// (just created, or its leader failed), or is gone. It is sent again
// after a pause that grows, for up to noLeaderWait (or ctx), so that an
// election does not turn into refused sends.
func (s *Store) publish(ctx context.Context, msgs []outMsg) ([]uint64, error) {
	var (
		deadline time.Time
		pause    = 5 * time.Millisecond
	)
	for {
		seqs, err := s.publishOnce(ctx, msgs)
		if !errors.Is(err, errNoResponders) {
			return seqs, err
		}
		now := time.Now()
		if deadline.IsZero() {
			deadline = now.Add(noLeaderWait)
		}
		if now.Add(pause).After(deadline) {
			return nil, err
		}
		select {
		case <-time.After(pause):
		case <-ctx.Done():
			return nil, err
		}
		pause = min(2*pause, 200*time.Millisecond)
	}
}

// publishOnce is one attempt of publish.
func (s *Store) publishOnce(ctx context.Context, msgs []outMsg) ([]uint64, error) {
	headers := func(m outMsg) nats.Header {
		h := nats.Header{hdrTime: []string{m.ts}}
		if m.expNone {
			h.Set(hdrExpLastSubj, "0")
		}
		return h
	}
	reply, ch, done := s.mux.open(1)
	defer done()
	if len(msgs) == 1 {
		m := msgs[0]
		if err := s.nc.PublishMsg(&nats.Msg{Subject: m.subject, Reply: reply, Header: headers(m), Data: m.data}); err != nil {
			return nil, err
		}
	} else {
		id := nuid.Next()
		s.batchMu.Lock()
		for i, m := range msgs {
			h := headers(m)
			h.Set(hdrBatchID, id)
			h.Set(hdrBatchSeq, strconv.Itoa(i+1))
			out := &nats.Msg{Subject: m.subject, Header: h, Data: m.data}
			if i == len(msgs)-1 {
				h.Set(hdrBatchCommit, "1")
				out.Reply = reply
			}
			if err := s.nc.PublishMsg(out); err != nil {
				s.batchMu.Unlock()
				return nil, err
			}
		}
		s.batchMu.Unlock()
	}
	msg, err := wait(ctx, ch)
	if err != nil {
		return nil, err
	}
	ack, err := parsePubAck(msg)
	if err != nil {
		return nil, err
	}
	if len(msgs) > 1 && ack.Count != len(msgs) {
		return nil, fmt.Errorf("jetstream mailbox: atomic batch of %d committed %d messages", len(msgs), ack.Count)
	}
	s.gen.Add(1)
	seqs := make([]uint64, len(msgs))
	first := ack.Seq - uint64(len(msgs)) + 1
	for i := range seqs {
		seqs[i] = first + uint64(i)
	}
	return seqs, nil
}

// Read implements mailbox.Store.
func (s *Store) Read(ctx context.Context, dev ident.Device, after uint64, limit int) ([]mailbox.Entry, error) {
	ctx, done, err := s.enter(ctx)
	if err != nil {
		return nil, err
	}
	defer done()
	if err := validDevice(dev); err != nil {
		return nil, err
	}
	if limit <= 0 || after == ^uint64(0) {
		return nil, nil
	}
	subj := s.subj.device(dev)
	out, err := s.readDirect(ctx, subj, after, limit)
	if err != nil {
		return nil, wrapErr(err)
	}
	if !s.replicated || s.opts.StaleReads {
		return out, nil
	}
	// A replica answered: check its answer against the stream leader's
	// last entry of the device (see the package doc, Reads).
	last, found, err := s.mux.leaderGet(ctx, s.name, directGetRequest{LastFor: subj})
	if err != nil {
		return nil, wrapErr(err)
	}
	got, lead := after, uint64(0)
	if len(out) > 0 {
		got = out[len(out)-1].Seq
	}
	if found {
		lead = last.seq
	}
	switch {
	case got > lead:
		// The replica is ahead of the leader (it applied entries the
		// leader has not yet): keep what the leader has too.
		for len(out) > 0 && out[len(out)-1].Seq > lead {
			out = out[:len(out)-1]
		}
	case len(out) == limit || got == lead:
		// Everything up to the leader's last entry (or a full page of it).
	default:
		// The replica is behind: the rest from the leader.
		out, err = s.readLeader(ctx, subj, out, got+1, limit)
	}
	if err != nil {
		return nil, wrapErr(err)
	}
	return out, nil
}

// readDirect reads up to limit entries of subj after after in batched
// direct gets, answered by any current replica.
func (s *Store) readDirect(ctx context.Context, subj string, after uint64, limit int) ([]mailbox.Entry, error) {
	var out []mailbox.Entry
	next := after + 1
	for len(out) < limit {
		ms, more, err := s.mux.directGet(ctx, s.name, directGetRequest{
			Seq: next, NextFor: subj, Batch: min(limit-len(out), maxDirectBatch),
		})
		if err != nil {
			return nil, err
		}
		for _, m := range ms {
			if m.subject != subj || m.seq < next {
				return nil, fmt.Errorf("jetstream mailbox: direct get for %s from %d answered %s seq %d", subj, next, m.subject, m.seq)
			}
			out = append(out, mailbox.Entry{Seq: m.seq, Time: msgTime(m.header), Data: m.data})
			next = m.seq + 1
		}
		if len(ms) == 0 || !more {
			break
		}
	}
	return out, nil
}

// readLeader appends to out the entries of subj from seq next on, up to
// limit in all, read through the stream leader one message per request.
func (s *Store) readLeader(ctx context.Context, subj string, out []mailbox.Entry, next uint64, limit int) ([]mailbox.Entry, error) {
	for len(out) < limit {
		m, ok, err := s.mux.leaderGet(ctx, s.name, directGetRequest{Seq: next, NextFor: subj})
		if err != nil {
			return nil, err
		}
		if !ok {
			break
		}
		if m.subject != subj || m.seq < next {
			return nil, fmt.Errorf("jetstream mailbox: message get for %s from %d answered %s seq %d", subj, next, m.subject, m.seq)
		}
		out = append(out, mailbox.Entry{Seq: m.seq, Time: msgTime(m.header), Data: m.data})
		next = m.seq + 1
	}
	return out, nil
}

// Delete implements mailbox.Store.
func (s *Store) Delete(ctx context.Context, dev ident.Device, seqs []uint64) ([]mailbox.Entry, error) {
	ctx, done, err := s.enter(ctx)
	if err != nil {
		return nil, err
	}
	defer done()
	if err := validDevice(dev); err != nil {
		return nil, err
	}
	want := slices.Clone(seqs)
	slices.Sort(want)
	want = slices.Compact(want)
	for len(want) > 0 && want[0] == 0 {
		want = want[1:]
	}
	if len(want) == 0 {
		return nil, nil
	}
	subj := s.subj.device(dev)

	// Read what is there: the device's messages from the lowest seq asked
	// for, in batched direct gets, stopping past the highest.
	found := map[uint64]storedMsg{}
	next, last := want[0], want[len(want)-1]
	for next <= last {
		ms, more, err := s.mux.directGet(ctx, s.name, directGetRequest{
			Seq: next, NextFor: subj, Batch: min(len(want)-len(found), maxDirectBatch),
		})
		if err != nil {
			return nil, wrapErr(err)
		}
		for _, m := range ms {
			if m.subject == subj && m.seq >= next && m.seq <= last {
				if _, ok := slices.BinarySearch(want, m.seq); ok {
					found[m.seq] = m
				}
			}
			next = max(next, m.seq+1)
		}
		if len(ms) == 0 || !more || len(found) == len(want) {
			break
		}
	}
	// A direct get may come from a follower a few writes behind: ask the
	// leader for any seq it did not have.
	if len(found) < len(want) {
		for _, seq := range want {
			if _, ok := found[seq]; ok {
				continue
			}
			m, ok, err := s.mux.leaderGet(ctx, s.name, directGetRequest{Seq: seq})
			if err != nil {
				return nil, wrapErr(err)
			}
			if ok && m.subject == subj {
				found[seq] = m
			}
		}
	}
	if len(found) == 0 {
		return nil, nil
	}

	// Delete them, in parallel. Only the caller whose delete removed the
	// message reports it, so concurrent deletes report each entry once.
	var (
		wg       sync.WaitGroup
		resMu    sync.Mutex
		out      []mailbox.Entry
		firstErr error
		sem      = make(chan struct{}, 32)
	)
	for seq, m := range found {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			removed, err := s.mux.deleteMsg(ctx, s.name, seq)
			resMu.Lock()
			defer resMu.Unlock()
			if err != nil {
				if firstErr == nil {
					firstErr = err
				}
				return
			}
			if removed {
				out = append(out, mailbox.Entry{Seq: seq, Time: msgTime(m.header), Data: m.data})
			}
		})
	}
	wg.Wait()
	if len(out) > 0 {
		s.gen.Add(1)
	}
	if firstErr != nil {
		return out, wrapErr(firstErr)
	}
	slices.SortFunc(out, func(a, b mailbox.Entry) int { return cmp.Compare(a.Seq, b.Seq) })
	return out, nil
}

// Expire implements mailbox.Store. It reads every message of the stream
// (in batched direct gets) and deletes those whose append time is before
// cutoff; see the package doc for its cost and for MaxAge.
func (s *Store) Expire(ctx context.Context, cutoff time.Time) (int, error) {
	ctx, done, err := s.enter(ctx)
	if err != nil {
		return 0, err
	}
	defer done()
	var old []storedMsg
	next := uint64(1)
	for {
		ms, more, err := s.mux.directGet(ctx, s.name, directGetRequest{Seq: next, NextFor: s.subj.all(), Batch: maxDirectBatch})
		if err != nil {
			return 0, wrapErr(err)
		}
		for _, m := range ms {
			if msgTime(m.header).Before(cutoff) {
				old = append(old, storedMsg{subject: m.subject, seq: m.seq})
			}
			next = max(next, m.seq+1)
		}
		if len(ms) == 0 || !more {
			break
		}
	}
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		n        int
		firstErr error
		sem      = make(chan struct{}, 32)
	)
	for _, m := range old {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			removed, err := s.mux.deleteMsg(ctx, s.name, m.seq)
			mu.Lock()
			defer mu.Unlock()
			if err != nil && firstErr == nil {
				firstErr = err
			}
			if removed && s.subj.isDevice(m.subject) {
				n++
			}
		})
	}
	wg.Wait()
	if len(old) > 0 {
		s.gen.Add(1)
	}
	return n, wrapErr(firstErr)
}

// Depth implements mailbox.Depther: the number of entries in the stream
// (all devices, all Stores sharing it), counted by the server. A count is
// reused for DepthCacheTTL while this Store writes nothing. On error it
// logs and returns the last count.
func (s *Store) Depth() int64 {
	s.depthMu.Lock()
	defer s.depthMu.Unlock()
	gen := s.gen.Load()
	if s.depthValid && s.depthGen == gen && time.Since(s.depthAt) < s.opts.DepthCacheTTL {
		return s.depthVal
	}
	ctx, done, err := s.enter(context.Background())
	if err != nil {
		return s.depthVal
	}
	defer done()
	n, err := s.countEntries(ctx)
	if err != nil {
		s.log.Warn("jetstream mailbox: counting entries failed", "stream", s.name, "err", err)
		return s.depthVal
	}
	s.depthVal, s.depthGen, s.depthAt, s.depthValid = n, gen, time.Now(), true
	return n
}

// countEntries asks the server how many messages the device subjects hold:
// the pending count of a fresh consumer over them, which the server
// computes from its per-subject index without reading messages.
func (s *Store) countEntries(ctx context.Context) (int64, error) {
	name := "depth_" + nuid.Next()
	c, err := s.stream.CreateConsumer(ctx, jetstream.ConsumerConfig{
		Name:              name,
		FilterSubject:     s.subj.devices(),
		DeliverPolicy:     jetstream.DeliverAllPolicy,
		AckPolicy:         jetstream.AckNonePolicy,
		MemoryStorage:     true,
		Replicas:          1,
		InactiveThreshold: time.Minute,
	})
	if err != nil {
		return 0, err
	}
	n := int64(c.CachedInfo().NumPending)
	if err := s.stream.DeleteConsumer(ctx, name); err != nil {
		s.log.Debug("jetstream mailbox: deleting depth consumer", "err", err)
	}
	return n, nil
}

// Close implements mailbox.Store. It waits for running calls (every
// Append that returned was already acknowledged) and leaves the connection
// open.
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return mailbox.ErrClosed
	}
	s.closed = true
	s.mu.Unlock()
	s.ops.Wait()
	if err := s.mux.close(); err != nil && !errors.Is(err, nats.ErrConnectionClosed) && !errors.Is(err, nats.ErrBadSubscription) {
		return err
	}
	return nil
}

// StreamName is the name of the stream holding the mailboxes.
func (s *Store) StreamName() string { return s.name }

// DeviceSubjects is the subject filter that matches every device's mailbox
// (and no idempotency key): what the delivery workers' consumer reads.
func (s *Store) DeviceSubjects() string { return s.subj.devices() }

// DeviceOf returns the device whose mailbox subject is subj, or false if
// subj is not a device subject of this store.
func (s *Store) DeviceOf(subj string) (ident.Device, bool) {
	rest, ok := strings.CutPrefix(subj, s.subj.prefix+".d.")
	if !ok {
		return ident.Device{}, false
	}
	user, id, ok := strings.Cut(rest, ".")
	if !ok || !ident.ValidUser(user) {
		return ident.Device{}, false
	}
	n, err := strconv.ParseUint(id, 10, 32)
	if err != nil || n == 0 {
		return ident.Device{}, false
	}
	return ident.Device{User: user, ID: uint32(n)}, true
}

// Conn is the NATS connection the store uses (the caller's).
func (s *Store) Conn() *nats.Conn { return s.nc }
