package pebble

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/cockroachdb/pebble/v2/vfs/errorfs"

	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox"
	"github.com/courier-im/courier/internal/mailbox/mailboxtest"
)

var ctx = context.Background()

// testLogger sends the store's log to the test log.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

func mustOpen(t testing.TB, dir string, opts Options) *Store {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = testLogger(t)
	}
	s, err := Open(dir, opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return s
}

// TestConformanceDisk runs the suite on a real directory.
func TestConformanceDisk(t *testing.T) {
	mailboxtest.Run(t, func(t *testing.T) mailboxtest.Backend {
		dir := t.TempDir()
		return mailboxtest.Backend{
			Open: func(t *testing.T) mailbox.Store { return mustOpen(t, dir, Options{}) },
		}
	})
}

// TestConformanceCrash runs the suite on Pebble's crashable in-memory file
// system, where a crash keeps what was synced and a random part of what
// was not.
func TestConformanceCrash(t *testing.T) {
	mailboxtest.Run(t, func(t *testing.T) mailboxtest.Backend {
		var (
			mu  sync.Mutex
			fs  = vfs.NewCrashableMem()
			cur *Store
		)
		h := fnv.New64a()
		io.WriteString(h, t.Name())
		rng := rand.New(rand.NewPCG(h.Sum64(), 0)) // deterministic per subtest
		open := func(t *testing.T) *Store {
			s := mustOpen(t, "mailbox", Options{FS: fs})
			cur = s
			return s
		}
		return mailboxtest.Backend{
			Open: func(t *testing.T) mailbox.Store {
				mu.Lock()
				defer mu.Unlock()
				return open(t)
			},
			Crash: func(t *testing.T) mailbox.Store {
				mu.Lock()
				defer mu.Unlock()
				old := cur
				fs = fs.CrashClone(vfs.CrashCloneCfg{UnsyncedDataPercent: 50, RNG: rng})
				s := open(t)
				// The crash image is taken; closing the abandoned store only
				// frees its memory and goroutines.
				old.Close()
				return s
			},
		}
	})
}

func item(d ident.Device, data string) mailbox.Item {
	return mailbox.Item{Device: d, Data: []byte(data)}
}

func readAll(t *testing.T, s mailbox.Store, d ident.Device) []string {
	t.Helper()
	es, err := s.Read(ctx, d, 0, 1<<20)
	if err != nil {
		t.Fatalf("Read(%v): %v", d, err)
	}
	out := make([]string, len(es))
	for i, e := range es {
		out[i] = fmt.Sprintf("%d:%s", e.Seq, e.Data)
	}
	return out
}

