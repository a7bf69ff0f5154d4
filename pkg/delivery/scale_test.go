package delivery_test

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/pgs2/pgs2/pkg/config"
	"github.com/pgs2/pgs2/pkg/proctest"
	"github.com/pgs2/pgs2/pkg/s2local"
)

// startService runs bin/<name> (router or delivery) with config cfg.
func startService(t *testing.T, name, cfg string) *proctest.Proc {
	t.Helper()
	return proctest.Start(t, proctest.Build(t, "../../services/"+name), "--config", cfg, "--log-level", "error")
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
