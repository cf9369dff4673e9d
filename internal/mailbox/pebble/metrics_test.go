package pebble

import (
	"testing"
	"time"

	pebbledb "github.com/cockroachdb/pebble/v2"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox"
)

// TestRebucket checks the conversion of Pebble's fsync histogram
// (nanoseconds, its own bounds) into seconds: each reported bound is one
// of Pebble's, not above the bound asked for, with the exact cumulative
// count of observations at or below it.
func TestRebucket(t *testing.T) {
	h := prometheus.NewHistogram(prometheus.HistogramOpts{Buckets: pebbledb.FsyncLatencyBuckets})
	obs := []time.Duration{50 * time.Microsecond, 300 * time.Microsecond, 900 * time.Microsecond, 3 * time.Millisecond,
		40 * time.Millisecond, 90 * time.Millisecond, 150 * time.Millisecond, 700 * time.Millisecond, 20 * time.Second}
	var sum float64
	for _, d := range obs {
		h.Observe(float64(d))
		sum += d.Seconds()
	}
	var m dto.Metric
	if err := h.Write(&m); err != nil {
		t.Fatal(err)
	}
	count, gotSum, buckets := rebucket(m.Histogram, walFsyncBounds)
	if count != uint64(len(obs)) {
		t.Errorf("count %d, want %d", count, len(obs))
	}
	if d := gotSum - sum; d > 1e-9 || d < -1e-9 {
		t.Errorf("sum %v s, want %v s", gotSum, sum)
	}
	pebbleBound := map[float64]bool{}
	for _, b := range pebbledb.FsyncLatencyBuckets {
		pebbleBound[b*1e-9] = true
	}
	if len(buckets) < 10 {
		t.Errorf("only %d buckets: %v", len(buckets), buckets)
	}
	for ub, cum := range buckets {
		if !pebbleBound[ub] {
			t.Errorf("bound %v s is not one of Pebble's", ub)
		}
		near := false // at or below a wanted bound, within Pebble's resolution (×1.17)
		for _, w := range walFsyncBounds {
			near = near || ub <= w*(1+1e-9) && ub > w/1.2
		}
		if !near {
			t.Errorf("bound %v s is not just below any of %v", ub, walFsyncBounds)
		}
		want := uint64(0)
		for _, d := range obs {
			if d.Seconds() <= ub {
				want++
			}
		}
		if cum != want {
			t.Errorf("bucket ≤ %v s: %d, want %d", ub, cum, want)
		}
	}
	// The bound just below 100 ms is reported (the bench counts slow
	// fsyncs above it) and is within Pebble's resolution of it.
	best := 0.0
	for ub := range buckets {
		if ub <= 0.1 && ub > best {
			best = ub
		}
	}
	if best < 0.085 {
		t.Errorf("largest bound ≤ 0.1 s is %v", best)
	}
}

// TestWALFsyncCollector checks that the store's collector reports the
// fsyncs that synced appends made.
func TestWALFsyncCollector(t *testing.T) {
	s := mustOpen(t, t.TempDir(), Options{})
	defer s.Close()
	cs := s.Collectors()
	reg := prometheus.NewRegistry()
	reg.MustRegister(cs...)
	count := func() uint64 {
		t.Helper()
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			if mf.GetName() == "courier_mailbox_wal_fsync_seconds" {
				return mf.GetMetric()[0].GetHistogram().GetSampleCount()
			}
		}
		t.Fatal("no courier_mailbox_wal_fsync_seconds")
		return 0
	}
	before := count()
	d := ident.Device{User: "alice", ID: 1}
	for range 3 {
		if _, err := s.Append(ctx, mailbox.Batch{Items: []mailbox.Item{item(d, "x")}}); err != nil {
			t.Fatal(err)
		}
	}
	// Pebble's WAL writer releases a sync's waiters before it records the
	// sync's latency: the last append may return before its fsync is
	// counted.
	after := count()
	for deadline := time.Now().Add(10 * time.Second); after < before+3 && time.Now().Before(deadline); after = count() {
		time.Sleep(time.Millisecond)
	}
	if after < before+3 {
		t.Errorf("fsyncs %d → %d after 3 synced appends one after another", before, after)
	}
}
