package pebble

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	pebbledb "github.com/cockroachdb/pebble/v2"

	"github.com/courier-im/courier/internal/mailbox"
)

// errAborted is returned by lock waits cut short by a store failure; callers
// turn it into the failure itself.
var errAborted = errors.New("mailbox/pebble: aborted")

// spaceGuard refuses writes while the data directory's file system has less
// free space than a reserve, so that Pebble never meets ENOSPC on its
// write-ahead log (see the package documentation for why that matters).
//
// Asking the file system costs a system call, so the answer is cached for
// interval; in between, the bytes written since the last look are
// subtracted from it so that a burst cannot run far past the reserve.
type spaceGuard struct {
	free     func() (uint64, error)
	interval time.Duration // negative: ask on every check

	mu      sync.Mutex // serialises refreshes
	state   atomic.Pointer[spaceState]
	written atomic.Int64 // bytes committed since state was taken
}

type spaceState struct {
	at    time.Time
	avail uint64
	err   error
}

func (g *spaceGuard) fresh(st *spaceState) bool {
	return st != nil && g.interval >= 0 && time.Since(st.at) < g.interval
}

// check returns an error wrapping mailbox.ErrUnavailable unless writing need
// more bytes leaves at least reserve bytes free. A nil guard allows all.
func (g *spaceGuard) check(reserve, need uint64) error {
	if g == nil {
		return nil
	}
	st := g.state.Load()
	if !g.fresh(st) {
		st = g.refresh()
	}
	if st.err != nil {
		return fmt.Errorf("%w: mailbox/pebble: cannot check free space: %w", mailbox.ErrUnavailable, st.err)
	}
	avail := st.avail
	if w := uint64(max(g.written.Load(), 0)); w < avail {
		avail -= w
	} else {
		avail = 0
	}
	if avail < reserve || avail-reserve < need {
		return fmt.Errorf("%w: mailbox/pebble: disk nearly full (%d bytes free, %d reserved)",
			mailbox.ErrUnavailable, avail, reserve)
	}
	return nil
}

func (g *spaceGuard) refresh() *spaceState {
	g.mu.Lock()
	defer g.mu.Unlock()
	if st := g.state.Load(); g.fresh(st) {
		return st // refreshed by another goroutine while we waited
	}
	// Reset the counter before asking, so bytes written during the call are
	// counted twice at worst, never missed.
	g.written.Store(0)
	avail, err := g.free()
	st := &spaceState{at: time.Now(), avail: avail, err: err}
	g.state.Store(st)
	return st
}

func (g *spaceGuard) wrote(n int) {
	if g != nil {
		g.written.Add(int64(n))
	}
}

// fatalCommitFormat is the format Pebble's DB.Apply passes to Logger.Fatalf
// when its commit pipeline returns an error (db.go, applyInternal). It is
// the only Fatalf we can survive: it is raised on the committing goroutine,
// which is always one of ours, after Pebble has released its locks.
const fatalCommitFormat = "pebble: fatal commit error: %v"

// commitFailure is the panic value pebbleLogger.Fatalf raises for
// fatalCommitFormat; runCommit recovers it.
type commitFailure struct{ err error }

// pebbleLogger adapts slog to Pebble's Logger.
//
// Pebble requires Fatalf not to return: a Fatalf that returns makes DB.Apply
// report success for a batch whose WAL write failed. For the commit error we
// can handle, Fatalf panics and runCommit recovers; every other Fatalf (a
// MANIFEST write failure, an invariant violation, corruption) is raised on
// Pebble's own goroutines with its state half-updated, so we do what Pebble's
// default logger does: log and exit.
type pebbleLogger struct{ log *slog.Logger }

// Infof is Pebble's routine chatter (WAL replay, compactions): debug level.
func (l pebbleLogger) Infof(format string, args ...any) {
	if !l.log.Enabled(context.Background(), slog.LevelDebug) {
		return
	}
	l.log.Debug(fmt.Sprintf(format, args...))
}

func (l pebbleLogger) Errorf(format string, args ...any) {
	l.log.Error(fmt.Sprintf(format, args...))
}

