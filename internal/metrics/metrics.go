// Package metrics holds courier's Prometheus instruments. A *Metrics is
// created against a registry the caller owns and passed to the components
// that update it; nothing here is global.
package metrics

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the server's instruments.
type Metrics struct {
	Connections    prometheus.Gauge
	Connects       *prometheus.CounterVec // by result
	Accepted       prometheus.Counter
	Duplicates     prometheus.Counter
	Refused        *prometheus.CounterVec // by code
	Delivered      prometheus.Counter
	Handed         prometheus.Counter
	MailboxReads   prometheus.Counter
	Acked          prometheus.Counter
	Receipts       *prometheus.CounterVec // by type
	DeliverLatency prometheus.Histogram
	FrameErrors    *prometheus.CounterVec // by code
}

// New creates the instruments and registers them with reg.
func New(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		Connections: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "courier_connections", Help: "Device connections currently open.",
		}),
		Connects: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "courier_connects_total", Help: "Connection attempts, by result.",
		}, []string{"result"}),
		Accepted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "courier_messages_accepted_total", Help: "Messages made durable and answered accepted (duplicates excluded).",
		}),
		Duplicates: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "courier_messages_duplicate_total", Help: "Sends answered with an earlier acceptance (same client message id).",
		}),
		Refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "courier_messages_refused_total", Help: "Sends refused, by refusal code.",
		}, []string{"code"}),
		Delivered: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "courier_entries_delivered_total", Help: "Mailbox entries written to a device connection (redeliveries included).",
		}),
		Handed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "courier_entries_handed_total", Help: "Mailbox entries written to a device connection as handed over by the append that made them durable, without a mailbox read (also counted in courier_entries_delivered_total).",
		}),
		MailboxReads: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "courier_gateway_mailbox_reads_total", Help: "Mailbox reads made by device connections to find entries to send.",
		}),
		Acked: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "courier_entries_acked_total", Help: "Mailbox entries acknowledged and deleted.",
		}),
		Receipts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "courier_receipts_total", Help: "Receipt events emitted, by type.",
		}, []string{"type"}),
		DeliverLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "courier_accept_to_deliver_seconds",
			Help:    "Time from a message's acceptance to its delivery on a device connection (includes time the device was offline).",
			Buckets: []float64{.0005, .001, .002, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300, 3600, 86400},
		}),
		FrameErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "courier_frame_errors_total", Help: "Client frames answered with an error, by code.",
		}, []string{"code"}),
	}
	reg.MustRegister(m.Connections, m.Connects, m.Accepted, m.Duplicates, m.Refused, m.Delivered,
		m.Handed, m.MailboxReads, m.Acked, m.Receipts, m.DeliverLatency, m.FrameErrors)
	return m
}
