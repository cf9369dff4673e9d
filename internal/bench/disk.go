package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// Disk scenario parameters: a write the size of a small group commit,
// into a preallocated file that the writes go round, as Pebble's WAL
// writes into a preallocated or recycled log file, so that an fdatasync
// flushes data and asks the device to flush its cache, and no file
// metadata.
const (
	diskWriteSize = 4 << 10
	diskFileSize  = 64 << 20
	// diskStall is the fsync latency reported as a stall: one such
	// fsync holds up every message accepted meanwhile by at least this.
	diskStall = 100 * time.Millisecond
)

// runDisk measures what every accepted message waits for on the machine
// under test, without a server: the latency of a write and fdatasync in
// the directory (Options.Dir) whose filesystem would hold the server's
// mailbox. One writer, one write and sync after another, for the
// duration. It is a property of the disk, not of courier: a disk whose
// syncs stall for hundreds of milliseconds bounds the send→deliver tail of
// any durable server on it.
func runDisk(ctx context.Context, o Options) (*Result, error) {
	dir := o.Dir
	if dir == "" {
		dir = os.TempDir() // where a child server keeps its data
	}
	if st, err := os.Stat(dir); err != nil {
		return nil, fmt.Errorf("--dir: %w", err)
	} else if !st.IsDir() {
		return nil, fmt.Errorf("--dir %s: not a directory", dir)
	}
	f, err := os.CreateTemp(dir, ".courier-bench-disk-*")
	if err != nil {
		return nil, fmt.Errorf("--dir %s: creating the test file: %w", dir, err)
	}
	name := f.Name()
	defer os.Remove(name)
	defer f.Close()
	logf := func(format string, args ...any) { fmt.Fprintf(o.Log, "bench: "+format+"\n", args...) }
	logf("disk: %d-byte writes, each followed by fdatasync, in %s for %v", diskWriteSize, dir, o.Duration)

	// Allocate and write the whole file first, then sync it, so that
	// the measured syncs change no metadata (no extent allocation, no
	// size change).
	if err := unix.Fallocate(int(f.Fd()), 0, 0, diskFileSize); err != nil && !errors.Is(err, unix.EOPNOTSUPP) {
		return nil, fmt.Errorf("preallocating %s: %w", name, err)
	}
	block := make([]byte, 1<<20)
	for off := int64(0); off < diskFileSize; off += int64(len(block)) {
		if _, err := f.WriteAt(block, off); err != nil {
			return nil, fmt.Errorf("writing %s: %w", name, err)
		}
	}
	if err := f.Sync(); err != nil {
		return nil, fmt.Errorf("syncing %s: %w", name, err)
	}

	lat := newLatencies()
	buf := make([]byte, diskWriteSize)
	var stalls int64
	var stalled time.Duration
	start := time.Now()
	end := start.Add(o.Duration)
	off := int64(0)
	for ctx.Err() == nil {
		t0 := time.Now()
		if !t0.Before(end) {
			break
		}
		buf[0]++ // not the same bytes each time
		if _, err := f.WriteAt(buf, off); err != nil {
			return nil, fmt.Errorf("writing %s: %w", name, err)
		}
		if err := unix.Fdatasync(int(f.Fd())); err != nil {
			return nil, fmt.Errorf("fdatasync %s: %w", name, err)
		}
		d := time.Since(t0)
		lat.record(d)
		if d >= diskStall {
			stalls++
			stalled += d
			logf("disk: write and sync at %.1fs took %v", t0.Sub(start).Seconds(), d.Round(time.Millisecond))
		}
		off = (off + diskWriteSize) % diskFileSize
	}
	elapsed := time.Since(start).Seconds()
	n := lat.count()
	res := &Result{Params: fmt.Sprintf("dir=%s write=%d", dir, diskWriteSize)}
	res.DurationSec = f64(elapsed)
	res.DiskSyncs = i64(n)
	res.DiskSyncsPerSec = f64(float64(n) / elapsed)
	res.P50Ms = lat.quantileMs(50)
	res.P99Ms = lat.quantileMs(99)
	res.P999Ms = lat.quantileMs(99.9)
	res.MaxMs = lat.maxMs()
	res.DiskStalls = i64(stalls)
	res.DiskStalledMs = f64(float64(stalled) / float64(time.Millisecond))
	return res, nil
}