func (l pebbleLogger) Fatalf(format string, args ...any) {
	if format == fatalCommitFormat && len(args) == 1 {
		if err, ok := args[0].(error); ok {
			panic(commitFailure{err})
		}
	}
	l.log.Error(fmt.Sprintf(format, args...), "fatal", true)
	os.Exit(1)
}

// eventListener reports the Pebble events an operator needs to see.
func eventListener(log *slog.Logger) *pebbledb.EventListener {
	return &pebbledb.EventListener{
		BackgroundError: func(err error) {
			log.Error("pebble background error", "err", err)
		},
		DiskSlow: func(info pebbledb.DiskSlowInfo) {
			log.Warn("pebble disk slow", "info", info.String())
		},
		WriteStallBegin: func(info pebbledb.WriteStallBeginInfo) {
			log.Warn("pebble write stall", "reason", info.Reason)
		},
		WriteStallEnd: func() {
			log.Info("pebble write stall ended")
		},
		// Entries are deleted with single deletes, which are correct only
		// for a key set exactly once (keys.go). Pebble's compactions notice
		// when that assumption broke; it would be a bug here, so it is
		// logged as an error with the key.
		PossibleAPIMisuse: func(info pebbledb.PossibleAPIMisuseInfo) {
			log.Error("pebble: possible misuse", "kind", info.Kind.String(), "key", fmt.Sprintf("%x", info.UserKey))
		},
	}
}

// runCommit runs fn, which calls into Pebble's commit pipeline, on the
// committer (commit.go), so that Pebble's fail-stop behaviour (see the
// package documentation) cannot take the process down or leave the caller
// blocked forever:
//
//   - fn runs on the committer goroutine, not the caller's. After a WAL
//     failure a later commit can block forever on Pebble's commit mutex;
//     the caller stops waiting as soon as the store has failed.
//   - A panic out of fn is recovered and turns the store into the failed
//     state. That is safe because from then on nothing reaches Pebble's
//     commit pipeline again and reads are refused too, so the caller's
//     "unavailable" cannot be contradicted by anything the store shows.
//
// Batches go through the same path (commitGroup), grouped.
func (s *Store) runCommit(fn func() error) error {
	if err := s.failure(); err != nil {
		return err
	}
	r := newCommitReq(nil, false)
	r.fn = fn
	return s.commit(r)
}

// protect runs fn, recovering a panic out of it, and returns the cause of
// a failure (fn's error, or the panic). It leaves failing the store to its
// caller, which first counts itself out of Pebble's commit pipeline
// (commits) and then calls failOn: whoever sees the failure must not find
// a goroutine still counted inside Pebble unless one is stuck there.
func (s *Store) protect(fn func() error) (cause error) {
	defer func() {
		if r := recover(); r != nil {
			if f, ok := r.(commitFailure); ok {
				cause = f.err
			} else {
				// Pebble panics in its commit path with its commit mutex
				// held (for example when the WAL writer has a sticky error):
				// DB.Close would block on that mutex forever.
				s.pebbleWedged.Store(true)
				s.log.Error("pebble panicked while committing", "panic", r, "stack", string(debug.Stack()))
				cause = fmt.Errorf("pebble panicked: %v", r)
			}
		}
	}()
	return fn()
}

// failOn fails the store if cause is not nil, and returns the store's
// failure (nil if cause is).
func (s *Store) failOn(cause error) error {
	if cause == nil {
		return nil
	}
	s.fail(cause)
	return s.failure()
}

// fail moves the store into the failed state, in which every method
// returns an error wrapping mailbox.ErrUnavailable until the process
// reopens the store. Only the first cause is kept.
func (s *Store) fail(cause error) {
	s.failOnce.Do(func() {
		s.log.Error("mailbox store failed; refusing all operations until restart", "err", cause)
		s.failErr = fmt.Errorf("%w: mailbox/pebble: write failed, store stopped until reopened: %w",
			mailbox.ErrUnavailable, cause)
		close(s.failed)
	})
}

// failure returns the failed state's error, or nil.
func (s *Store) failure() error {
	select {
	case <-s.failed:
		return s.failErr
	default:
		return nil
	}
}