// TestFreeSpaceGuard checks that appends are refused, atomically and
// without harm, while free space is below the reserve, and work again once
// it is back.
func TestFreeSpaceGuard(t *testing.T) {
	var free atomic.Uint64
	var freeErr atomic.Pointer[error]
	free.Store(1 << 30)
	const reserve = 64 << 20
	s := mustOpen(t, t.TempDir(), Options{
		MinFreeBytes: reserve,
		FreeSpace: func() (uint64, error) {
			if p := freeErr.Load(); p != nil {
				return 0, *p
			}
			return free.Load(), nil
		},
		FreeSpaceInterval: -1,
	})
	defer s.Close()
	a, b := ident.Device{User: "alice", ID: 1}, ident.Device{User: "bob", ID: 1}
	if _, err := s.Append(ctx, mailbox.Batch{Key: "k1", Receipt: []byte("r1"), Items: []mailbox.Item{item(a, "one"), item(b, "one")}}); err != nil {
		t.Fatal(err)
	}

	// Below the reserve: refused, nothing visible, the process alive.
	free.Store(reserve - 1)
	_, err := s.Append(ctx, mailbox.Batch{Key: "k2", Items: []mailbox.Item{item(a, "two"), item(b, "two")}})
	if !errors.Is(err, mailbox.ErrUnavailable) {
		t.Fatalf("Append with a full disk: %v, want ErrUnavailable", err)
	}
	if got := readAll(t, s, a); !slices.Equal(got, []string{"1:one"}) {
		t.Errorf("alice.1 holds %v after a refused append", got)
	}
	if s.Depth() != 2 {
		t.Errorf("Depth = %d, want 2", s.Depth())
	}
	// A retry of a batch already accepted writes nothing, so it is answered.
	if res, err := s.Append(ctx, mailbox.Batch{Key: "k1", Items: []mailbox.Item{item(a, "one")}}); err != nil || !res.Duplicate {
		t.Errorf("duplicate with a full disk = %+v, %v; want duplicate", res, err)
	}
	// Deletes free space, so they go on until half the reserve.
	free.Store(reserve/2 + 1)
	if got, err := s.Delete(ctx, b, []uint64{1}); err != nil || len(got) != 1 {
		t.Errorf("Delete below the append reserve = %v, %v", got, err)
	}
	free.Store(reserve/2 - 1)
	if _, err := s.Delete(ctx, a, []uint64{1}); !errors.Is(err, mailbox.ErrUnavailable) {
		t.Errorf("Delete below half the reserve: %v, want ErrUnavailable", err)
	}
	if _, err := s.Expire(ctx, time.Now().Add(time.Hour)); !errors.Is(err, mailbox.ErrUnavailable) {
		t.Errorf("Expire below half the reserve: %v, want ErrUnavailable", err)
	}
	// Failing to ask is treated as full.
	ioErr := error(syscall.EIO)
	freeErr.Store(&ioErr)
	if _, err := s.Append(ctx, mailbox.Batch{Items: []mailbox.Item{item(a, "x")}}); !errors.Is(err, mailbox.ErrUnavailable) || !errors.Is(err, syscall.EIO) {
		t.Errorf("Append when free space is unknown: %v, want ErrUnavailable wrapping EIO", err)
	}
	freeErr.Store(nil)

	// The condition clears: everything works, nothing was lost or reused.
	free.Store(1 << 30)
	res, err := s.Append(ctx, mailbox.Batch{Key: "k2", Items: []mailbox.Item{item(a, "two")}})
	if err != nil || res.Duplicate || res.Seqs[0] != 2 {
		t.Fatalf("Append after space came back = %+v, %v; want seq 2", res, err)
	}
	if got := readAll(t, s, a); !slices.Equal(got, []string{"1:one", "2:two"}) {
		t.Errorf("alice.1 holds %v", got)
	}
}

// TestFreeSpaceCached checks that between looks at the file system the
// guard counts what was written, so it refuses in time without asking.
func TestFreeSpaceCached(t *testing.T) {
	var calls atomic.Int64
	const reserve = 1 << 20
	s := mustOpen(t, t.TempDir(), Options{
		MinFreeBytes: reserve,
		FreeSpace: func() (uint64, error) {
			calls.Add(1)
			return reserve + 64<<10, nil // 64 KiB above the reserve
		},
		FreeSpaceInterval: time.Hour,
	})
	defer s.Close()
	d := ident.Device{User: "carol", ID: 1}
	data := strings.Repeat("x", 4<<10)
	n := 0
	for ; n < 100; n++ {
		if _, err := s.Append(ctx, mailbox.Batch{Items: []mailbox.Item{item(d, data)}}); err != nil {
			if !errors.Is(err, mailbox.ErrUnavailable) {
				t.Fatal(err)
			}
			break
		}
	}
	if n < 10 || n > 16 {
		t.Errorf("refused after %d appends of 4 KiB with 64 KiB to spare, want about 15", n)
	}
	if c := calls.Load(); c != 2 { // once at Open, once for the first append
		t.Errorf("FreeSpace called %d times, want 2", c)
	}
	if got := s.Depth(); got != int64(n) {
		t.Errorf("Depth = %d, want %d", got, n)
	}
}

// walFault injects err into writes and/or syncs of Pebble's WAL files
// while on.
type walFault struct {
	on          atomic.Bool
	writes      bool
	syncs       bool
	err         error
	injectCount atomic.Int64
}

func (f *walFault) String() string { return "walFault" }

func (f *walFault) MaybeError(op errorfs.Op) error {
	if !f.on.Load() || !strings.HasSuffix(op.Path, ".log") {
		return nil
	}
	switch op.Kind {
	case errorfs.OpFileWrite, errorfs.OpFileWriteAt, errorfs.OpCreate, errorfs.OpReuseForWrite, errorfs.OpFilePreallocate:
		if !f.writes {
			return nil
		}
	case errorfs.OpFileSync, errorfs.OpFileSyncData, errorfs.OpFileSyncTo, errorfs.OpFileFlush:
		if !f.syncs {
			return nil
		}
	default:
		return nil
	}
	f.injectCount.Add(1)
	return &os.PathError{Op: op.Kind.ReadOrWrite().String(), Path: op.Path, Err: f.err}
}

