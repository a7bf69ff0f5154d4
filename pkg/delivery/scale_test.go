package delivery_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/pgs2/pgs2/pkg/config"
	"github.com/pgs2/pgs2/pkg/natstest"
	"github.com/pgs2/pgs2/pkg/proctest"
	"github.com/pgs2/pgs2/pkg/s2local"
)

// startService runs bin/<name> (router or delivery) with config cfg.
func startService(t *testing.T, name, cfg string) *proctest.Proc {
	t.Helper()
	level := "error"
	if l := os.Getenv("PGS2_TEST_LOG"); l != "" {
		level = l
	}
	return proctest.Start(t, proctest.Build(t, "../../services/"+name), "--config", cfg, "--log-level", level)
}

// TestScaleOutUnderFaults: 200 groups × 200 updates routed over 4 S2
// streams, 3 delivery processes of which one is SIGKILLed and restarted
// twice, the router process SIGKILLed and restarted twice too, while
// s2local fails 30 % of appends with 503 and adds jittered latency: for
// every group the records are in commit order, none missing; duplicates
// are counted.
func TestScaleOutUnderFaults(t *testing.T) {
	const groups, rounds = 200, 200
	p := newPipeline(t, `CREATE TABLE counters (id int PRIMARY KEY, v int NOT NULL)`, []string{"public.counters"}, "app-basin")
	p.sinks = []config.Sink{{Name: "counters", Tables: []string{"public.counters"}, Basin: "app-basin",
		Routing: `{"stream": "counters-" + string(record.id % 4)}`}}
	if err := p.s2.SetFaults(s2local.FaultConfig{Rules: []s2local.FaultRule{{AppendsOnly: true,
		ErrorRate: 0.3, Statuses: []int{503}, LatencyMS: 2, JitterMS: 10}}}); err != nil {
		t.Fatal(err)
	}
	p.routerProcess = true
	p.startPipelineWithoutDelivery(t)
	cfg := filepath.Join(t.TempDir(), "cdc.yaml")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf(`source: {name: app, dsn: %q, tables: [counters]}
nats: {url: %q, partitions: 8}
sinks:
  - name: counters
    tables: [counters]
    basin: app-basin
    routing: '{"stream": "counters-" + string(record.id %% 4)}'
    endpoint: %s
    create_stream: true
    retry: {initial: 50ms, max: 1s}
`, p.pg.DSN("app"), p.ns.URL(), p.s2url)), 0o644); err != nil {
		t.Fatal(err)
	}
	rt := startService(t, "router", cfg)
	workers := []*proctest.Proc{startService(t, "delivery", cfg), startService(t, "delivery", cfg), startService(t, "delivery", cfg)}
	p.pg.MustExec(t, "app", fmt.Sprintf(`INSERT INTO counters SELECT g, 0 FROM generate_series(1, %d) g`, groups))
	done := make(chan struct{})
	go func() {
		defer close(done)
		for r := 1; r <= rounds; r++ {
			p.pg.MustExec(t, "app", `UPDATE counters SET v = v + 1 WHERE id % 2 = 0`)
			p.pg.MustExec(t, "app", `UPDATE counters SET v = v + 1 WHERE id % 2 = 1`)
		}
	}()
	for k := 1; k <= 2; k++ {
		time.Sleep(time.Second)
		rt.Kill()
		rt = startService(t, "router", cfg)
		time.Sleep(time.Second)
		workers[0].Kill()
		workers[0] = startService(t, "delivery", cfg)
	}
	<-done
	total, dups := 0, 0
	last := map[float64]float64{}
	for s := 0; s < 4; s++ {
		var want int
		for id := 1; id <= groups; id++ {
			if id%4 == s {
				want += rounds + 1
			}
		}
		recs := p.recordsWithin(t, "app-basin", fmt.Sprintf("counters-%d", s), want, 3*time.Minute)
		keys := map[string]bool{}
		for _, r := range recs {
			k := r.Headers["idempotency-key"]
			if keys[k] {
				dups++
				continue
			}
			keys[k] = true
			rec := r.Body["record"].(map[string]any)
			id, v := rec["id"].(float64), rec["v"].(float64)
			if prev, ok := last[id]; (ok && v != prev+1) || (!ok && v != 0) {
				t.Fatalf("group %v: v=%v after %v (stream counters-%d, record %d)", id, v, prev, s, r.Seq)
			}
			last[id] = v
		}
		total += len(recs)
	}
	t.Logf("%d records in 4 streams, %d duplicates", total, dups)
	if dups != 0 {
		t.Errorf("%d duplicates", dups)
	}
	for id, v := range last {
		if v != rounds {
			t.Errorf("group %v ends at %v, want %d", id, v, rounds)
		}
	}
}

