package delivery

import (
	"encoding/json"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	"go.yaml.in/yaml/v3"

	"github.com/pgs2/pgs2/pkg/metrics"
)

// TestMetricNames: every metric pgs2 exports follows the Prometheus
// conventions (promlint: units, _total on counters, help text), and the
// Grafana dashboard and the alert rules in deploy/ name only metrics that
// exist.
func TestMetricNames(t *testing.T) {
	reg := metrics.Registry()
	metrics.NewCapture(metrics.WithSource(reg, "app"), func() float64 { return 0 })
	r := metrics.NewRouter(metrics.WithSource(reg, "app"))
	dm := metrics.NewDelivery(reg)
	d := &Delivery{sinks: map[string]*sink{"docs": nil}}
	reg.MustRegister(&gauges{d: d, dead: map[Unit]uint64{}, deadAt: time.Now()})
	// Vectors show in a scrape once they have a child.
	r.Changes.WithLabelValues("docs", metrics.Routed)
	dm.Records.WithLabelValues("docs")
	dm.Batches.WithLabelValues("docs")
	dm.Failures.WithLabelValues("docs", "transient", "503", "unavailable")
	dm.Parked.WithLabelValues("docs")
	dm.DeadLetters.WithLabelValues("docs")
	dm.AppendTime.WithLabelValues("docs")
	dm.CommitToAck.WithLabelValues("docs")
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	problems, err := promlint.NewWithMetricFamilies(mfs).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		if strings.HasPrefix(p.Metric, "pgs2_") {
			t.Errorf("%s: %s", p.Metric, p.Text)
		}
	}
	exported := map[string]bool{}
	for _, mf := range mfs {
		name := mf.GetName()
		exported[name] = true
		if mf.GetType().String() == "HISTOGRAM" {
			for _, s := range []string{"_bucket", "_sum", "_count"} {
				exported[name+s] = true
			}
		}
		if strings.HasPrefix(name, "pgs2_capture_") || strings.HasPrefix(name, "pgs2_router_") {
			for _, m := range mf.GetMetric() {
				has := false
				for _, l := range m.GetLabel() {
					has = has || l.GetName() == "source"
				}
				if !has {
					t.Errorf("%s has no source label", name)
				}
			}
		}
	}
	for _, want := range []string{"pgs2_build_info", "pgs2_capture_replication_lag_bytes", "pgs2_capture_replication_lag_seconds",
		"pgs2_router_changes_total", "pgs2_router_pending_changes", "pgs2_delivery_commit_to_ack_seconds",
		"pgs2_delivery_pending_messages", "pgs2_delivery_parked_groups", "pgs2_delivery_blocked_streams", "pgs2_delivery_dead_letters",
		"pgs2_delivery_append_failures_total"} {
		if !exported[want] {
			t.Errorf("no metric %s", want)
		}
	}

	names := regexp.MustCompile(`pgs2_[a-z0-9_]+`)
	check := func(where, expr string) {
		if len(names.FindAllString(expr, -1)) == 0 {
			t.Errorf("%s: %q names no pgs2 metric", where, expr)
		}
		for _, n := range names.FindAllString(expr, -1) {
			if !exported[n] {
				t.Errorf("%s: %q names %s, which pgs2 does not export", where, expr, n)
			}
		}
	}
	var dash struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	b, err := os.ReadFile("../../deploy/grafana/pgs2-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatalf("the dashboard is not JSON: %v", err)
	}
	n := 0
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			check("dashboard panel "+p.Title, tg.Expr)
			n++
		}
	}
	var rules struct {
		Groups []struct {
			Rules []struct {
				Alert string `yaml:"alert"`
				Expr  string `yaml:"expr"`
			} `yaml:"rules"`
		} `yaml:"groups"`
	}
	if b, err = os.ReadFile("../../deploy/prometheus-alerts.yml"); err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, &rules); err != nil {
		t.Fatalf("the alert rules are not YAML: %v", err)
	}
	var alerts []string
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			check("alert "+r.Alert, r.Expr)
			alerts = append(alerts, r.Alert)
		}
	}
	for _, want := range []string{"PGS2CaptureDown", "PGS2ReplicationLagHigh", "PGS2SinkLagHigh", "PGS2StreamBlocked", "PGS2ParkedGroups"} {
		if !slices.Contains(alerts, want) {
			t.Errorf("no alert %s (have %v)", want, alerts)
		}
	}
	if n < 15 {
		t.Errorf("the dashboard has %d queries", n)
	}
}
