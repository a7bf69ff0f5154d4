package delivery

import (
	"context"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/pgs2/pgs2/pkg/bus"
)

// gauges exports, at each scrape, what this process's S2 streams are now:
// per sink the messages waiting for them, their lag, parked groups,
// blocked streams and dead letters. Each process reports the streams it
// writes, so sums over processes count each stream once.
type gauges struct {
	d *Delivery

	mu        sync.Mutex
	dead      map[Unit]uint64 // dead letters per unit, read every deadEvery
	deadAt    time.Time
	deadEvery time.Duration
}

var (
	gaugePending = prometheus.NewDesc("pgs2_delivery_pending_messages",
		"Delivery stream messages the sink's S2 streams written by this process have not read yet (at their last read).", []string{"sink"}, nil)
	gaugeLag = prometheus.NewDesc("pgs2_delivery_lag_seconds",
		"Now minus the commit time of the oldest change read and not yet in S2, the most of the sink's streams written by this process (0: nothing waits).", []string{"sink"}, nil)
	gaugeParked = prometheus.NewDesc("pgs2_delivery_parked_groups",
		"Groups parked now (a failed message and those behind it) in the sink's streams written by this process.", []string{"sink"}, nil)
	gaugeBlocked = prometheus.NewDesc("pgs2_delivery_blocked_streams",
		"The sink's S2 streams written by this process that S2 refuses appends to now.", []string{"sink"}, nil)
	gaugeDead = prometheus.NewDesc("pgs2_delivery_dead_letters",
		"Messages in the dead-letter stream now for the sink's streams written by this process (read every 15s).", []string{"sink"}, nil)
)

func (g *gauges) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{gaugePending, gaugeLag, gaugeParked, gaugeBlocked, gaugeDead} {
		ch <- d
	}
}

func (g *gauges) Collect(ch chan<- prometheus.Metric) {
	type sums struct {
		pending, parked, blocked, dead float64
		lag                            float64
	}
	by := map[string]*sums{}
	for _, name := range g.d.sinkNames() { // every sink, 0 when it has no stream here
		by[name] = &sums{}
	}
	now := time.Now()
	var units []Unit
	g.d.workers.Range(func(k, v any) bool {
		st := v.(*worker).status()
		s := by[st.Sink]
		if s == nil {
			s = &sums{}
			by[st.Sink] = s
		}
		s.pending += float64(st.Pending)
		s.parked += float64(st.ParkedGroups)
		if st.State == "blocked" {
			s.blocked++
		}
		if st.OldestWaitingMs > 1 {
			s.lag = max(s.lag, now.Sub(time.UnixMilli(st.OldestWaitingMs)).Seconds())
		}
		units = append(units, k.(Unit))
		return true
	})
	dead := g.deadLetters()
	for _, u := range units {
		by[u.Sink].dead += float64(dead[u])
	}
	for sink, s := range by {
		ch <- prometheus.MustNewConstMetric(gaugePending, prometheus.GaugeValue, s.pending, sink)
		ch <- prometheus.MustNewConstMetric(gaugeLag, prometheus.GaugeValue, s.lag, sink)
		ch <- prometheus.MustNewConstMetric(gaugeParked, prometheus.GaugeValue, s.parked, sink)
		ch <- prometheus.MustNewConstMetric(gaugeBlocked, prometheus.GaugeValue, s.blocked, sink)
		ch <- prometheus.MustNewConstMetric(gaugeDead, prometheus.GaugeValue, s.dead, sink)
	}
}

// deadLetters returns the dead letters per unit, read at most every 15s
// (a scrape costs one stream info request, not one per unit).
func (g *gauges) deadLetters() map[Unit]uint64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.deadEvery == 0 {
		g.deadEvery = 15 * time.Second
	}
	if g.dead != nil && time.Since(g.deadAt) < g.deadEvery {
		return g.dead
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	g.dead, g.deadAt = countDead(ctx, g.d.js), time.Now()
	return g.dead
}

// countDead counts the dead letters per unit (none when the stream does
// not exist yet).
func countDead(ctx context.Context, js jetstream.JetStream) map[Unit]uint64 {
	out := map[Unit]uint64{}
	s, err := js.Stream(ctx, DeadStream)
	if err != nil {
		return out
	}
	info, err := s.Info(ctx, jetstream.WithSubjectFilter("pgs2.dead.>"))
	if err != nil {
		return out
	}
	for subj, n := range info.State.Subjects {
		t := strings.Split(subj, ".")
		if len(t) == 5 {
			out[Unit{bus.UnescapeToken(t[2]), bus.UnescapeToken(t[3]), bus.UnescapeToken(t[4])}] += n
		}
	}
	return out
}

// sinkNames names the configured sinks (d.sinks does not change after New).
func (d *Delivery) sinkNames() []string {
	names := make([]string, 0, len(d.sinks))
	for n := range d.sinks {
		names = append(names, n)
	}
	return names
}