// TestScaleStreams: one change to each of n S2 streams (PGS2_SCALE_STREAMS,
// default 300; 10,000 for docs/benchmarks.md), 3 delivery processes. It
// reports each process's idle CPU and the JetStream API requests per
// second once everything is delivered, then SIGKILLs one process, writes
// a change to every stream again and reports how long until the killed
// process's streams are taken over and every change is in S2 (each
// stream then holds exactly its two records, in order). The units must be
// owned again within 10 s.
func TestScaleStreams(t *testing.T) {
	n := 300
	if v := os.Getenv("PGS2_SCALE_STREAMS"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 3 {
			t.Fatalf("PGS2_SCALE_STREAMS=%q: want a number of streams ≥ 3", v)
		}
	}
	p := newPipeline(t, `CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL)`, []string{"public.items"}, "scale-basin")
	routing := fmt.Sprintf(`{"stream": "s-" + string(record.id %% %d)}`, n)
	p.sinks = []config.Sink{{Name: "items", Tables: []string{"public.items"}, Basin: "scale-basin", Routing: routing}}
	p.routerProcess = true
	p.startPipelineWithoutDelivery(t)
	cfg := filepath.Join(t.TempDir(), "cdc.yaml")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf(`source: {name: app, dsn: %q, tables: [items]}
nats: {url: %q, partitions: 8}
sinks:
  - name: items
    tables: [items]
    basin: scale-basin
    routing: '%s'
    endpoint: %s
    create_stream: true
    batch: {linger: 5ms}
    retry: {initial: 50ms, max: 1s}
`, p.pg.DSN("app"), p.ns.URL(), routing, p.s2url)), 0o644); err != nil {
		t.Fatal(err)
	}
	startService(t, "router", cfg)
	procs := []*proctest.Proc{startService(t, "delivery", cfg), startService(t, "delivery", cfg), startService(t, "delivery", cfg)}
	begin := time.Now()
	p.pg.MustExec(t, "app", fmt.Sprintf(`INSERT INTO items SELECT g, 0 FROM generate_series(1, %d) g`, n))
	waitMetric(t, procs, "pgs2_delivery_records_appended_total", float64(n), 10*time.Minute)
	t.Logf("%d streams: first change of each delivered in %s", n, time.Since(begin).Round(time.Millisecond))

	time.Sleep(3 * time.Second) // let start-up work settle
	const window = 10 * time.Second
	api0, cpu0 := jsAPITotal(p.ns), cpuTimes(procs)
	time.Sleep(window)
	api1, cpu1 := jsAPITotal(p.ns), cpuTimes(procs)
	owned := 0
	for i := range procs {
		units := metricText(t, procs[i], "pgs2_delivery_units_owned")
		t.Logf("idle: delivery process %d: %.1f%% CPU, %s units", i, 100*(cpu1[i]-cpu0[i]).Seconds()/window.Seconds(), units)
		k, _ := strconv.Atoi(units)
		owned += k
	}
	if owned != n {
		t.Errorf("the processes own %d units in all, want %d (each once)", owned, n)
	}
	t.Logf("idle: JetStream API requests: %.1f/s", float64(api1-api0)/window.Seconds())

	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		ctx := context.Background()
		for si := range p.js.ListStreams(ctx).Info() {
			t.Logf("stream %s: %d messages, %d subjects, %d consumers", si.Config.Name, si.State.Msgs, si.State.NumSubjects, si.State.Consumers)
		}
	})
	survivors := procs[1:]
	before, _ := strconv.ParseFloat(metricText(t, survivors[0], "pgs2_delivery_records_appended_total"), 64)
	b2, _ := strconv.ParseFloat(metricText(t, survivors[1], "pgs2_delivery_records_appended_total"), 64)
	procs[0].Kill()
	killed := time.Now()
	p.pg.MustExec(t, "app", `UPDATE items SET v = 1`)
	takenOver := waitMetric(t, survivors, "pgs2_delivery_units_owned", float64(n), 2*time.Minute)
	t.Logf("takeover after SIGKILL: units owned again after %s", takenOver.Sub(killed).Round(time.Millisecond))
	delivered := waitMetric(t, survivors, "pgs2_delivery_records_appended_total", before+b2+float64(n), 5*time.Minute)
	t.Logf("takeover after SIGKILL: every change appended after %s", delivered.Sub(killed).Round(time.Millisecond))
	waitS2(t, p, "scale-basin", n, 2, time.Minute)
	if d := takenOver.Sub(killed); d > 10*time.Second {
		t.Errorf("takeover took %s", d)
	}
}

