// Package metrics holds pgs2's Prometheus metrics, served at /metrics next
// to the health endpoints.
package metrics

import (
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
	Sessions     prometheus.Counter
	ConfirmedLSN prometheus.Gauge
	ServerLSN    prometheus.Gauge
	InFlight     prometheus.GaugeFunc
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
		Sessions:     f("sessions_total", "Replication sessions started (restarts after failures included)."),
		ConfirmedLSN: g("confirmed_lsn", "LSN confirmed to Postgres (flush position of the slot)."),
		ServerLSN:    g("server_wal_end_lsn", "Server WAL end from the last keepalive; minus confirmed_lsn is the slot's lag in bytes."),
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
	return r
}

// Handler serves r in the Prometheus text format.
func Handler(r *prometheus.Registry) http.Handler {
	return promhttp.HandlerFor(r, promhttp.HandlerOpts{})
}
