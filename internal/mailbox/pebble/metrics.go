package pebble

import (
	"math"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// walFsyncBounds are the upper bounds, in seconds, that
// courier_mailbox_wal_fsync_seconds reports: roughly doubling from 0.5 ms
// to 10 s (a disk fit for courier syncs in well under a millisecond; a
// stall of the host's disk shows in the upper buckets). Each is moved down
// to the nearest bound of Pebble's own finer histogram (walFsyncCollector),
// so the counts are exact, not interpolated.
var walFsyncBounds = []float64{0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10}

// walFsyncCollector exports the latency of the WAL's fsyncs, which
// Pebble's WAL writer records (in nanoseconds, in buckets of 0.1 ms up to
// 5 ms and then exponentially up to 10 s), as a Prometheus histogram in
// seconds: an fsync of the WAL is what every accepted message waits for, so
// its tail is the floor of the send→deliver latency's tail.
type walFsyncCollector struct {
	h    prometheus.Histogram // Pebble's; nil if it keeps none
	desc *prometheus.Desc
}

// Collectors returns the store's own metrics (mailbox.Instrumented).
func (s *Store) Collectors() []prometheus.Collector {
	return []prometheus.Collector{&walFsyncCollector{
		h: s.db.Metrics().LogWriter.FsyncLatency, // the same histogram for the life of the DB
		desc: prometheus.NewDesc("courier_mailbox_wal_fsync_seconds",
			"Latency of the mailbox WAL's fsyncs (each makes a group of appends durable; an accepted message waits for one).", nil, nil),
	}}
}

func (c *walFsyncCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *walFsyncCollector) Collect(ch chan<- prometheus.Metric) {
	if c.h == nil {
		return
	}
	var m dto.Metric
	if c.h.Write(&m) != nil || m.Histogram == nil {
		return
	}
	count, sum, buckets := rebucket(m.Histogram, walFsyncBounds)
	ch <- prometheus.MustNewConstHistogram(c.desc, count, sum, buckets)
}

// rebucket turns Pebble's histogram (nanoseconds) into one in seconds with
// at most one bucket per wanted bound: for each, the largest of Pebble's
// bounds not above it, with its exact cumulative count. Bounds that map to
// the same Pebble bound are reported once.
func rebucket(h *dto.Histogram, want []float64) (count uint64, sum float64, buckets map[float64]uint64) {
	const ns = 1e-9
	buckets = make(map[float64]uint64, len(want))
	src := h.GetBucket()
	j := 0
	for _, w := range want {
		// Advance to the last source bucket whose bound is ≤ w (with a
		// little slack for the float arithmetic of the bounds).
		for j < len(src) && src[j].GetUpperBound()*ns <= w*(1+1e-9) {
			j++
		}
		if j == 0 {
			continue
		}
		b := src[j-1]
		ub := b.GetUpperBound() * ns
		if ub <= 0 || math.IsInf(ub, 0) {
			continue
		}
		buckets[ub] = b.GetCumulativeCount()
	}
	return h.GetSampleCount(), h.GetSampleSum() * ns, buckets
}
