package router_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/pgs2/pgs2/pkg/proctest"
)

func startRouter(t *testing.T, cfgPath string) *proctest.Proc {
	t.Helper()
	return proctest.Start(t, proctest.Build(t, "../../services/router"), "--config", cfgPath)
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
	rt := startRouter(t, cfg)
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
		rt.Kill()
		rt = startRouter(t, cfg)
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
	rt.Term(t)
}
