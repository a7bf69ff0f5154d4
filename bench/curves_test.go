package bench

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgs2/pgs2/pkg/units"
)

// TestBenchCurves measures how the pipeline's cost grows with the work:
// tables 1 → 1,000, sinks 1 → 20 (each with a filter and a transform), S2
// streams 1 → 10,000, parked groups 0 → 100,000, one transaction of 1 →
// 1,000,000 rows, rows of 100 B → 900 KiB. Each point runs the whole
// pipeline as processes (s2local on disk) from a fresh database: the
// backlog's throughput (services start → every change in S2 or parked),
// then commit → S2 latency of a probe row committed every 10 ms together
// with a light load of the curve's shape, and each process's peak memory
// (VmHWM). PGS2_BENCH_CURVES=tables,rows picks curves,
// PGS2_BENCH_CURVE_POINTS=1,1000 points (by label).
func TestBenchCurves(t *testing.T) {
	if os.Getenv("PGS2_BENCH") != "1" {
		t.Skip("benchmark: set PGS2_BENCH=1 (make bench)")
	}
	b, version := buildE2E(t)
	var lines []string
	add := func(format string, a ...any) { lines = append(lines, fmt.Sprintf(format, a...)) }
	add("machine: %d CPUs (%s), %s; code: %s", runtime.NumCPU(), cpuModel(), memTotal(), version)
	pick := os.Getenv("PGS2_BENCH_CURVES")
	for _, c := range curves() {
		if pick != "" && !slices.Contains(strings.Split(pick, ","), c.name) {
			continue
		}
		t.Run(c.name, func(t *testing.T) {
			add("")
			add("| %s | changes/s | %s | probe p50 / p99 | peak RSS capture / router / delivery / nats-server / s2local |", c.axis, c.extraHead)
			add("|---|--:|--:|--:|--:|")
			for _, p := range c.points {
				if pts := os.Getenv("PGS2_BENCH_CURVE_POINTS"); pts != "" && !slices.Contains(strings.Split(pts, ","), p.label) {
					continue
				}
				r := runCurvePoint(t, b, p)
				add("| %s | %.0f | %s | %s | %s |", p.label, r.rate, r.extra, r.latency(), r.peaks())
			}
			if c.note != "" {
				add("")
				add("%s", c.note)
			}
		})
	}
	fmt.Println("\n=== cost curves ===")
	for _, l := range lines {
		t.Log(l)
		fmt.Println(l)
	}
}

// curve is one dimension of the work, measured at a few points.
type curve struct {
	name, axis, extraHead, note string
	points                      []curvePoint
}

// curvePoint is one pipeline run.
type curvePoint struct {
	label  string
	setup  []string // SQL in database app before the slot (the probe table is added)
	tables []string // captured tables (public.probe is added)
	sinks  string   // the sinks' YAML list items (the probe's sink is added)
	// streams are the S2 streams the backlog and load reach (not the probe).
	streams []string
	// backlog writes the backlog; changes are the changes it commits and
	// records what they become (S2 records and parked messages, every sink).
	backlog          func(ctx context.Context, conn *pgx.Conn) error
	changes, records int
	// live writes the backlog with the pipeline running and times it from
	// its commit (one transaction's commit → all in S2).
	live bool
	// load is the SQL committed with probe k (the curve's shape; "" for
	// none) and the records it becomes.
	load func(k int) (sql string, records int)
	// fixedSinks, with parks: the sinks' YAML as it is fixed after the
	// latency phase (SIGHUP): the parks drain.
	fixedSinks string
	// extra is the point's own column.
	extra func(r curveResult) string
	// limit, if set, bounds the backlog's wait: past it the point
	// reports how far it got instead of failing.
	limit time.Duration
}

type curveResult struct {
	rate     float64
	dur      time.Duration
	p50, p99 float64
	peak     []int64 // capture, router, delivery, nats-server, s2local
	extra    string
	drain    time.Duration
}

func (r curveResult) latency() string {
	if r.p99 == 0 {
		return "–"
	}
	return fmt.Sprintf("%.1f / %.1f ms", r.p50, r.p99)
}

func (r curveResult) peaks() string {
	parts := make([]string, len(r.peak))
	for i, b := range r.peak {
		parts[i] = units.Bytes(b)
	}
	return strings.Join(parts, " / ")
}