// TestWALFailure makes Pebble's WAL writes or syncs fail under a store
// with the free-space guard off, which is what happens if the disk fills
// anyway or returns an I/O error. The append must fail with ErrUnavailable,
// the process must live, the store must refuse everything afterwards, and
// a restart must find every acknowledged entry and none of the failed one.
func TestWALFailure(t *testing.T) {
	for _, tc := range []struct {
		name          string
		writes, syncs bool
		err           error
	}{
		{"write-ENOSPC", true, false, syscall.ENOSPC},
		{"sync-EIO", false, true, syscall.EIO},
		{"write-and-sync-EROFS", true, true, syscall.EROFS},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mem := vfs.NewCrashableMem()
			fault := &walFault{writes: tc.writes, syncs: tc.syncs, err: tc.err}
			s := mustOpen(t, "db", Options{FS: errorfs.Wrap(mem, fault), MinFreeBytes: -1})
			a, b := ident.Device{User: "alice", ID: 1}, ident.Device{User: "bob", ID: 1}
			for i := range 3 {
				if _, err := s.Append(ctx, mailbox.Batch{
					Key:   fmt.Sprint("ok-", i),
					Items: []mailbox.Item{item(a, fmt.Sprint("a", i)), item(b, fmt.Sprint("b", i))},
				}); err != nil {
					t.Fatal(err)
				}
			}

			fault.on.Store(true)
			_, err := s.Append(ctx, mailbox.Batch{Key: "failed", Items: []mailbox.Item{item(a, "lost"), item(b, "lost")}})
			if !errors.Is(err, mailbox.ErrUnavailable) {
				t.Fatalf("Append with a failing WAL: %v, want ErrUnavailable", err)
			}
			if !errors.Is(err, tc.err) {
				t.Errorf("Append error %v does not wrap %v", err, tc.err)
			}
			if fault.injectCount.Load() == 0 {
				t.Fatal("no fault was injected")
			}
			// Failed: everything is refused, nothing blocks.
			if _, err := s.Append(ctx, mailbox.Batch{Items: []mailbox.Item{item(a, "after")}}); !errors.Is(err, mailbox.ErrUnavailable) {
				t.Errorf("Append after the failure: %v, want ErrUnavailable", err)
			}
			if _, err := s.Read(ctx, a, 0, 10); !errors.Is(err, mailbox.ErrUnavailable) {
				t.Errorf("Read after the failure: %v, want ErrUnavailable", err)
			}
			if _, err := s.Delete(ctx, a, []uint64{1}); !errors.Is(err, mailbox.ErrUnavailable) {
				t.Errorf("Delete after the failure: %v, want ErrUnavailable", err)
			}

			// The condition clears and the process restarts.
			fault.on.Store(false)
			if err := s.Close(); err == nil {
				t.Error("Close of a failed store reported no error")
			}
			s = mustOpen(t, "db", Options{FS: mem.CrashClone(vfs.CrashCloneCfg{})})
			defer s.Close()
			for _, d := range []ident.Device{a, b} {
				want := []string{"1:" + d.User[:1] + "0", "2:" + d.User[:1] + "1", "3:" + d.User[:1] + "2"}
				if got := readAll(t, s, d); !slices.Equal(got, want) {
					t.Errorf("after restart %v holds %v, want %v", d, got, want)
				}
			}
			if res, err := s.Append(ctx, mailbox.Batch{Key: "ok-1"}); err != nil || !res.Duplicate {
				t.Errorf("acknowledged key after restart: %+v, %v", res, err)
			}
			res, err := s.Append(ctx, mailbox.Batch{Key: "failed", Items: []mailbox.Item{item(a, "retried")}})
			// After the 3 durable entries: past the stored mark (seqReserve).
			if err != nil || res.Duplicate || res.Seqs[0] != 2+seqReserve {
				t.Errorf("retry of the failed batch = %+v, %v; want a fresh append at seq %d", res, err, 2+seqReserve)
			}
			if s.Depth() != 7 {
				t.Errorf("Depth = %d, want 7", s.Depth())
			}
		})
	}
}

