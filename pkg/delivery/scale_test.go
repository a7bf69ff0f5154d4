package delivery_test

import (
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pgs2/pgs2/pkg/config"
	"github.com/pgs2/pgs2/pkg/pgtest"
	"github.com/pgs2/pgs2/pkg/s2local"
)

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

// binary builds services/<name> once per test binary.
func binary(t *testing.T, name string) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "pgs2-bin-")
		if err != nil {
			buildErr = err
			return
		}
		binDir = dir
		for _, svc := range []string{"delivery", "router"} {
			if out, err := exec.Command("go", "build", "-o", filepath.Join(dir, svc), "../../services/"+svc).CombinedOutput(); err != nil {
				buildErr = fmt.Errorf("go build %s: %v\n%s", svc, err, out)
			}
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return filepath.Join(binDir, name)
}

// startWorker runs a delivery process and waits until it is ready.
func startWorker(t *testing.T, cfg string, n int) *exec.Cmd {
	return startService(t, "delivery", cfg, n)
}

// startService runs bin/<name> and waits until it is ready.
func startService(t *testing.T, name, cfg string, n int) *exec.Cmd {
	t.Helper()
	port, _ := pgtest.FreePort()
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	logPath := filepath.Join(t.TempDir(), fmt.Sprintf("%s-%d.log", name, n))
	logf, _ := os.Create(logPath)
	cmd := exec.Command(binary(t, name), "--config", cfg, "--http-addr", addr, "--log-level", "error")
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_, _ = cmd.Process.Wait()
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("%s %d log:\n%s", name, n, b)
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		if resp, err := http.Get("http://" + addr + "/readyz"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return cmd
			}
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(logPath)
			t.Fatalf("%s %d not ready:\n%s", name, n, b)
		}
		time.Sleep(20 * time.Millisecond)
	}
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
	rt := startService(t, "router", cfg, 0)
	workers := []*exec.Cmd{startWorker(t, cfg, 0), startWorker(t, cfg, 1), startWorker(t, cfg, 2)}
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
		_ = rt.Process.Signal(syscall.SIGKILL)
		_, _ = rt.Process.Wait()
		rt = startService(t, "router", cfg, k)
		time.Sleep(time.Second)
		_ = workers[0].Process.Signal(syscall.SIGKILL)
		_, _ = workers[0].Process.Wait()
		workers[0] = startWorker(t, cfg, 2+k)
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