const curveBacklog = 100_000

// itemsTable is the benchmark's 7-column row as a table of that name.
func itemsTable(name string) string {
	return fmt.Sprintf(`CREATE TABLE %s (id bigint PRIMARY KEY, name text, qty int, price numeric(12,2),
		tags text[], doc jsonb, updated_at timestamptz)`, name)
}

// itemsRows is the SELECT list of an items row for id g.
const itemsRows = `g, 'item-' || g, (g % 100)::int, ((g % 100000) / 100.0)::numeric(12,2),
	ARRAY['tag-' || (g % 10), 'tag-' || (g % 7)], jsonb_build_object('id', g, 'color', 'red', 'n', g % 7), now()`

// insertItems writes rows lo..hi into table, txRows per transaction.
func insertItems(ctx context.Context, conn *pgx.Conn, table string, lo, hi int) error {
	for a := lo; a <= hi; a += txRows {
		if _, err := conn.Exec(ctx, fmt.Sprintf(`INSERT INTO %s SELECT %s FROM generate_series($1::bigint, $2::bigint) g`, table, itemsRows),
			a, min(hi, a+txRows-1)); err != nil {
			return err
		}
	}
	return nil
}

func itemsSink(name, stream, extra string) string {
	return fmt.Sprintf("  - name: %s\n    tables: [public.items]\n    stream: %s\n%s", name, stream, extra)
}

// parkLimit bounds the parks point that does not finish in minutes today
// (parking costs O(parked groups) each: docs/benchmarks.md).
func parkLimit(p int) time.Duration {
	if p >= 100_000 {
		return 5 * time.Minute
	}
	return 0
}

