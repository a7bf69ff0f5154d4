package router_test

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pgs2/pgs2/pkg/pgtest"
)

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

func routerBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "pgs2-router-bin-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "router")
		if out, err := exec.Command("go", "build", "-o", binPath, "../../services/router").CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

// startRouter runs bin/router and waits until it is ready.
func startRouter(t *testing.T, cfgPath string) *exec.Cmd {
	t.Helper()
	port, _ := pgtest.FreePort()
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	logf, err := os.CreateTemp(t.TempDir(), "router-*.log")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(routerBinary(t), "--config", cfgPath, "--http-addr", addr)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_, _ = cmd.Process.Wait()
		if t.Failed() {
			b, _ := os.ReadFile(logf.Name())
			t.Logf("router log:\n%s", b)
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
			b, _ := os.ReadFile(logf.Name())
			t.Fatalf("router not ready:\n%s", b)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestRouterSIGKILL kills the router process several times while changes
// flow: every change reaches every sink exactly once, in order per group.
func TestRouterSIGKILL(t *testing.T) {
	e := newEnv(t)
	cfg := filepath.Join(t.TempDir(), "cdc.yaml")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf(`source: {name: app, dsn: "postgres://x@127.0.0.1:1/app", tables: [users]}
nats: {url: %q, partitions: 4}
sinks:
  - {name: a, tables: [users], basin: my-basin, stream: a}
  - {name: b, tables: [users], basin: my-basin, stream: b, transform: '{"id": record.id, "v": record.v}'}
`, e.ns.URL())), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := startRouter(t, cfg)
	const groups, perGroup = 20, 150
	ctx, cancel := context.WithCancel(context.Background())
	produced := make(chan struct{})
	go func() {
		defer close(produced)
		for v := 1; v <= perGroup; v++ {
			for g := 0; g < groups; g++ {
				if ctx.Err() != nil {
					return
				}
				e.change(t, "public.users", "update", g, fmt.Sprintf(`{"id":%d,"v":%d}`, g, v))
			}
			time.Sleep(2 * time.Millisecond)
		}
	}()
	for i := 0; i < 5; i++ {
		time.Sleep(300 * time.Millisecond)
		_ = cmd.Process.Signal(syscall.SIGKILL)
		_, _ = cmd.Process.Wait()
		cmd = startRouter(t, cfg)
	}
	<-produced
	cancel()
	outs := e.outputsWithin(t, 2*groups*perGroup, 60*time.Second)
	last := map[string]float64{}
	for i, o := range outs {
		sink, _, _, _, _ := parse(o.Subject)
		var id, v float64
		if rec, ok := o.Body["record"].(map[string]any); ok {
			id, v = rec["id"].(float64), rec["v"].(float64)
		} else {
			id, v = o.Body["id"].(float64), o.Body["v"].(float64)
		}
		k := fmt.Sprintf("%s/%v", sink, id)
		if v != last[k]+1 {
			t.Fatalf("output %d: sink %s group %v has v=%v after v=%v (lost, duplicated or reordered)", i, sink, id, v, last[k])
		}
		last[k] = v
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("router exit after SIGTERM: %v", err)
	}
}
