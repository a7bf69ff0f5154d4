package soak_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgs2/pgs2/pkg/proctest"
	"github.com/pgs2/pgs2/pkg/seed"
)

// TestStandbysTakeOver runs two captures and two routers of one source
// (same config) under a steady workload and SIGKILLs the active one of
// each, at seeded points counted in committed changes, twice per service
// (the killed process comes back as a standby and the new active one is
// killed next). Each time the standby must be the active one within 10 s,
// and at the end S2 holds every committed change once, in commit order
// per row.
func TestStandbysTakeOver(t *testing.T) {
	if testing.Short() {
		t.Skip("process test: PostgreSQL, NATS, s2local and five service processes")
	}
	rng, _ := seed.Rand(t)
	p := newPipeline(t, `CREATE TABLE items (id int PRIMARY KEY, v bigint NOT NULL)`, func(dsn, natsURL, s2URL string) string {
		return fmt.Sprintf(`source: {name: app, dsn: %q, tables: [public.items]}
nats: {url: %q, partitions: 4}
sinks:
  - {name: items, tables: [public.items], basin: %s, stream: items, endpoint: %q, create_stream: true, batch: {linger: 5ms}}
`, dsn, natsURL, soakBasin, s2URL)
	})
	// The second capture and router: standbys of the first ones.
	for _, name := range []string{"capture", "router"} {
		first := p.svcs[name]
		b := &svc{name: name + "-b", bin: first.bin, cfg: first.cfg}
		b.start(t)
		p.svcs[b.name] = b
		p.all = append(p.all, b)
		if r := role(b.proc); r != "standby" {
			t.Fatalf("second %s: %s, want standby", name, r)
		}
	}

	// The workload: one row per transaction over 50 rows, v increasing.
	ctx := context.Background()
	var stop atomic.Bool // not a cancelled ctx: an INSERT cut in flight may still commit
	defer stop.Store(true)
	conn, err := pgx.Connect(ctx, p.pg.DSN("app"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var mu sync.Mutex
	var committed []int64 // v of each commit, in commit order; the row is v % 50
	var werr error
	wdone := make(chan struct{})
	go func() {
		defer close(wdone)
		for v := int64(1); !stop.Load(); v++ {
			if _, err := conn.Exec(ctx, `INSERT INTO items VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v`, v%50, v); err != nil {
				werr = err
				return
			}
			mu.Lock()
			committed = append(committed, v)
			mu.Unlock()
			time.Sleep(2 * time.Millisecond)
		}
	}()
	count := func() int { mu.Lock(); defer mu.Unlock(); return len(committed) }
	waitCount := func(n int) {
		for count() < n {
			if werr != nil {
				t.Fatalf("workload: %v", werr)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}

	// Kill the active process of each service twice, in a seeded order,
	// each after a seeded number of further commits.
	kills := []string{"capture", "capture", "router", "router"}
	rng.Shuffle(len(kills), func(i, j int) { kills[i], kills[j] = kills[j], kills[i] })
	for _, name := range kills {
		waitCount(count() + 200 + rng.IntN(800))
		active, standby := p.svcs[name], p.svcs[name+"-b"]
		if role(active.proc) != "active" {
			active, standby = standby, active
		}
		if role(active.proc) != "active" || role(standby.proc) != "standby" {
			t.Fatalf("%s: %s is %s and %s is %s, want one active and one standby", name,
				active.name, role(active.proc), standby.name, role(standby.proc))
		}
		at := count()
		active.kill()
		killed := time.Now()
		for role(standby.proc) != "active" {
			if time.Since(killed) > 10*time.Second {
				t.Fatalf("%s SIGKILLed after %d commits: %s still %s after 10 s:\n%s", active.name, at, standby.name,
					role(standby.proc), standby.proc.Output())
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Logf("%s SIGKILLed after %d commits: %s active after %s", active.name, at, standby.name, time.Since(killed).Round(time.Millisecond))
		active.start(t) // back, as the standby
		if r := role(active.proc); r != "standby" {
			t.Fatalf("%s restarted: %s, want standby", active.name, r)
		}
	}
	waitCount(count() + 300)
	stop.Store(true)
	<-wdone

	// S2 holds every commit once (readChanges fails on a duplicate), in
	// commit order per row.
	want := count()
	sdk := s2Client(p.s2URL)
	deadline := time.Now().Add(time.Minute)
	for {
		got := readChanges(t, sdk, "items")
		if len(got) == want {
			last := map[int64]int64{}
			for i, c := range got {
				v := int64(c.Record["v"].(float64))
				id := int64(c.Record["id"].(float64))
				if id != v%50 || v <= last[id] {
					t.Fatalf("record %d: row %d has v=%d after v=%d", i, id, v, last[id])
				}
				last[id] = v
			}
			seen := map[int64]bool{}
			for _, c := range got {
				seen[int64(c.Record["v"].(float64))] = true
			}
			for _, v := range committed {
				if !seen[v] {
					t.Fatalf("commit v=%d is not in S2", v)
				}
			}
			break
		}
		if len(got) > want || time.Now().After(deadline) {
			t.Fatalf("S2 holds %d changes, %d committed; logs: %s", len(got), want, p.logs())
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("%d changes, each once and in order; logs: %s", want, p.logs())
}

// role asks a service process what it is: active, standby or not ready.
func role(p *proctest.Proc) string {
	c := &http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get("http://" + p.Addr + "/readyz")
	if err != nil {
		return "down"
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	switch {
	case resp.StatusCode != http.StatusOK:
		return "not ready (" + strings.TrimSpace(string(b)) + ")"
	case strings.Contains(string(b), "standby"):
		return "standby"
	default:
		return "active"
	}
}

// logs summarises every service's warnings and errors.
func (p *pipeline) logs() string {
	var out []string
	for _, s := range p.all {
		out = append(out, s.name+": "+s.logSummary())
	}
	return strings.Join(out, " | ")
}
