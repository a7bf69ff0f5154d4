// Package metrics holds pgs2's Prometheus metrics, served at /metrics next
// to the health endpoints.
package metrics

import (
	"github.com/pgs2/pgs2/pkg/version"
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Capture's metrics.
type Capture struct {
	Changes      prometheus.Counter
	Skipped      prometheus.Counter
	Transactions prometheus.Counter
	Truncates    prometheus.Counter
	Messages     prometheus.Counter
	BackfillRows prometheus.Counter
	Rereads      prometheus.Counter
	Sessions     prometheus.Counter
	ConfirmedLSN prometheus.Gauge
	ServerLSN    prometheus.Gauge
	InFlight     prometheus.GaugeFunc
	Active       prometheus.Gauge
	WALRetained  prometheus.Gauge
	LagBytes     prometheus.Gauge
	LagSeconds   prometheus.Gauge
}

// NewCapture registers capture's metrics in r; inFlight reports messages
// awaiting their PubAck.
func NewCapture(r prometheus.Registerer, inFlight func() float64) *Capture {
	f := func(name, help string) prometheus.Counter {
		c := prometheus.NewCounter(prometheus.CounterOpts{Namespace: "pgs2", Subsystem: "capture", Name: name, Help: help})
		r.MustRegister(c)
		return c
	}
	g := func(name, help string) prometheus.Gauge {
		c := prometheus.NewGauge(prometheus.GaugeOpts{Namespace: "pgs2", Subsystem: "capture", Name: name, Help: help})
		r.MustRegister(c)
		return c
	}
	m := &Capture{
		Changes:      f("changes_published_total", "Changes published to JetStream."),
		Skipped:      f("changes_skipped_total", "Changes re-read from the slot that JetStream already held."),
		Transactions: f("transactions_total", "Transactions read from the slot."),
		Truncates:    f("truncates_ignored_total", "TRUNCATE messages of captured tables, not emitted as changes."),
		Messages:     f("logical_messages_total", "Logical decoding messages read from the slot (pg_logical_emit_message): pgs2's own markers and other applications'."),
		BackfillRows: f("backfill_rows_total", "Rows of backfills placed in the stream as read changes (those changed during their chunk's window are not)."),
		Rereads:      f("backfill_chunks_reread_total", "Backfill chunks read again: their snapshot missed a commit, or the table's columns changed."),
		Sessions:     f("sessions_total", "Replication sessions started (restarts after failures included)."),
		ConfirmedLSN: g("confirmed_lsn", "LSN confirmed to Postgres (flush position of the slot)."),
		ServerLSN:    g("server_wal_end_lsn", "Server WAL end from the last keepalive; minus confirmed_lsn is the slot's lag in bytes."),
		Active:       g("active", "1 while this process holds its source's lease and captures it; 0 on a standby."),
		WALRetained:  g("slot_wal_retained_bytes", "WAL the replication slot keeps on the server (current WAL position minus the slot's restart_lsn), read every 5s."),
		LagBytes:     g("replication_lag_bytes", "Server WAL position minus the slot's confirmed position, read every 5s."),
		LagSeconds:   g("replication_lag_seconds", "The slot's walsender flush lag (pg_stat_replication.flush_lag; 0 once caught up), read every 5s."),
	}
	m.InFlight = prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "pgs2", Subsystem: "capture", Name: "inflight_messages",
		Help: "Messages published and awaiting their PubAck."}, inFlight)
	r.MustRegister(m.InFlight)
	return m
}

// Registry returns a registry with the Go and process collectors.
func Registry() *prometheus.Registry {
	r := prometheus.NewRegistry()
	r.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	in := version.Get()
	r.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "pgs2_build_info",
		Help:        "1, labelled with the running pgs2's version, commit and Go version",
		ConstLabels: prometheus.Labels{"version": in.Version, "revision": in.Revision, "goversion": in.Go}},
		func() float64 { return 1 }))
	return r
}

// Handler serves r in the Prometheus text format.
func Handler(r *prometheus.Registry) http.Handler {
	return promhttp.HandlerFor(r, promhttp.HandlerOpts{})
}