// TestWALFailureConcurrent fails the WAL under many concurrent appenders,
// so that some of them reach Pebble after its log writer has failed (where
// Pebble panics holding its commit mutex). No append may hang, none may
// report success for an entry a restart does not find, and the process
// must live.
func TestWALFailureConcurrent(t *testing.T) {
	for _, syncs := range []bool{false, true} {
		t.Run(fmt.Sprint("syncs=", syncs), func(t *testing.T) {
			mem := vfs.NewCrashableMem()
			fault := &walFault{writes: !syncs, syncs: syncs, err: syscall.EIO}
			s := mustOpen(t, "db", Options{FS: errorfs.Wrap(mem, fault), MinFreeBytes: -1})

			const writers = 32
			var (
				mu       sync.Mutex
				accepted = map[string]bool{}
				wg       sync.WaitGroup
				failures atomic.Int64
			)
			start := make(chan struct{})
			for w := range writers {
				wg.Go(func() {
					<-start
					d := ident.Device{User: "group", ID: uint32(w%4 + 1)}
					for i := 0; ; i++ {
						if w == 0 && i == 20 {
							fault.on.Store(true)
						}
						data := fmt.Sprintf("w%d-%d", w, i)
						_, err := s.Append(ctx, mailbox.Batch{Items: []mailbox.Item{item(d, data)}})
						if err != nil {
							if !errors.Is(err, mailbox.ErrUnavailable) {
								t.Errorf("Append: %v, want ErrUnavailable", err)
							}
							failures.Add(1)
							return
						}
						mu.Lock()
						accepted[data] = true
						mu.Unlock()
					}
				})
			}
			close(start)
			wg.Wait()
			if failures.Load() != writers {
				t.Fatalf("%d writers saw the failure, want %d", failures.Load(), writers)
			}
			fault.on.Store(false)
			// Close may have to leave Pebble open; the restart uses a crash
			// image of the file system anyway.
			t.Logf("Pebble wedged: %v; Close: %v", s.pebbleWedged.Load(), s.Close())

			s = mustOpen(t, "db", Options{FS: mem.CrashClone(vfs.CrashCloneCfg{})})
			defer s.Close()
			found := map[string]bool{}
			for id := uint32(1); id <= 4; id++ {
				es, err := s.Read(ctx, ident.Device{User: "group", ID: id}, 0, 1<<20)
				if err != nil {
					t.Fatal(err)
				}
				for i, e := range es {
					if i > 0 && e.Seq <= es[i-1].Seq {
						t.Errorf("seqs not increasing after restart")
					}
					found[string(e.Data)] = true
				}
			}
			for data := range accepted {
				if !found[data] {
					t.Errorf("accepted %s lost", data)
				}
			}
			t.Logf("%d accepted, %d found after restart", len(accepted), len(found))
		})
	}
}

// TestPebbleFatalCommit checks the handling of Pebble's one survivable
// Fatalf, and of a panic in its commit path, without having to provoke
// them.
func TestPebbleFatalCommit(t *testing.T) {
	t.Run("fatalf", func(t *testing.T) {
		s := mustOpen(t, "db", Options{FS: vfs.NewMem()})
		err := s.runCommit(func() error {
			pebbleLogger{s.log}.Fatalf(fatalCommitFormat, io.ErrShortWrite)
			return nil
		})
		if !errors.Is(err, mailbox.ErrUnavailable) || !errors.Is(err, io.ErrShortWrite) {
			t.Errorf("runCommit = %v, want ErrUnavailable wrapping the commit error", err)
		}
		if s.pebbleWedged.Load() {
			t.Error("a reported commit error marked Pebble as wedged")
		}
		if _, err := s.Read(ctx, ident.Device{User: "a", ID: 1}, 0, 1); !errors.Is(err, mailbox.ErrUnavailable) {
			t.Errorf("Read after failure: %v", err)
		}
		// Pebble holds no lock here, so Close closes it.
		if err := s.Close(); err == nil || strings.Contains(err.Error(), "left open") {
			t.Errorf("Close = %v, want the failure but a closed database", err)
		}
	})
	t.Run("panic", func(t *testing.T) {
		s := mustOpen(t, "db", Options{FS: vfs.NewMem()})
		err := s.runCommit(func() error { panic(errors.New("pebble: boom")) })
		if !errors.Is(err, mailbox.ErrUnavailable) {
			t.Errorf("runCommit = %v, want ErrUnavailable", err)
		}
		if !s.pebbleWedged.Load() {
			t.Error("a panic did not mark Pebble as wedged")
		}
		if err := s.Close(); err == nil || !strings.Contains(err.Error(), "left open") {
			t.Errorf("Close = %v, want it to leave the database open", err)
		}
		s.db.Close() // not actually wedged in this test
	})
}

