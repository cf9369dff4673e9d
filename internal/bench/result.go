package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"reflect"
	"strings"
	"text/tabwriter"
)

// Result is one scenario's outcome. The first fields are present in every
// result (null where the scenario has no such figure); the rest are
// omitted when they do not apply.
type Result struct {
	Scenario              string   `json:"scenario"`
	DeliveredPerSec       *float64 `json:"delivered_per_sec"`
	AcceptedPerSec        *float64 `json:"accepted_per_sec"`
	P50Ms                 *float64 `json:"p50_ms"`
	P99Ms                 *float64 `json:"p99_ms"`
	P999Ms                *float64 `json:"p999_ms"`
	Lost                  *int64   `json:"lost"`
	Duplicates            *int64   `json:"duplicates"`
	ServerCPUUsPerMsg     *float64 `json:"server_cpu_us_per_msg"`
	ConnsHeld             *int64   `json:"conns_held"`
	ServerRSSBytesPerConn *float64 `json:"server_rss_bytes_per_conn"`

	Server          string   `json:"server,omitempty"`
	Params          string   `json:"params,omitempty"`
	DurationSec     *float64 `json:"duration_sec,omitempty"`
	Sent            *int64   `json:"sent,omitempty"`
	Accepted        *int64   `json:"accepted,omitempty"`
	Delivered       *int64   `json:"delivered,omitempty"`
	Redelivered     *int64   `json:"redelivered,omitempty"`
	Unexpected      *int64   `json:"unexpected,omitempty"`
	ReceiptsSeen    *int64   `json:"receipts,omitempty"`
	MaxMs           *float64 `json:"max_ms,omitempty"`
	LastDeliveryMs  *float64 `json:"time_to_last_delivery_ms,omitempty"`
	LastDeliveryP50 *float64 `json:"time_to_last_delivery_p50_ms,omitempty"`
	LastDeliveryP99 *float64 `json:"time_to_last_delivery_p99_ms,omitempty"`
	LastDeliveryMax *float64 `json:"time_to_last_delivery_max_ms,omitempty"`
	Rounds          *int64   `json:"rounds,omitempty"`
	DrainMs         *float64 `json:"drain_ms,omitempty"`
	ServerRestartMs *float64 `json:"server_restart_ms,omitempty"`
	BackMs          *float64 `json:"all_back_ms,omitempty"`
	BackDrainedMs   *float64 `json:"all_back_and_drained_ms,omitempty"`
	ConnsFailed     *int64   `json:"conns_failed,omitempty"`
	ConnsDropped    *int64   `json:"conns_dropped,omitempty"`
	ConnectPerSec   *float64 `json:"connect_per_sec,omitempty"`
	Reconnects      *int64   `json:"reconnect_attempts,omitempty"`
	Workers         *int64   `json:"bench_processes,omitempty"`
	// disk: writes each followed by an fdatasync, their rate, and those
	// that took 100 ms or more (stalls) with the time they took together.
	DiskSyncs       *int64   `json:"disk_syncs,omitempty"`
	DiskSyncsPerSec *float64 `json:"disk_syncs_per_sec,omitempty"`
	DiskStalls      *int64   `json:"disk_stalls_over_100ms,omitempty"`
	DiskStalledMs   *float64 `json:"disk_stalled_ms,omitempty"`

	// ServerProcs is the server's GOMAXPROCS, from its metrics
	// (go_sched_gomaxprocs_threads).
	ServerProcs        *int64   `json:"server_procs,omitempty"`
	ServerCPUSeconds   *float64 `json:"server_cpu_seconds,omitempty"`
	ServerRSSBytes     *float64 `json:"server_rss_bytes,omitempty"`
	ServerRSSBaseBytes *float64 `json:"server_rss_base_bytes,omitempty"`
	ServerPeakRSSBytes *float64 `json:"server_peak_rss_bytes,omitempty"`
	// ServerWALFsyncs counts the fsyncs of the server's mailbox WAL
	// during the measured phase; ServerWALFsyncsSlow those that took
	// longer than ~100 ms (the largest bound of the server's
	// courier_mailbox_wal_fsync_seconds histogram not above 0.1 s);
	// ServerWALFsyncMeanMs is their mean time. A slow fsync holds up
	// every message accepted meanwhile, so these explain a tail that the
	// server's CPU does not.
	ServerWALFsyncs      *int64   `json:"server_wal_fsyncs,omitempty"`
	ServerWALFsyncMeanMs *float64 `json:"server_wal_fsync_mean_ms,omitempty"`
	ServerWALFsyncsSlow  *int64   `json:"server_wal_fsyncs_over_100ms,omitempty"`
	// ServerAnonRSSBytesPerConn is ServerRSSBytesPerConn counting
	// anonymous memory only (RssAnon): not the pages of the binary's code
	// and data that serving connections reads in once, whatever their
	// number (a child server only).
	ServerAnonRSSBytesPerConn *float64         `json:"server_anon_rss_bytes_per_conn,omitempty"`
	ServerHeapBytesPerConn    *float64         `json:"server_heap_inuse_bytes_per_conn,omitempty"`
	ServerStackBytesPerConn   *float64         `json:"server_stack_inuse_bytes_per_conn,omitempty"`
	ServerGoroutinesPerConn   *float64         `json:"server_goroutines_per_conn,omitempty"`
	BenchRSSBytesPerConn      *float64         `json:"bench_rss_bytes_per_conn,omitempty"`
	BenchCPUSeconds           *float64         `json:"bench_cpu_seconds,omitempty"`
	BenchPollers              *int64           `json:"bench_pollers,omitempty"` // the bench's own event loops (--pollers)
	Counters                  map[string]int64 `json:"counters,omitempty"`
	FirstError                string           `json:"first_error,omitempty"`
}