// waitMetric waits until the sum of a metric over procs reaches want and
// returns when it did.
func waitMetric(t *testing.T, procs []*proctest.Proc, name string, want float64, within time.Duration) time.Time {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		sum := 0.0
		for _, pr := range procs {
			v, _ := strconv.ParseFloat(metricText(t, pr, name), 64)
			sum += v
		}
		if sum >= want {
			return time.Now()
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %v of %v after %s", name, sum, want, within)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// metricText is a process's value of an unlabelled or single-series
// metric ("0" when it has none).
func metricText(t *testing.T, pr *proctest.Proc, name string) string {
	t.Helper()
	resp, err := http.Get("http://" + pr.Addr + "/metrics")
	if err != nil {
		return "0"
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	sum := 0.0
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, name+" ") || strings.HasPrefix(line, name+"{") {
			f := strings.Fields(line)
			v, _ := strconv.ParseFloat(f[len(f)-1], 64)
			sum += v
		}
	}
	return strconv.FormatFloat(sum, 'f', -1, 64)
}

// cpuTimes is each process's user+system CPU time so far.
func cpuTimes(procs []*proctest.Proc) []time.Duration {
	out := make([]time.Duration, len(procs))
	for i, pr := range procs {
		out[i] = proctest.CPU(pr.Cmd.Process.Pid)
	}
	return out
}

// jsAPITotal is how many JetStream API requests the server has served.
func jsAPITotal(ns *natstest.Server) uint64 {
	jsz, err := ns.Jsz(&server.JSzOptions{})
	if err != nil {
		return 0
	}
	return jsz.API.Total
}

// waitS2 waits until each of n streams s-0..s-(n-1) holds per records of
// data, and checks that their values of v are 0, 1, … in order; it
// returns when they all did.
func waitS2(t *testing.T, p *pipeline, basin string, n, per int, within time.Duration) time.Time {
	t.Helper()
	deadline := time.Now().Add(within)
	for i := 0; i < n; i++ {
		stream := fmt.Sprintf("s-%d", i)
		for k, r := range p.recordsWithin(t, basin, stream, per, max(time.Until(deadline), time.Second)) {
			if v := r.Body["record"].(map[string]any)["v"].(float64); int(v) != k {
				t.Fatalf("%s: record %d has v=%v", stream, k, v)
			}
		}
	}
	return time.Now()
}