func curves() []curve {
	var cs []curve

	// Tables: the same backlog spread over k tables, one sink, one stream.
	tables := curve{name: "tables", axis: "tables (100,000 changes over them)", extraHead: "records/s"}
	for _, k := range []int{1, 10, 100, 1000} {
		var setup, names []string
		for i := range k {
			names = append(names, fmt.Sprintf("public.t%d", i))
			setup = append(setup, itemsTable(names[i]))
		}
		// fill(lo, hi) inserts row g into table t(g % k).
		setup = append(setup, fmt.Sprintf(`CREATE FUNCTION fill(lo bigint, hi bigint) RETURNS void LANGUAGE plpgsql AS $$
			BEGIN FOR g IN lo..hi LOOP
				EXECUTE format('INSERT INTO public.t%%s SELECT %s FROM (SELECT $1::bigint AS g) s', g %% %d) USING g;
			END LOOP; END $$`, strings.NewReplacer("'", "''", "%", "%%").Replace(itemsRows), k))
		tables.points = append(tables.points, curvePoint{
			label: strconv.Itoa(k), setup: setup, tables: names,
			sinks:   fmt.Sprintf("  - name: all\n    tables: [%s]\n    stream: all\n", strings.Join(names, ", ")),
			streams: []string{"all"},
			backlog: func(ctx context.Context, conn *pgx.Conn) error {
				for a := 1; a <= curveBacklog; a += txRows {
					if _, err := conn.Exec(ctx, `SELECT fill($1, $2)`, a, a+txRows-1); err != nil {
						return err
					}
				}
				return nil
			},
			changes: curveBacklog, records: curveBacklog,
			load: func(i int) (string, int) {
				lo := curveBacklog + 1 + i*20
				return fmt.Sprintf("SELECT fill(%d, %d)", lo, lo+19), 20
			},
		})
	}
	cs = append(cs, tables)

	// Sinks: s sinks on the same table, each with a filter and a
	// transform into its own stream.
	sinks := curve{name: "sinks", axis: "sinks with a filter and a transform (100,000 changes)", extraHead: "records/s",
		note: "Every sink gets every change: the records grow with the sinks, so changes/s fall as 1/sinks if the cost per record stays flat; records/s shows it does or does not."}
	for _, s := range []int{1, 5, 20} {
		var yaml strings.Builder
		var streams []string
		for i := range s {
			streams = append(streams, fmt.Sprintf("s-%d", i))
			yaml.WriteString(itemsSink(fmt.Sprintf("sink%d", i), streams[i],
				"    filter: 'record.qty >= 0'\n    transform: '{\"id\": record.id, \"name\": record.name, \"qty\": record.qty, \"action\": action}'\n"))
		}
		sinks.points = append(sinks.points, curvePoint{
			label: strconv.Itoa(s), setup: []string{itemsTable("public.items")}, tables: []string{"public.items"},
			sinks: yaml.String(), streams: streams,
			backlog: func(ctx context.Context, conn *pgx.Conn) error {
				return insertItems(ctx, conn, "public.items", 1, curveBacklog)
			},
			changes: curveBacklog, records: curveBacklog * s,
			load: func(i int) (string, int) {
				lo := curveBacklog + 1 + i*20
				return fmt.Sprintf("INSERT INTO public.items SELECT %s FROM generate_series(%d, %d) g", itemsRows, lo, lo+19), 20 * s
			},
		})
	}
	cs = append(cs, sinks)

	// Streams: one routing function spreading the changes over k streams.
	streams := curve{name: "streams", axis: "S2 streams (100,000 changes routed over them)", extraHead: "records/s",
		note: "Each stream is written by its own worker, fed by the process's shared reader (attached before its session starts): the first change of a stream creates it in S2 and opens its session."}
	for _, k := range []int{1, 100, 1000, 10000} {
		var limit time.Duration
		if k == 10000 {
			limit = 5 * time.Minute // a bound: it took 15 min before the units attached early (docs/benchmarks.md)
		}
		var names []string
		for i := range k {
			names = append(names, fmt.Sprintf("s-%d", i))
		}
		streams.points = append(streams.points, curvePoint{
			label: strconv.Itoa(k), setup: []string{itemsTable("public.items")}, tables: []string{"public.items"},
			sinks:   itemsSink("items", "s-0", fmt.Sprintf("    routing: '{\"stream\": \"s-\" + string(record.id %% %d)}'\n", k)),
			streams: names,
			backlog: func(ctx context.Context, conn *pgx.Conn) error {
				return insertItems(ctx, conn, "public.items", 1, curveBacklog)
			},
			changes: curveBacklog, records: curveBacklog, limit: limit,
			load: func(i int) (string, int) {
				lo := curveBacklog + 1 + i*20
				return fmt.Sprintf("INSERT INTO public.items SELECT %s FROM generate_series(%d, %d) g", itemsRows, lo, lo+19), 20
			},
		})
	}
	cs = append(cs, streams)

	// Parks: a filter failing on the first p rows parks p groups (one
	// message each); the rest flow. After the latency phase the filter is
	// fixed (SIGHUP) and the parks drain.
	parks := curve{name: "parks", axis: "parked groups (of 200,000 changes)", extraHead: "drain after the fix",
		note: "The filter `record.id > P || int(record.name) > 0` fails on rows 1..P: each parks its group. The probe's latency is measured while they are parked; then the filter is fixed (SIGHUP) and the parks drain into S2."}
	for _, p := range []int{0, 1000, 10000, 100000} {
		const n = 200_000
		parks.points = append(parks.points, curvePoint{
			label: strconv.Itoa(p), setup: []string{itemsTable("public.items")}, tables: []string{"public.items"},
			sinks:      itemsSink("items", "items", fmt.Sprintf("    filter: 'record.id > %d || int(record.name) > 0'\n", p)),
			fixedSinks: itemsSink("items", "items", "    filter: 'record.id > -1 || int(record.name) > 0'\n"),
			streams:    []string{"items"},
			backlog:    func(ctx context.Context, conn *pgx.Conn) error { return insertItems(ctx, conn, "public.items", 1, n) },
			changes:    n, records: n, limit: parkLimit(p),
			load: func(i int) (string, int) {
				lo := n + 1 + i*20
				return fmt.Sprintf("INSERT INTO public.items SELECT %s FROM generate_series(%d, %d) g", itemsRows, lo, lo+19), 20
			},
			extra: func(r curveResult) string {
				if p == 0 {
					return "–"
				}
				return fmt.Sprintf("%s (%.0f groups/s)", r.drain.Round(10*time.Millisecond), float64(p)/r.drain.Seconds())
			},
		})
	}
	cs = append(cs, parks)

	// One transaction of t rows, committed with the pipeline running.
	txs := curve{name: "transaction", axis: "rows in one transaction", extraHead: "commit → all in S2",
		note: "Committed with the pipeline running; changes/s is rows over commit → the last row in S2 (PostgreSQL decodes a transaction only once it commits, spilling it to disk past logical_decoding_work_mem)."}
	for _, n := range []int{1, 1000, 100_000, 1_000_000} {
		txs.points = append(txs.points, curvePoint{
			label: strconv.Itoa(n), setup: []string{itemsTable("public.items")}, tables: []string{"public.items"},
			sinks: itemsSink("items", "items", ""), streams: []string{"items"}, live: true,
			backlog: func(ctx context.Context, conn *pgx.Conn) error {
				_, err := conn.Exec(ctx, fmt.Sprintf(`INSERT INTO public.items SELECT %s FROM generate_series(1, $1::bigint) g`, itemsRows), n)
				return err
			},
			changes: n, records: n,
			extra: func(r curveResult) string { return r.dur.Round(time.Millisecond).String() },
		})
	}
	cs = append(cs, txs)

	// Rows of r bytes (one text column of random hex, stored uncompressed),
	// about 100 MB of backlog each (at most 100,000 rows).
	rows := curve{name: "rows", axis: "row size (≈100 MB backlog, ≤100,000 rows)", extraHead: "MB/s",
		note: "The load is 1,000 rows/s or 10 MB/s, whichever is less. The 900 KiB row is close to the limits on the way: NATS's default max_payload of 1 MB and S2's 1 MiB per record."}
	for _, size := range []int{100, 10 << 10, 100 << 10, 900 << 10} {
		n := min(100_000, 100_000_000/size)
		perTx := max(1, min(txRows, 8<<20/size))
		every := max(1, 100*size/10_000_000) // ticks per load row (10 ms ticks)
		perTick := max(1, min(10, 100_000/size))
		body := fmt.Sprintf(`(SELECT string_agg(md5(g::text || '-' || i::text), '') FROM generate_series(1, %d) i)`, size/32)
		rows.points = append(rows.points, curvePoint{
			label: units.Bytes(int64(size)),
			setup: []string{`CREATE TABLE public.items (id bigint PRIMARY KEY, body text)`,
				`ALTER TABLE public.items ALTER COLUMN body SET STORAGE EXTERNAL`},
			tables: []string{"public.items"}, sinks: itemsSink("items", "items", ""), streams: []string{"items"},
			backlog: func(ctx context.Context, conn *pgx.Conn) error {
				for a := 1; a <= n; a += perTx {
					if _, err := conn.Exec(ctx, fmt.Sprintf(`INSERT INTO public.items SELECT g, %s FROM generate_series($1::bigint, $2::bigint) g`, body),
						a, min(n, a+perTx-1)); err != nil {
						return err
					}
				}
				return nil
			},
			changes: n, records: n,
			load: func(i int) (string, int) {
				if i%every != 0 {
					return "", 0
				}
				lo := n + 1 + i*perTick
				return fmt.Sprintf("INSERT INTO public.items SELECT g, %s FROM generate_series(%d, %d) g", body, lo, lo+perTick-1), perTick
			},
			extra: func(r curveResult) string { return fmt.Sprintf("%.1f", r.rate*float64(size)/1e6) },
		})
	}
	cs = append(cs, rows)
	return cs
}