// OK reports whether the run met the bench's correctness bar: nothing
// lost, nothing duplicated, nothing delivered that was never sent, and
// (when the scenario holds connections) every connection held.
func (r *Result) OK(wantConns int64) error {
	var bad []string
	if r.Lost != nil && *r.Lost != 0 {
		bad = append(bad, fmt.Sprintf("%d lost", *r.Lost))
	}
	if r.Duplicates != nil && *r.Duplicates != 0 {
		bad = append(bad, fmt.Sprintf("%d duplicates", *r.Duplicates))
	}
	if r.Unexpected != nil && *r.Unexpected != 0 {
		bad = append(bad, fmt.Sprintf("%d unexpected deliveries", *r.Unexpected))
	}
	if wantConns > 0 && (r.ConnsHeld == nil || *r.ConnsHeld != wantConns) {
		held := int64(0)
		if r.ConnsHeld != nil {
			held = *r.ConnsHeld
		}
		bad = append(bad, fmt.Sprintf("%d of %d connections held", held, wantConns))
	}
	if len(bad) == 0 {
		return nil
	}
	return fmt.Errorf("%s: %s", r.Scenario, strings.Join(bad, ", "))
}

func f64(v float64) *float64 {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return nil
	}
	return &v
}
func i64(v int64) *int64 { return &v }

// WriteJSON writes the result as one JSON object and a newline.
func (r *Result) WriteJSON(w io.Writer) error {
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

// WriteTable writes the result as a two-column table, in field order,
// skipping figures that do not apply.
func (r *Result) WriteTable(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	v := reflect.ValueOf(r).Elem()
	ty := v.Type()
	for i := range ty.NumField() {
		name, _, _ := strings.Cut(ty.Field(i).Tag.Get("json"), ",")
		f := v.Field(i)
		var s string
		switch f.Kind() {
		case reflect.String:
			s = f.String()
		case reflect.Pointer:
			if f.IsNil() {
				continue
			}
			s = human(name, f.Elem().Interface())
		case reflect.Map:
			for _, k := range sortedKeys(f.Interface().(map[string]int64)) {
				fmt.Fprintf(tw, "  %s\t%d\n", k, f.Interface().(map[string]int64)[k])
			}
			continue
		}
		if s == "" {
			continue
		}
		fmt.Fprintf(tw, "%s\t%s\n", name, s)
	}
	return tw.Flush()
}

func human(name string, v any) string {
	switch x := v.(type) {
	case int64:
		return groupDigits(fmt.Sprint(x))
	case float64:
		switch {
		case strings.HasSuffix(name, "_bytes") || strings.Contains(name, "_bytes_"):
			return fmt.Sprintf("%s (%.1f KiB)", groupDigits(fmt.Sprintf("%.0f", x)), x/1024)
		case strings.HasSuffix(name, "_ms") || strings.HasSuffix(name, "_sec") && x < 100:
			return fmt.Sprintf("%.3f", x)
		case x >= 100:
			return groupDigits(fmt.Sprintf("%.0f", x))
		default:
			return fmt.Sprintf("%.2f", x)
		}
	}
	return fmt.Sprint(v)
}

func groupDigits(s string) string {
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var b strings.Builder
	for i, ch := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(ch)
	}
	if neg {
		return "-" + b.String()
	}
	return b.String()
}