// Router's metrics (registered with a source label: see WithSource).
type Router struct {
	// Changes counts each change per sink by outcome: routed (published
	// for the sink), filtered (its filter dropped it), failed (a function
	// failed: routed marked, to be parked by delivery), disabled (the sink
	// is disabled: nothing routed).
	Changes *prometheus.CounterVec // by sink, outcome
	// Pending is what the changes stream holds beyond the last change
	// read (the active router's backlog).
	Pending prometheus.Gauge
	Active  prometheus.Gauge
	// Messages counts delivery messages published.
	Messages prometheus.Counter
}

// The outcomes of Router.Changes.
const (
	Routed   = "routed"
	Filtered = "filtered"
	Failed   = "failed"
	Disabled = "disabled"
)

// NewRouter registers the router's metrics in r.
func NewRouter(r prometheus.Registerer) *Router {
	m := &Router{
		Changes: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "pgs2", Subsystem: "router", Name: "changes_total",
			Help: "Changes per sink by outcome: routed, filtered (the sink's filter dropped it), failed (a function failed; delivery parks it), disabled (the sink is)."},
			[]string{"sink", "outcome"}),
		Pending: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: "pgs2", Subsystem: "router", Name: "pending_changes",
			Help: "Messages of the changes stream beyond the last one the active router read (its backlog)."}),
		Active: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: "pgs2", Subsystem: "router", Name: "active",
			Help: "1 while this process holds its source's lease and routes it; 0 on a standby."}),
		Messages: prometheus.NewCounter(prometheus.CounterOpts{Namespace: "pgs2", Subsystem: "router", Name: "messages_published_total",
			Help: "Delivery messages published (each holds the changes of one subject of a round)."}),
	}
	r.MustRegister(m.Changes, m.Pending, m.Active, m.Messages)
	return m
}

// WithSource labels every metric registered through the result with the
// source (capture and router serve one each; several run side by side).
func WithSource(r prometheus.Registerer, source string) prometheus.Registerer {
	return prometheus.WrapRegistererWith(prometheus.Labels{"source": source}, r)
}

// Delivery's metrics.
type Delivery struct {
	Records     *prometheus.CounterVec // by sink
	Batches     *prometheus.CounterVec // by sink
	Failures    *prometheus.CounterVec // by sink, class, status, code
	Parked      *prometheus.CounterVec // by sink
	DeadLetters *prometheus.CounterVec // by sink
	Units       prometheus.Gauge
	AppendTime  *prometheus.HistogramVec // by sink
	// CommitToAck is from a change's commit in the database to S2's
	// acknowledgement of the append holding it, observed per append for
	// its oldest change.
	CommitToAck *prometheus.HistogramVec // by sink
}

// NewDelivery registers delivery's metrics in r.
func NewDelivery(r prometheus.Registerer) *Delivery {
	cv := func(name, help string, labels ...string) *prometheus.CounterVec {
		c := prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "pgs2", Subsystem: "delivery", Name: name, Help: help}, labels)
		r.MustRegister(c)
		return c
	}
	m := &Delivery{
		Records: cv("records_appended_total", "Records appended to S2.", "sink"),
		Batches: cv("appends_total", "Successful S2 appends (batches).", "sink"),
		Failures: cv("append_failures_total", "Failed S2 appends, by failure class, HTTP status (0: none, a network error or timeout) and S2 error code.",
			"sink", "class", "status", "code"),
		Parked:      cv("parked_messages_total", "Messages moved to the park (their group waits).", "sink"),
		DeadLetters: cv("dead_letters_total", "Messages moved to the dead-letter stream after retry.max_attempts.", "sink"),
		Units: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: "pgs2", Subsystem: "delivery", Name: "units_owned",
			Help: "S2 streams this process writes to (leased)."}),
		AppendTime: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: "pgs2", Subsystem: "delivery", Name: "append_seconds",
			Help: "Duration of successful S2 appends.", Buckets: prometheus.ExponentialBuckets(0.001, 2, 14)}, []string{"sink"}),
		CommitToAck: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: "pgs2", Subsystem: "delivery", Name: "commit_to_ack_seconds",
			Help:    "From a change's commit in the database to S2's acknowledgement of its append (per append, its oldest change).",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 18)}, []string{"sink"}),
	}
	r.MustRegister(m.Units, m.AppendTime, m.CommitToAck)
	return m
}