// runCurvePoint runs one point: a fresh database, the backlog, the
// pipeline, the probe.
func runCurvePoint(t *testing.T, b e2eBins, p curvePoint) curveResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	pg := benchPostgres(t)
	pg.MustExec(t, "postgres", "CREATE DATABASE app")
	for _, s := range append(p.setup, `CREATE TABLE public.probe (id bigint PRIMARY KEY)`) {
		pg.MustExec(t, "app", s)
	}
	tables := append(slices.Clone(p.tables), "public.probe")
	pg.MustExec(t, "app", `CREATE PUBLICATION pgs2 FOR TABLE `+strings.Join(tables, ", "))
	pg.MustExec(t, "app", `SELECT pg_create_logical_replication_slot('curve', 'pgoutput')`)
	conn, err := pgx.Connect(ctx, pg.DSN("app"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if !p.live {
		start := time.Now()
		if err := p.backlog(ctx, conn); err != nil {
			t.Fatalf("%s: backlog: %v", p.label, err)
		}
		if _, err := conn.Exec(ctx, `CHECKPOINT`); err != nil {
			t.Fatal(err)
		}
		t.Logf("%s: backlog of %d changes written in %s", p.label, p.changes, time.Since(start).Round(time.Millisecond))
	}

	w := &workload{pg: pg}
	config := func(sinks string) func(e *e2eEnv) string {
		return func(e *e2eEnv) string {
			var y strings.Builder
			fmt.Fprintf(&y, "source:\n  name: %s\n  dsn: %s\n  slot: curve\n  publication: pgs2\n  tables: [%s]\n", benchSource, pg.DSN("app"), strings.Join(tables, ", "))
			fmt.Fprintf(&y, "nats:\n  url: %s\n  partitions: 64\n  changes_stream: %s\n", e.natsURL, benchStream)
			// Every sink has one stream line: the S2 settings go before it.
			s2 := fmt.Sprintf("    basin: %s\n    endpoint: %s\n    create_stream: true\n    stream:", e2eBasin, e.s2url)
			sinks += "  - name: probe\n    tables: [public.probe]\n    stream: probe\n"
			y.WriteString("sinks:\n" + strings.ReplaceAll(sinks, "    stream:", s2))
			return y.String()
		}
	}
	dataDir := t.TempDir()
	e := e2eStartWith(t, b, w, config(p.sinks), "--data-dir", dataDir)
	waitQuiet(t)
	start := time.Now()
	cp := e.service(t, b.capture, "capture")
	rt := e.service(t, b.router, "router")
	dl := e.service(t, b.delivery, "delivery")
	peaks := func() []int64 {
		return []int64{procHWM(cp.pid()), procHWM(rt.pid()), procHWM(dl.pid()), procHWM(e.ns.pid()), procHWM(e.s2.pid())}
	}
	var r curveResult
	e.profileAll(t, strings.ReplaceAll(t.Name()+"-"+p.label, "/", "-"), 5)
	if p.live {
		// Wait for the pipeline: a probe through it.
		probe := newS2Counter(e, "probe")
		if _, err := conn.Exec(ctx, `INSERT INTO public.probe VALUES (0)`); err != nil {
			t.Fatal(err)
		}
		probe.waitAll(ctx, t, 1, time.Now(), time.Minute)
		if err := p.backlog(ctx, conn); err != nil {
			t.Fatalf("%s: %v", p.label, err)
		}
		start = time.Now()
	}
	if p.limit > 0 { // a point that may not finish: what it did in the time
		var got int
		r.dur, got = waitMetricUpTo(ctx, t, e, p.records, start, p.limit, deliveredMetrics...)
		if got < p.records {
			r.rate = float64(got) / r.dur.Seconds()
			r.extra = fmt.Sprintf("unfinished: %d of %d records after %s", got, p.records, p.limit)
			r.peak = peaks()
			t.Logf("%s: %s", p.label, r.extra)
			e.stopAll(t, "delivery", "router", "capture")
			e.stopInfra(t)
			return r
		}
	} else {
		r.dur = waitDelivered(ctx, t, e, p.records, start, 15*time.Minute)
	}
	r.rate = float64(p.changes) / r.dur.Seconds()
	t.Logf("%s: %d changes (%d records) in %s: %.0f changes/s", p.label, p.changes, p.records, r.dur.Round(time.Millisecond), r.rate)

	loaded := 0
	if p.load != nil {
		probe := newS2Counter(e, "probe")
		if _, err := conn.Exec(ctx, `INSERT INTO public.probe VALUES (0)`); err != nil {
			t.Fatal(err)
		}
		probe.waitAll(ctx, t, 1, time.Now(), time.Minute)
		l := offerLoad(ctx, t, e, "probe", probe.next["probe"], conn, func(ctx context.Context, conn *pgx.Conn, id int64, _ int) error {
			sql, n := p.load(int(id - 1))
			loaded += n
			if sql != "" {
				sql += "; "
			}
			_, err := conn.Exec(ctx, fmt.Sprintf("BEGIN; %sINSERT INTO public.probe VALUES (%d); COMMIT", sql, id))
			return err
		}, 1, 1, 10*time.Millisecond, 3*time.Second)
		r.p50, r.p99 = l.p50, l.p99
	}
	if p.fixedSinks != "" {
		if err := os.WriteFile(e.cfg, []byte(config(p.fixedSinks)(e)), 0o644); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		for _, proc := range []*process{rt, dl} {
			if err := proc.cmd.Process.Signal(syscall.SIGHUP); err != nil {
				t.Fatal(err)
			}
		}
		want := p.records + loaded
		r.drain = waitAppended(ctx, t, e, want, start, 15*time.Minute)
		t.Logf("%s: drained to %d records in %s", p.label, want, r.drain.Round(time.Millisecond))
	}
	r.peak = peaks()
	if p.extra != nil {
		r.extra = p.extra(r)
	} else {
		r.extra = fmt.Sprintf("%.0f", float64(p.records)/r.dur.Seconds())
	}
	// Every record once: the streams hold exactly the backlog and the load
	// (what is still parked counted as parked).
	time.Sleep(500 * time.Millisecond)
	c := newS2Counter(e, p.streams...)
	if err := c.readUp(ctx); err != nil {
		t.Fatal(err)
	}
	got, _ := c.totals()
	want := p.records + loaded
	if p.fixedSinks == "" {
		want -= int(deliveryMetric(t, e, "pgs2_delivery_parked_messages_total"))
	}
	if got != want {
		t.Errorf("%s: the streams hold %d data records, want %d", p.label, got, want)
	}
	e.stopAll(t, "delivery", "router", "capture")
	e.stopInfra(t)
	return r
}

// deliveredMetrics are delivery's counters of records appended or parked.
var deliveredMetrics = []string{"pgs2_delivery_records_appended_total", "pgs2_delivery_parked_messages_total"}

// waitDelivered waits until delivery has appended or parked n records of
// the sinks other than the probe; it returns the time since start.
func waitDelivered(ctx context.Context, t *testing.T, e *e2eEnv, n int, start time.Time, limit time.Duration) time.Duration {
	t.Helper()
	return waitMetric(ctx, t, e, n, start, limit, deliveredMetrics...)
}

// waitAppended waits until delivery has appended n records of the sinks
// other than the probe.
func waitAppended(ctx context.Context, t *testing.T, e *e2eEnv, n int, start time.Time, limit time.Duration) time.Duration {
	t.Helper()
	return waitMetric(ctx, t, e, n, start, limit, "pgs2_delivery_records_appended_total")
}

func waitMetric(ctx context.Context, t *testing.T, e *e2eEnv, n int, start time.Time, limit time.Duration, names ...string) time.Duration {
	t.Helper()
	d, got := waitMetricUpTo(ctx, t, e, n, start, limit, names...)
	if got < n {
		t.Fatalf("after %s delivery counts %d of %d (%s)", limit, got, n, strings.Join(names, " + "))
	}
	return d
}

// waitMetricUpTo waits until delivery's counters (names, summed) reach n
// or limit passes; it returns the time and the count.
func waitMetricUpTo(ctx context.Context, t *testing.T, e *e2eEnv, n int, start time.Time, limit time.Duration, names ...string) (time.Duration, int) {
	t.Helper()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			t.Fatal(ctx.Err())
		case <-tick.C:
		}
		e.checkAlive(t)
		var sum float64
		for _, name := range names {
			sum += deliveryMetric(t, e, name)
		}
		at := time.Since(start)
		if int(sum) >= n || at > limit {
			return at, int(sum)
		}
	}
}

// deliveryMetric sums a counter of delivery's over every sink but the probe.
func deliveryMetric(t *testing.T, e *e2eEnv, name string) float64 {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, "http://"+e.http["delivery"]+"/metrics", nil)
	req.Header.Set("Accept-Encoding", "identity") // no gzip for the process measured
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0
	}
	defer resp.Body.Close()
	var sum float64
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		l := sc.Text()
		if !strings.HasPrefix(l, name+"{") || strings.Contains(l, `sink="probe"`) {
			continue
		}
		if v, err := strconv.ParseFloat(l[strings.LastIndexByte(l, ' ')+1:], 64); err == nil {
			sum += v
		}
	}
	return sum
}