func TestOpenErrors(t *testing.T) {
	fs := vfs.NewMem()
	s := mustOpen(t, "db", Options{FS: fs})
	if _, err := s.Append(ctx, mailbox.Batch{Items: []mailbox.Item{item(ident.Device{ID: 1}, "x")}}); err == nil {
		t.Error("Append to a device with no user succeeded")
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); !errors.Is(err, mailbox.ErrClosed) {
		t.Errorf("second Close = %v, want ErrClosed", err)
	}
	// A store in another format is refused.
	s = mustOpen(t, "db", Options{FS: fs})
	if err := s.db.Set(formatKey, []byte("courier-mailbox-v0"), nil); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if _, err := Open("db", Options{FS: fs}); err == nil || !strings.Contains(err.Error(), "unsupported store format") {
		t.Errorf("Open of another format: %v", err)
	}
}

// TestPebbleWedge reproduces Pebble's behaviour after a WAL failure, which
// the package documentation describes: once its log writer has the error,
// the next commit panics inside Pebble holding the commit mutex. The store
// must survive that panic and must not call DB.Close, which would block.
func TestPebbleWedge(t *testing.T) {
	mem := vfs.NewCrashableMem()
	fault := &walFault{writes: true, err: syscall.EIO}
	s := mustOpen(t, "db", Options{FS: errorfs.Wrap(mem, fault), MinFreeBytes: -1})
	d := ident.Device{User: "a", ID: 1}
	if _, err := s.Append(ctx, mailbox.Batch{Items: []mailbox.Item{item(d, "kept")}}); err != nil {
		t.Fatal(err)
	}
	fault.on.Store(true)
	if _, err := s.Append(ctx, mailbox.Batch{Items: []mailbox.Item{item(d, "x")}}); !errors.Is(err, mailbox.ErrUnavailable) {
		t.Fatalf("Append: %v", err)
	}
	// Go around the store's refusal, as an append already past its checks
	// would. Each commit fills a 32 KiB WAL block, which is when the log
	// writer picks up its flusher's error; the one after that panics. Few
	// enough to stay clear of a memtable rotation (see the package doc).
	big := make([]byte, 33<<10)
	for i := 0; i < 40 && !s.pebbleWedged.Load(); i++ {
		_ = s.protect(func() error {
			b := s.db.NewBatch()
			b.Set([]byte("zz-test"), big, nil)
			return s.db.Apply(b, nil)
		})
	}
	if !s.pebbleWedged.Load() {
		t.Fatal("Pebble did not panic in its commit path after the WAL failed")
	}
	err := s.Close()
	if err == nil || !strings.Contains(err.Error(), "left open") {
		t.Fatalf("Close = %v, want it to leave the wedged database open", err)
	}
	s = mustOpen(t, "db", Options{FS: mem.CrashClone(vfs.CrashCloneCfg{})})
	defer s.Close()
	if got := readAll(t, s, d); !slices.Equal(got, []string{"1:kept"}) {
		t.Errorf("after restart holds %v, want [1:kept]", got)
	}
}

// TestAppendDeviceCounts appends batches naming one, two (held inline in
// the commit request) and five devices (held in slices of their own),
// twice each: every device gets its entries in order, and the second
// batch's seqs follow the first's, so the high-water seqs and read fences
// were kept per device.
func TestAppendDeviceCounts(t *testing.T) {
	s := mustOpen(t, t.TempDir(), Options{})
	defer s.Close()
	for _, n := range []int{1, 2, 5} {
		devs := make([]ident.Device, n)
		for i := range devs {
			devs[i] = ident.Device{User: fmt.Sprintf("u%d-%d", n, i), ID: 1}
		}
		last := map[ident.Device]uint64{}
		for round := range 2 {
			var items []mailbox.Item
			for i := range 2 * n { // each device twice, interleaved
				items = append(items, item(devs[(i*3)%n], fmt.Sprintf("r%d-%d", round, i)))
			}
			res, err := s.Append(ctx, mailbox.Batch{Items: items})
			if err != nil {
				t.Fatalf("%d devices, round %d: %v", n, round, err)
			}
			for i, it := range items {
				if res.Seqs[i] <= last[it.Device] {
					t.Fatalf("%d devices, round %d: item %d of %v got seq %d after %d", n, round, i, it.Device, res.Seqs[i], last[it.Device])
				}
				last[it.Device] = res.Seqs[i]
			}
		}
		for _, d := range devs {
			got := readAll(t, s, d)
			if len(got) != 4 {
				t.Errorf("%d devices: %v holds %v, want 4 entries", n, d, got)
			}
		}
	}
}
