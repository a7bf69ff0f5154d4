package bench

import (
	"context"
	"fmt"
	"io"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgs2/pgs2/pkg/backfill"
)

// TestBenchBackfill measures a backfill end to end: the rows of the
// 7-column items table read by capture, routed and delivered into s2local
// (the items sink's initial_backfill), next to `COPY (SELECT …) TO STDOUT`
// of the same table into /dev/null in the same run (the read limit); then
// the live stream's commit → S2 latency at 2,000 changes/s of another
// table (its own sink), idle and while a backfill of items runs. Rows:
// PGS2_BENCH_BACKFILL_ROWS (default 1,000,000).
func TestBenchBackfill(t *testing.T) {
	if os.Getenv("PGS2_BENCH") != "1" {
		t.Skip("benchmark: set PGS2_BENCH=1 (make bench)")
	}
	rows := 1_000_000
	if v := os.Getenv("PGS2_BENCH_BACKFILL_ROWS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1000 {
			t.Fatalf("PGS2_BENCH_BACKFILL_ROWS=%q: want a number ≥ 1000", v)
		}
		rows = n
	}
	chunk := 1000 // the default
	if v := os.Getenv("PGS2_BENCH_BACKFILL_CHUNK"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("PGS2_BENCH_BACKFILL_CHUNK=%q: want a chunk size", v)
		}
		chunk = n
	}
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Minute)
	defer cancel()
	b, version := buildE2E(t)

	pg := benchPostgres(t)
	pg.MustExec(t, "postgres", "CREATE DATABASE app")
	pg.MustExec(t, "app", `CREATE TABLE public.items (
		id bigint PRIMARY KEY, name text, qty int, price numeric(12,2),
		tags text[], doc jsonb, updated_at timestamptz);
		CREATE TABLE public.live (id bigint PRIMARY KEY, v int, at timestamptz)`)
	conn, err := pgx.Connect(ctx, pg.DSN("app"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	loaded := time.Now()
	for lo := 1; lo <= rows; lo += 50_000 {
		if _, err := conn.Exec(ctx, `INSERT INTO public.items
			SELECT g, 'item-' || g, (g % 100)::int, ((g % 100000) / 100.0)::numeric(12,2),
			       ARRAY['tag-' || (g % 10), 'tag-' || (g % 7)],
			       jsonb_build_object('id', g, 'color', 'red', 'n', g % 7, 'nested', jsonb_build_object('x', g, 'ok', true)),
			       now()
			FROM generate_series($1::bigint, $2::bigint) g`, lo, min(lo+50_000-1, rows)); err != nil {
			t.Fatalf("load: %v", err)
		}
	}
	if _, err := conn.Exec(ctx, `VACUUM ANALYZE public.items`); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, `CHECKPOINT`); err != nil {
		t.Fatal(err)
	}
	var tableBytes int64
	if err := conn.QueryRow(ctx, `SELECT pg_table_size('public.items')`).Scan(&tableBytes); err != nil {
		t.Fatal(err)
	}
	t.Logf("loaded %d rows (%.0f MiB) in %s", rows, float64(tableBytes)/(1<<20), time.Since(loaded).Round(time.Millisecond))

	// The read limit: COPY of the same rows, three times, the median.
	var copies []float64
	var copyBytes int64
	for range 3 {
		cw := &countWriter{}
		start := time.Now()
		if _, err := conn.PgConn().CopyTo(ctx, cw, `COPY (SELECT * FROM public.items) TO STDOUT`); err != nil {
			t.Fatal(err)
		}
		copies = append(copies, float64(rows)/time.Since(start).Seconds())
		copyBytes = cw.n
	}
	sort.Float64s(copies)
	copyRate := copies[1]

	w := &workload{pg: pg}
	e := e2eStartWith(t, b, w, func(e *e2eEnv) string {
		sink := func(name, extra string) string {
			return fmt.Sprintf("  - {name: %s, tables: [public.%s], basin: %s, stream: %s, endpoint: %q, create_stream: true%s}\n",
				name, name, e2eBasin, name, e.s2url, extra)
		}
		return fmt.Sprintf(`source: {name: %s, dsn: %q, slot: pgs2_backfill, publication: pgs2, tables: [public.items, public.live],
  backfill: {chunk_size: %d}}
nats: {url: %q, partitions: 64, changes_stream: %s}
sinks:
`, benchSource, pg.DSN("app"), chunk, e.natsURL, benchStream) + sink("items", ", initial_backfill: true") + sink("live", "")
	})
	c := newS2Counter(e, "items")
	waitQuiet(t)
	start := time.Now()
	cp := e.service(t, b.capture, "capture")
	rt := e.service(t, b.router, "router")
	dl := e.service(t, b.delivery, "delivery")
	done, first := c.waitAll(ctx, t, rows, start, 30*time.Minute)
	cpu := procsCPU(cp, rt, dl, e.ns, e.s2)
	pipeRate := float64(rows) / done.Seconds()
	cpuRow := cpuPer(cpu, rows)
	mem := []string{}
	for _, p := range []*process{cp, rt, dl, e.ns, e.s2} {
		mem = append(mem, fmt.Sprintf("%.0f", float64(procHWM(p.pid()))/(1<<20)))
	}
	t.Logf("backfill: %d rows in %s (%.0f rows/s), COPY %.0f rows/s: %.2f; first record after %s; CPU µs/row %s; peak MiB %s",
		rows, done.Round(time.Millisecond), pipeRate, copyRate, pipeRate/copyRate, first.Round(time.Millisecond), cpuRow, strings.Join(mem, " / "))

	// The live stream at 2,000 changes/s: idle, then during a backfill.
	insert := func(ctx context.Context, conn *pgx.Conn, id int64, n int) error {
		_, err := conn.Exec(ctx, `INSERT INTO public.live SELECT g, g % 100, now() FROM generate_series($1::bigint, $2::bigint) g`, id, id+int64(n)-1)
		return err
	}
	const perTick, tick, dur = 20, 10 * time.Millisecond, 10 * time.Second
	if err := insert(ctx, conn, 0, 1); err != nil { // warm-up: the live stream exists
		t.Fatal(err)
	}
	lc := newS2Counter(e, "live")
	lc.waitAll(ctx, t, 1, time.Now(), time.Minute)
	idle := offerLoad(ctx, t, e, "live", lc.next["live"], conn, insert, 1, perTick, tick, dur)

	nc, err := nats.Connect(e.natsURL)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	store, err := backfill.Ensure(ctx, js, 1)
	if err != nil {
		t.Fatal(err)
	}
	if err := store.Create(ctx, backfill.Job{ID: "during", Sink: "items", Created: time.Now().UTC()}); err != nil {
		t.Fatal(err)
	}
	for p := (backfill.Progress{}); p.Rows == 0; time.Sleep(10 * time.Millisecond) {
		if p, _, err = store.Progress(ctx, "during", benchSource, "public.items"); err != nil {
			t.Fatal(err)
		}
	}
	busy := offerLoad(ctx, t, e, "live", lc.next["live"]+uint64(idle.n), conn, insert, 1+int64(idle.n), perTick, tick, dur)
	p, _, err := store.Progress(ctx, "during", benchSource, "public.items")
	if err != nil {
		t.Fatal(err)
	}
	during := fmt.Sprintf("%d rows read during the load", p.Rows)
	if p.State == backfill.Done {
		during += " (it ended before the load did)"
	}
	// The same with the backfill limited by max_rows_per_second.
	if _, err := store.SetState(ctx, "during", backfill.Cancelled); err != nil {
		t.Fatal(err)
	}
	const gentleRate = 20_000
	if err := store.Create(ctx, backfill.Job{ID: "gentle", Sink: "items", MaxRowsPerSecond: gentleRate, Created: time.Now().UTC()}); err != nil {
		t.Fatal(err)
	}
	for p := (backfill.Progress{}); p.Rows == 0; time.Sleep(10 * time.Millisecond) {
		if p, _, err = store.Progress(ctx, "gentle", benchSource, "public.items"); err != nil {
			t.Fatal(err)
		}
	}
	gentle := offerLoad(ctx, t, e, "live", lc.next["live"]+uint64(2*idle.n), conn, insert, 1+int64(2*idle.n), perTick, tick, dur)
	e.stopAll(t, "delivery", "router", "capture")
	e.stopInfra(t)

	lines := []string{
		fmt.Sprintf("machine: %d CPUs (%s), %s, %s; code: %s", runtime.NumCPU(), cpuModel(), memTotal(), runtime.Version(), version),
		"",
		fmt.Sprintf("| backfill of %d rows × 7 columns (%.0f MiB table), chunks of %d | value |", rows, float64(tableBytes)/(1<<20), chunk),
		"|---|--:|",
		fmt.Sprintf("| `COPY (SELECT *) TO STDOUT` → /dev/null, rows/s (median of 3; %.0f MiB of text) | %.0f |", float64(copyBytes)/(1<<20), copyRate),
		fmt.Sprintf("| pipeline rows/s (services start → all in S2) | %.0f |", pipeRate),
		fmt.Sprintf("| pipeline / COPY (target ≥ 0.50) | %.2f |", pipeRate/copyRate),
		fmt.Sprintf("| start → first read in S2 | %s |", first.Round(time.Millisecond)),
		fmt.Sprintf("| CPU µs/row: capture / router / delivery / nats-server / s2local | %s |", cpuRow),
		fmt.Sprintf("| peak RSS MiB: capture / router / delivery / nats-server / s2local | %s |", strings.Join(mem, " / ")),
		"",
		fmt.Sprintf("| live stream, %d changes/s offered for %s | idle | during a backfill (%s) | during one at max_rows_per_second %d |",
			int(float64(perTick)/tick.Seconds()), dur, during, gentleRate),
		"|---|--:|--:|--:|",
		fmt.Sprintf("| achieved changes/s | %.0f | %.0f | %.0f |", idle.achieved, busy.achieved, gentle.achieved),
		fmt.Sprintf("| p50 commit → S2 | %.1f ms | %.1f ms | %.1f ms |", idle.p50, busy.p50, gentle.p50),
		fmt.Sprintf("| p99 | %.1f ms | %.1f ms | %.1f ms |", idle.p99, busy.p99, gentle.p99),
		fmt.Sprintf("| max | %.1f ms | %.1f ms | %.1f ms |", idle.max, busy.max, gentle.max),
		fmt.Sprintf("| p50 / idle (target ≤ 2) | | %.2f | %.2f |", busy.p50/idle.p50, gentle.p50/idle.p50),
		fmt.Sprintf("| p99 / idle | | %.2f | %.2f |", busy.p99/idle.p99, gentle.p99/idle.p99),
	}
	if pipeRate/copyRate < 0.5 {
		lines = append(lines, fmt.Sprintf("TARGET MISSED: pipeline/COPY = %.2f < 0.50", pipeRate/copyRate))
	}
	if busy.p50 > 2*idle.p50 {
		lines = append(lines, fmt.Sprintf("TARGET MISSED: live p50 during a backfill %.1f ms > 2 × idle %.1f ms", busy.p50, idle.p50))
	}
	fmt.Println("\n=== backfill benchmark ===")
	for _, l := range lines {
		fmt.Println(l)
	}
}

// countWriter counts what is written to it.
type countWriter struct{ n int64 }

func (w *countWriter) Write(p []byte) (int, error) { w.n += int64(len(p)); return len(p), nil }

var _ io.Writer = (*countWriter)(nil)
