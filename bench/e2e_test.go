package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/s2-streamstore/s2-sdk-go/s2"

	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/pgtest"
	"github.com/pgs2/pgs2/pkg/proctest"
)

const e2eBasin = "bench-basin"

// e2eBins are the binaries of the end-to-end benchmark, built once.
type e2eBins struct {
	capture, router, delivery, s2local, nats string
}

// TestBenchEndToEnd measures the whole pipeline, commit → S2 ack, with every
// component as its own process: PostgreSQL (pgtest), nats-server, s2local,
// capture, router and delivery (one YAML config). Three measurements:
// throughput draining a backlog (against pg_recvlogical on the same WAL),
// commit → S2 latency at a steady offered load, and delivery's drain rate
// with 1, 2 and 4 delivery processes over 8 streams while s2local adds 20 ms
// to each append. Sizes scale with PGS2_BENCH_CHANGES (default 300000).
func TestBenchEndToEnd(t *testing.T) {
	if os.Getenv("PGS2_BENCH") != "1" {
		t.Skip("benchmark: set PGS2_BENCH=1 (make bench)")
	}
	n := benchChanges(t)
	b, version := buildE2E(t)

	var lines []string
	add := func(format string, a ...any) { lines = append(lines, fmt.Sprintf(format, a...)) }
	add("machine: %d CPUs (%s), %s, %s; code: %s", runtime.NumCPU(), cpuModel(), memTotal(), runtime.Version(), version)

	t.Run("throughput", func(t *testing.T) {
		r := e2eThroughput(t, b, n)
		ratio := r.pipeline / r.recv
		add("")
		add("| throughput (%d changes backlog) | value |", n)
		add("|---|--:|")
		add("| pg_recvlogical changes/s | %.0f |", r.recv)
		add("| pipeline changes/s (services start → all in S2) | %.0f |", r.pipeline)
		add("| pipeline / pg_recvlogical (target ≥ 0.40) | %.2f |", ratio)
		add("| start → first record in S2 | %s |", r.first.Round(time.Millisecond))
		add("| CPU µs/change: capture / router / delivery / nats-server / s2local | %s |", r.cpu)
		add("| changes per delivery message | %.1f |", r.perMsg)
		if ratio < 0.40 {
			add("TARGET MISSED: pipeline/pg_recvlogical = %.2f < 0.40", ratio)
		}
	})
	t.Run("functions", func(t *testing.T) {
		rs := e2eFunctions(t, b, n)
		add("")
		ref := e2eFunctionsReference(rs)
		add("| functions (%d changes backlog, each variant from its own slot on the same WAL) | changes/s | vs none (mean of both) | router CPU µs/change |", n)
		add("|---|--:|--:|--:|")
		for _, r := range rs {
			add("| %s | %.0f | %.2f | %.1f |", r.name, r.rate, r.rate/ref, r.routerCPU)
			if r.rate/ref < 0.8 {
				add("TARGET MISSED: %s at %.2f× the sink without functions (target ≥ 0.8)", r.name, r.rate/ref)
			}
		}
	})
	for _, lt := range []struct {
		rate, p50, p99 float64 // changes/s offered; targets (0: none)
		oneRow         bool    // a transaction per change
	}{{5000, 5, 15, false}, {40000, 0, 50, false}, {5000, 5, 15, true}} {
		name, shape := fmt.Sprintf("latency %.0fk", lt.rate/1000), fmt.Sprintf("%.0f-row transactions", lt.rate/100)
		if lt.oneRow {
			name, shape = name+" one-row", "one-row transactions"
		}
		t.Run(name, func(t *testing.T) {
			r := e2eLatency(t, b, n, int(lt.rate), lt.oneRow)
			add("")
			add("| latency (%.0f changes/s offered as %s for %s, %d changes) | value |", r.offered, shape, r.dur.Round(time.Second), r.n)
			add("|---|--:|")
			add("| achieved commit rate, changes/s | %.0f |", r.achieved)
			if lt.p50 > 0 {
				add("| p50 commit → observed in S2 (target ≤ %.0f ms) | %.1f ms |", lt.p50, r.p50)
			} else {
				add("| p50 commit → observed in S2 | %.1f ms |", r.p50)
			}
			add("| p99 (target ≤ %.0f ms) | %.1f ms |", lt.p99, r.p99)
			add("| p99 after the first 2 s of load | %.1f ms |", r.p99Steady)
			add("| max | %.1f ms |", r.max)
			add("| by stage (commit → stored) | %s |", r.stages)
			// Over time, as a picture next to the table.
			png := filepath.Join(benchDocs(), strings.ReplaceAll(name, " ", "-")+".png")
			if err := plotLatency(png, fmt.Sprintf("commit → S2 at %.0f changes/s (%s)", lt.rate, time.Now().Format("2006-01-02")), r.points, lt.p50, lt.p99); err != nil {
				t.Errorf("plot %s: %v", png, err)
			} else {
				add("| latency over time | %s |", png)
			}
			if lt.p50 > 0 && r.p50 > lt.p50 {
				add("TARGET MISSED: p50 = %.1f ms > %.0f at %.0f changes/s", r.p50, lt.p50, lt.rate)
			}
			if r.p99 > lt.p99 {
				add("TARGET MISSED: p99 = %.1f ms > %.0f at %.0f changes/s", r.p99, lt.p99, lt.rate)
			}
		})
	}
	t.Run("scaling", func(t *testing.T) {
		m := n / 3
		m -= m % (2 * txRows)
		if m == 0 {
			m = 2 * txRows
		}
		var rates []float64
		for _, w := range []int{1, 2, 4} {
			rates = append(rates, e2eScaling(t, b, m, w, 20*time.Millisecond))
		}
		// The same drain without injected latency: what the 20 ms cost.
		base := e2eScaling(t, b, m, 1, 0)
		add("")
		add("| delivery drain, %d changes over 8 streams, 20 ms per append | changes/s | speed-up |", m)
		add("|---|--:|--:|")
		for i, w := range []int{1, 2, 4} {
			add("| %d delivery process(es) | %.0f | %.2f |", w, rates[i], rates[i]/rates[0])
		}
		add("| 1 process, no injected latency (reference) | %.0f | %.2f |", base, base/rates[0])
	})

	for _, l := range lines {
		t.Log(l)
	}
	fmt.Println("\n=== end-to-end benchmark ===")
	for _, l := range lines {
		fmt.Println(l)
	}
}

// buildE2E builds the services, s2local and nats-server; version is the
// code's.
func buildE2E(t *testing.T) (e2eBins, string) {
	root := repoRoot(t)
	dir := t.TempDir()
	b := e2eBins{
		capture: filepath.Join(dir, "capture"), router: filepath.Join(dir, "router"),
		delivery: filepath.Join(dir, "delivery"), s2local: filepath.Join(dir, "s2local"),
		nats: filepath.Join(dir, "nats-server"),
	}
	goBuild(t, root, b.capture, "./services/capture")
	goBuild(t, root, b.router, "./services/router")
	goBuild(t, root, b.delivery, "./services/delivery")
	goBuild(t, root, b.s2local, "./services/s2local")
	goBuild(t, root, b.nats, "github.com/nats-io/nats-server/v2")
	return b, gitVersion(root)
}

// e2eEnv is one pipeline's infrastructure: PostgreSQL with the workload
// table, nats-server and s2local as processes, and a config file.
type e2eEnv struct {
	w       *workload
	dir     string
	ns      *process
	natsURL string
	s2      *process
	s2url   string
	client  *s2.Client
	cfg     string
	procs   map[string]*process
	http    map[string]string // each service's HTTP address (metrics)
	// natsProfile is nats-server's CPU profile URL, with PGS2_BENCH_PROFILE.
	natsProfile string
}

// profileNATS saves a 10 s CPU profile of nats-server to
// $PGS2_BENCH_PROFILE/<name>.nats.cpu.pprof, in the background.
func (e *e2eEnv) profileNATS(t *testing.T, name string) {
	if e.natsProfile == "" {
		return
	}
	go func() {
		resp, err := http.Get(e.natsProfile)
		if err != nil {
			t.Logf("nats-server profile: %v", err)
			return
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		path := filepath.Join(os.Getenv("PGS2_BENCH_PROFILE"), name+".nats.cpu.pprof")
		if err := os.WriteFile(path, b, 0o644); err != nil {
			t.Logf("nats-server profile: %v", err)
		}
	}()
}

// profileAll saves CPU profiles of every service and nats-server over
// the next seconds to $PGS2_BENCH_PROFILE/<name>.<service>.cpu.pprof, and
// each service's heap at their end to <name>.<service>.heap.pprof, in the
// background (with PGS2_BENCH_PROFILE; PGS2_BENCH_PROFILE_SECONDS sets
// how long, 5 s by default).
func (e *e2eEnv) profileAll(t *testing.T, name string, seconds int) {
	dir := os.Getenv("PGS2_BENCH_PROFILE")
	if dir == "" {
		return
	}
	if v, err := strconv.Atoi(os.Getenv("PGS2_BENCH_PROFILE_SECONDS")); err == nil && v > 0 {
		seconds = v
	}
	urls := map[string]string{}
	for label, addr := range e.http {
		urls[label] = fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", addr, seconds)
	}
	if e.natsProfile != "" {
		urls["nats"] = strings.Replace(e.natsProfile, "seconds=10", fmt.Sprintf("seconds=%d", seconds), 1)
	}
	for label, url := range urls {
		go func() {
			resp, err := http.Get(url)
			for try := 0; err != nil && try < 100; try++ { // a process just started
				time.Sleep(20 * time.Millisecond)
				resp, err = http.Get(url)
			}
			if err != nil {
				t.Logf("profile %s: %v", label, err)
				return
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err := os.WriteFile(filepath.Join(dir, name+"."+label+".cpu.pprof"), b, 0o644); err != nil {
				t.Logf("profile %s: %v", label, err)
			}
			if label == "nats" {
				return
			}
			// And the heap as it is then.
			if resp, err = http.Get(url[:strings.Index(url, "/profile?")] + "/heap?gc=1"); err != nil {
				t.Logf("heap profile %s: %v", label, err)
				return
			}
			b, _ = io.ReadAll(resp.Body)
			resp.Body.Close()
			if err := os.WriteFile(filepath.Join(dir, name+"."+label+".heap.pprof"), b, 0o644); err != nil {
				t.Logf("heap profile %s: %v", label, err)
			}
		}()
	}
}

func e2eStart(t *testing.T, b e2eBins, w *workload, slot, sink string, s2args ...string) *e2eEnv {
	t.Helper()
	return e2eStartWith(t, b, w, func(e *e2eEnv) string {
		return fmt.Sprintf(`source:
  name: %s
  dsn: %s
  slot: %s
  publication: pgs2
  tables: [public.items]
nats:
  url: %s
  partitions: 64
  changes_stream: %s
sinks:
  - name: items
    tables: [public.items]
    basin: %s
    endpoint: %s
    create_stream: true
%s`, benchSource, w.pg.DSN("app"), slot, e.natsURL, benchStream, e2eBasin, e.s2url, sink)
	}, s2args...)
}

// e2eStartWith starts nats-server and s2local (with s2args) and writes the
// config that config returns.
func e2eStartWith(t *testing.T, b e2eBins, w *workload, config func(e *e2eEnv) string, s2args ...string) *e2eEnv {
	t.Helper()
	e := &e2eEnv{w: w, dir: t.TempDir(), procs: map[string]*process{}, http: map[string]string{}}
	var extra []string
	if os.Getenv("PGS2_BENCH_PROFILE") != "" {
		pp, err := pgtest.FreePort()
		if err != nil {
			t.Fatal(err)
		}
		e.natsProfile = fmt.Sprintf("http://127.0.0.1:%d/debug/pprof/profile?seconds=10", pp)
		extra = append(extra, "--profile", strconv.Itoa(pp))
	}
	e.ns, e.natsURL = startNATS(t, b.nats, e.dir, extra...)
	port, err := pgtest.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	e.s2url = "http://" + addr
	e.s2 = startProcess(t, b.s2local, filepath.Join(e.dir, "s2local.log"), append([]string{"--addr", addr, "--log-level", "warn"}, s2args...)...)
	waitHTTP(t, e.s2url+"/health", filepath.Join(e.dir, "s2local.log"))
	base := e.s2url + "/v1"
	e.client = s2.New("bench", &s2.ClientOptions{BaseURL: base, MakeBasinBaseURL: func(string) string { return base },
		RequestTimeout: 90 * time.Second,
		HTTPClient:     &http.Client{Timeout: 90 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 16}}})
	if _, err := e.client.Basins.Create(context.Background(), s2.CreateBasinArgs{Basin: e2eBasin}); err != nil {
		t.Fatalf("create basin: %v", err)
	}
	e.cfg = filepath.Join(e.dir, "pgs2.yaml")
	if err := os.WriteFile(e.cfg, []byte(config(e)), 0o644); err != nil {
		t.Fatal(err)
	}
	return e
}

// service starts bin/<name> with the config (label names its log and HTTP port).
func (e *e2eEnv) service(t *testing.T, bin, label string) *process {
	t.Helper()
	port, err := pgtest.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	level := "warn"
	if os.Getenv("PGS2_BENCH_LOGS") != "" {
		level = "info"
		if err := os.MkdirAll(filepath.Dir(e.logPath(t, label)), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	args := []string{"--config", e.cfg, "--http-addr", addr, "--log-level", level}
	if os.Getenv("PGS2_BENCH_PROFILE") != "" {
		args = append(args, "--pprof")
	}
	p := startProcess(t, bin, e.logPath(t, label), args...)
	e.procs[label] = p
	e.http[label] = addr
	return p
}

// logPath is where a service's log goes: the run's directory, or with
// PGS2_BENCH_LOGS=DIR (at level info) DIR/<test>/<label>.log, kept.
func (e *e2eEnv) logPath(t *testing.T, label string) string {
	if d := os.Getenv("PGS2_BENCH_LOGS"); d != "" {
		return filepath.Join(d, strings.ReplaceAll(t.Name(), "/", "-"), label+".log")
	}
	return filepath.Join(e.dir, label+".log")
}

// stopAll SIGTERMs the services in the given order and checks exit 0.
func (e *e2eEnv) stopAll(t *testing.T, labels ...string) {
	t.Helper()
	for _, l := range labels {
		p := e.procs[l]
		if p == nil {
			continue
		}
		select {
		case <-p.done:
			t.Errorf("%s exited before SIGTERM: %v\n%s", l, p.err, tailFile(e.logPath(t, l)))
			continue
		default:
		}
		p.stop()
		if code := p.state.ExitCode(); code != 0 {
			t.Errorf("%s exited %d after SIGTERM, want 0\n%s", l, code, tailFile(e.logPath(t, l)))
		}
		delete(e.procs, l)
	}
}

func (e *e2eEnv) stopInfra(t *testing.T) {
	t.Helper()
	for name, p := range map[string]*process{"s2local": e.s2, "nats-server": e.ns} {
		p.stop()
		if code := p.state.ExitCode(); code != 0 {
			t.Errorf("%s exited %d after SIGTERM, want 0\n%s", name, code, tailFile(filepath.Join(e.dir, name+".log")))
		}
	}
}

// checkAlive fails if a service exited.
func (e *e2eEnv) checkAlive(t *testing.T) {
	t.Helper()
	for l, p := range e.procs {
		select {
		case <-p.done:
			t.Fatalf("%s exited: %v\n%s", l, p.err, tailFile(e.logPath(t, l)))
		default:
		}
	}
}

func waitHTTP(t *testing.T, url, logPath string) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); ; {
		if resp, err := http.Get(url); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not ready\n%s", url, tailFile(logPath))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// s2Counter follows S2 streams and counts data records and fences.
type s2Counter struct {
	e       *e2eEnv
	streams []string
	next    map[string]uint64
	data    map[string]int
	fences  map[string]int
}

func newS2Counter(e *e2eEnv, streams ...string) *s2Counter {
	return &s2Counter{e: e, streams: streams, next: map[string]uint64{}, data: map[string]int{}, fences: map[string]int{}}
}

func isCommand(r s2.SequencedRecord) bool { return len(r.Headers) == 1 && len(r.Headers[0].Name) == 0 }

// tails sums the streams' tails (missing streams count 0).
func (c *s2Counter) tails(ctx context.Context) (uint64, error) {
	var sum uint64
	for _, s := range c.streams {
		tr, err := c.e.client.Basin(e2eBasin).Stream(s2.StreamName(s)).CheckTail(ctx)
		if err != nil {
			var se *s2.S2Error
			if errors.As(err, &se) && se.Status == http.StatusNotFound {
				continue
			}
			return 0, err
		}
		sum += tr.Tail.SeqNum
	}
	return sum, nil
}

// readUpTo reads every stream up to its current tail, counting.
func (c *s2Counter) readUp(ctx context.Context) error {
	for _, s := range c.streams {
		sc := c.e.client.Basin(e2eBasin).Stream(s2.StreamName(s))
		tr, err := sc.CheckTail(ctx)
		if err != nil {
			var se *s2.S2Error
			if errors.As(err, &se) && se.Status == http.StatusNotFound {
				continue
			}
			return err
		}
		for c.next[s] < tr.Tail.SeqNum {
			start, count := c.next[s], uint64(1000)
			rb, err := sc.Read(ctx, &s2.ReadOptions{SeqNum: &start, Count: &count})
			if err != nil {
				return err
			}
			if len(rb.Records) == 0 {
				break
			}
			for _, r := range rb.Records {
				if isCommand(r) {
					c.fences[s]++
				} else {
					c.data[s]++
				}
			}
			c.next[s] = rb.Records[len(rb.Records)-1].SeqNum + 1
		}
	}
	return nil
}

func (c *s2Counter) totals() (data, fences int) {
	for _, s := range c.streams {
		data += c.data[s]
		fences += c.fences[s]
	}
	return
}

// waitAll polls the tails every 20 ms until the streams hold n data records;
// it returns the time of the poll that saw them, and of the first record.
func (c *s2Counter) waitAll(ctx context.Context, t *testing.T, n int, start time.Time, limit time.Duration) (done, first time.Duration) {
	t.Helper()
	fences := 0
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		<-tick.C
		c.e.checkAlive(t)
		sum, err := c.tails(ctx)
		if err != nil {
			t.Fatalf("check tail: %v", err)
		}
		at := time.Since(start)
		if sum > 0 && first == 0 {
			first = at
		}
		if sum >= uint64(n+fences) {
			if err := c.readUp(ctx); err != nil {
				t.Fatalf("read back: %v", err)
			}
			d, f := c.totals()
			if d >= n {
				return at, first
			}
			fences = f
		}
		if at > limit {
			d, f := c.totals()
			t.Fatalf("after %s the streams hold %d (tails %d, fences %d) of %d records", limit, d, sum, f, n)
		}
	}
}

// check asserts each stream ends with exactly want[stream] data records.
func (c *s2Counter) check(ctx context.Context, t *testing.T, want map[string]int) {
	t.Helper()
	if err := c.readUp(ctx); err != nil {
		t.Fatalf("read back: %v", err)
	}
	for _, s := range c.streams {
		if c.data[s] != want[s] {
			t.Errorf("stream %s holds %d data records (+%d fences), want %d", s, c.data[s], c.fences[s], want[s])
		}
	}
}

// cpuPer is each process's CPU per item of n, in µs: "4.1 / 2.4 / …".
func cpuPer(cpu []time.Duration, n int) string {
	parts := make([]string, len(cpu))
	for i, d := range cpu {
		parts[i] = fmt.Sprintf("%.1f", float64(d.Microseconds())/float64(n))
	}
	return strings.Join(parts, " / ")
}

func procsCPU(ps ...*process) []time.Duration {
	var out []time.Duration
	for _, p := range ps {
		out = append(out, proctest.CPU(p.pid()))
	}
	return out
}

type e2eThroughputResult struct {
	recv, pipeline float64
	first          time.Duration
	cpu            string
	perMsg         float64 // changes per delivery message
}

func e2eThroughput(t *testing.T, b e2eBins, n int) e2eThroughputResult {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	w := prepareWorkload(ctx, t, n, "recv_e2e", "capture_e2e")
	recvBin := filepath.Join(w.pg.BinDir, "pg_recvlogical")
	if _, err := os.Stat(recvBin); err != nil {
		if recvBin, err = exec.LookPath("pg_recvlogical"); err != nil {
			t.Fatalf("pg_recvlogical not found")
		}
	}
	rr := runRecvLogical(ctx, t, w, recvBin, "recv_e2e")

	e := e2eStart(t, b, w, "capture_e2e", "    stream: items\n")
	c := newS2Counter(e, "items")
	waitQuiet(t)
	start := time.Now()
	cp := e.service(t, b.capture, "capture")
	rt := e.service(t, b.router, "router")
	dl := e.service(t, b.delivery, "delivery")
	e.profileNATS(t, "throughput")
	done, first := c.waitAll(ctx, t, n, start, 20*time.Minute)
	cpu := procsCPU(cp, rt, dl, e.ns, e.s2)
	r := e2eThroughputResult{recv: rr.changesPer, pipeline: float64(n) / done.Seconds(), first: first}
	r.cpu = cpuPer(cpu, n)
	time.Sleep(time.Second) // nothing beyond n arrives
	c.check(ctx, t, map[string]int{"items": n})
	r.perMsg = changesPerDeliveryMessage(ctx, t, e.natsURL, n)
	e.stopAll(t, "delivery", "router", "capture")
	e.stopInfra(t)
	t.Logf("throughput: pipeline %d changes in %s (%.0f/s), pg_recvlogical %.0f/s, ratio %.2f; CPU µs/change %s; %.1f changes per delivery message",
		n, done.Round(time.Millisecond), r.pipeline, r.recv, r.pipeline/r.recv, r.cpu, r.perMsg)
	return r
}

// e2eFunction is one variant of the functions benchmark.
type e2eFunction struct {
	name, sink, stream string // the sink's YAML lines, the S2 stream its changes reach
	rate, routerCPU    float64
}

// e2eFunctions drains the same backlog through the whole pipeline with a
// sink without functions, with the seed's routing function, a filter on
// a record field (that keeps every change), a transform that builds a
// new body, and without functions again, in that order, after a warm-up
// run, each from its own slot. (The routing function reads only the
// table: the router decides it once per table and action.)
func e2eFunctions(t *testing.T, b e2eBins, n int) []e2eFunction {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	vs := []e2eFunction{
		// A warm-up, not reported: the first run of a backlog starts cold
		// (the WAL read from disk).
		{name: "warm-up", sink: "    stream: items\n", stream: "items"},
		{name: "no functions", sink: "    stream: items\n", stream: "items"},
		{name: `routing by table {"stream": metadata.table_schema + "." + metadata.table_name}`,
			sink: "    stream: items\n    routing: '{\"stream\": metadata.table_schema + \".\" + metadata.table_name}'\n", stream: "public.items"},
		{name: "filter record.qty >= 0", sink: "    stream: items\n    filter: 'record.qty >= 0'\n", stream: "items"},
		{name: `transform {"id", "name", "qty", "action"}`,
			sink: "    stream: items\n    transform: '{\"id\": record.id, \"name\": record.name, \"qty\": record.qty, \"action\": action}'\n", stream: "items"},
		// Again last: the reference is the mean of both.
		{name: "no functions (again)", sink: "    stream: items\n", stream: "items"},
	}
	slots := make([]string, len(vs))
	for i := range vs {
		slots[i] = fmt.Sprintf("fn_%d", i)
	}
	w := prepareWorkload(ctx, t, n, slots...)
	for i := range vs {
		v := &vs[i]
		e := e2eStart(t, b, w, slots[i], v.sink)
		c := newS2Counter(e, v.stream)
		waitQuiet(t)
		start := time.Now()
		cp := e.service(t, b.capture, "capture")
		rt := e.service(t, b.router, "router")
		dl := e.service(t, b.delivery, "delivery")
		done, _ := c.waitAll(ctx, t, n, start, 20*time.Minute)
		cpu := procsCPU(cp, rt, dl)
		v.rate, v.routerCPU = float64(n)/done.Seconds(), float64(cpu[1].Microseconds())/float64(n)
		c.check(ctx, t, map[string]int{v.stream: n})
		e.stopAll(t, "delivery", "router", "capture")
		e.stopInfra(t)
		t.Logf("functions: %s: %.0f changes/s, router %.1f µs/change", v.name, v.rate, v.routerCPU)
	}
	return vs[1:]
}

// e2eFunctionsReference is the mean rate of the runs without functions.
func e2eFunctionsReference(vs []e2eFunction) float64 {
	return (vs[0].rate + vs[len(vs)-1].rate) / 2
}

// changesPerDeliveryMessage is the router's average batch: n changes over
// the delivery stream's messages.
func changesPerDeliveryMessage(ctx context.Context, t *testing.T, natsURL string, n int) float64 {
	nc, err := nats.Connect(natsURL)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	s, err := js.Stream(ctx, "PGS2_DELIVERY")
	if err != nil {
		t.Fatal(err)
	}
	cs, err := js.Stream(ctx, "PGS2_CHANGES")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("changes per message: %.1f in PGS2_CHANGES, %.1f in PGS2_DELIVERY", float64(n)/float64(cs.CachedInfo().State.Msgs), float64(n)/float64(s.CachedInfo().State.Msgs))
	return float64(n) / float64(s.CachedInfo().State.Msgs)
}

type e2eLatencyResult struct {
	offered, achieved float64
	dur               time.Duration
	n                 int
	p50, p99, max     float64
	p99Steady         float64
	stages            string
	points            []latencyPoint
}

// e2eLatency offers rate changes/s, each tick's rows as one transaction,
// or with oneRow as a transaction each (many small live transactions).
func e2eLatency(t *testing.T, b e2eBins, n, rate int, oneRow bool) e2eLatencyResult {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	const tickEvery = 10 * time.Millisecond
	perTick := rate / 100 // one transaction each tick
	dur := time.Duration(float64(20*time.Second) * float64(n) / 300000)
	if dur < 3*time.Second {
		dur = 3 * time.Second
	}
	w := prepareWorkload(ctx, t, 0, "capture_lat")
	e := e2eStart(t, b, w, "capture_lat", "    stream: items\n")
	e.service(t, b.capture, "capture")
	e.service(t, b.router, "router")
	e.service(t, b.delivery, "delivery")
	for _, l := range []string{"capture", "router", "delivery"} {
		_ = l // readiness: wait for the first change to arrive below
	}
	conn, err := pgx.Connect(ctx, w.pg.DSN("app"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	// Warm-up: one change through the whole pipeline (stream created, sessions open).
	if _, err := conn.Exec(ctx, `INSERT INTO public.items (id, name, qty, doc, updated_at) VALUES (0, 'warm', 0, '{}', now())`); err != nil {
		t.Fatal(err)
	}
	c := newS2Counter(e, "items")
	c.waitAll(ctx, t, 1, time.Now(), time.Minute)

	l := offerLoad(ctx, t, e, "items", c.next["items"], conn, func(ctx context.Context, conn *pgx.Conn, id int64, n int) error {
		if oneRow { // n transactions in one round trip (simple protocol)
			var q strings.Builder
			for i := range int64(n) {
				fmt.Fprintf(&q, `BEGIN; INSERT INTO public.items (id, name, qty, price, tags, doc, updated_at)
					VALUES (%d, 'item-%d', %d, 1.50, ARRAY['tag-1'], '{"color": "red"}', now()); COMMIT; `, id+i, id+i, (id+i)%100)
			}
			_, err := conn.Exec(ctx, q.String())
			return err
		}
		_, err := conn.Exec(ctx, `INSERT INTO public.items
			SELECT g, 'item-' || g, (g % 100)::int, ((g % 100000) / 100.0)::numeric(12,2),
			       ARRAY['tag-' || (g % 10), 'tag-' || (g % 7)],
			       jsonb_build_object('id', g, 'color', 'red', 'n', g % 7),
			       now()
			FROM generate_series($1::bigint, $2::bigint) g`, id, id+int64(n)-1)
		return err
	}, 1, perTick, tickEvery, dur)
	c.check(ctx, t, map[string]int{"items": l.n + 1})
	e.stopAll(t, "delivery", "router", "capture")
	stages := stageLatencies(ctx, t, e.natsURL)
	e.stopInfra(t)
	r := e2eLatencyResult{points: l.points, offered: float64(rate), achieved: l.achieved, dur: l.dur, n: l.n, p50: l.p50, p99: l.p99, max: l.max, p99Steady: l.p99Steady}
	t.Logf("latency: %d changes at %.0f/s: p50 %.1f ms, p99 %.1f ms (%.1f ms after the first 2 s), max %.1f ms", r.n, r.achieved, r.p50, r.p99, r.p99Steady, r.max)
	t.Logf("latency by stage (commit → stored in the stream, per message's first change): %s", stages)
	r.stages = stages
	return r
}

// loadResult is what offerLoad measured: commit → observed in S2.
type loadResult struct {
	points        []latencyPoint // every change, in stream order
	n             int
	achieved      float64 // changes/s committed
	dur           time.Duration
	p50, p99, max float64 // ms
	p99Steady     float64 // ms, after the first 2 s of load
}

// offerLoad commits perTick rows (insert(id, perTick)) as one transaction
// every tickEvery for dur, on an absolute schedule (a late tick is caught
// up, not dropped), ids from firstID on, while a reader long-polls the S2
// stream from seq next and notes when each record is seen against its
// commit time. It logs the worst latency per second of commit time.
func offerLoad(ctx context.Context, t *testing.T, e *e2eEnv, stream string, next uint64, conn *pgx.Conn,
	insert func(ctx context.Context, conn *pgx.Conn, id int64, n int) error, firstID int64, perTick int, tickEvery, dur time.Duration) loadResult {
	t.Helper()
	var mu sync.Mutex
	var lats []float64
	type obs struct {
		commit time.Time
		ms     float64
	}
	var seq []obs // in stream order, for the per-second profile
	total := int(dur/tickEvery) * perTick
	readerDone := make(chan error, 1)
	go func() {
		sc := e.client.Basin(e2eBasin).Stream(s2.StreamName(stream))
		seen := 0
		for seen < total {
			count, wait := uint64(1000), int32(10)
			start := next
			rb, err := sc.Read(ctx, &s2.ReadOptions{SeqNum: &start, Count: &count, Wait: &wait})
			now := time.Now()
			if err != nil {
				readerDone <- err
				return
			}
			for _, r := range rb.Records {
				next = r.SeqNum + 1
				if isCommand(r) {
					continue
				}
				var m struct {
					Metadata struct {
						CommitTimestamp string `json:"commit_timestamp"`
					} `json:"metadata"`
				}
				if err := json.Unmarshal(r.Body, &m); err != nil {
					readerDone <- fmt.Errorf("record %d: %v", r.SeqNum, err)
					return
				}
				ct, err := time.Parse(time.RFC3339Nano, m.Metadata.CommitTimestamp)
				if err != nil {
					readerDone <- fmt.Errorf("record %d: commit_timestamp %q: %v", r.SeqNum, m.Metadata.CommitTimestamp, err)
					return
				}
				mu.Lock()
				lats = append(lats, float64(now.Sub(ct).Microseconds())/1000)
				seq = append(seq, obs{ct, lats[len(lats)-1]})
				mu.Unlock()
				seen++
			}
		}
		readerDone <- nil
	}()

	start := time.Now()
	id := firstID
	for k := 0; k < int(dur/tickEvery); k++ {
		if d := time.Until(start.Add(time.Duration(k) * tickEvery)); d > 0 {
			time.Sleep(d)
		}
		if err := insert(ctx, conn, id, perTick); err != nil {
			t.Fatalf("insert: %v", err)
		}
		id += int64(perTick)
	}
	loadDur := time.Since(start)
	select {
	case err := <-readerDone:
		if err != nil {
			t.Fatalf("reader: %v", err)
		}
	case <-time.After(2 * time.Minute):
		mu.Lock()
		n := len(lats)
		mu.Unlock()
		t.Fatalf("reader saw %d of %d records", n, total)
	}

	// Worst latency per second of commit time: shows whether slow records
	// cluster (a stall) or spread (a queue).
	var prof []string
	if len(seq) > 0 {
		t0 := seq[0].commit
		worst := map[int]float64{}
		last := 0
		for _, o := range seq {
			s := int(o.commit.Sub(t0) / time.Second)
			worst[s] = max(worst[s], o.ms)
			last = max(last, s)
		}
		for s := 0; s <= last; s++ {
			prof = append(prof, fmt.Sprintf("%.0f", worst[s]))
		}
	}
	t.Logf("latency (%s): worst ms per second of commit time: %s", stream, strings.Join(prof, " "))
	sort.Float64s(lats)
	pct := func(p float64) float64 { return lats[min(len(lats)-1, int(p*float64(len(lats))))] }
	r := loadResult{n: total, achieved: float64(total) / loadDur.Seconds(), dur: loadDur, p50: pct(0.50), p99: pct(0.99), max: lats[len(lats)-1]}
	for _, o := range seq {
		r.points = append(r.points, latencyPoint{commit: o.commit, ms: o.ms})
	}
	// The same without the first 2 s of load (start-up transients: fresh
	// heaps, first JetStream blocks), for comparison.
	var steady []float64
	for _, o := range seq {
		if o.commit.Sub(seq[0].commit) >= 2*time.Second {
			steady = append(steady, o.ms)
		}
	}
	if len(steady) > 0 {
		sort.Float64s(steady)
		r.p99Steady = steady[min(len(steady)-1, len(steady)*99/100)]
	}
	return r
}

// stageLatencies reads when JetStream stored each message of the changes
// and delivery streams, against the commit time of its first change.
func stageLatencies(ctx context.Context, t *testing.T, natsURL string) string {
	nc, err := nats.Connect(natsURL)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	var parts []string
	for _, name := range []string{"PGS2_CHANGES", "PGS2_DELIVERY"} {
		s, err := js.Stream(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		st := s.CachedInfo().State
		stride := max(1, st.Msgs/5000)
		var ms []float64
		worst := map[int64]float64{}
		var first int64
		for seq := st.FirstSeq; seq <= st.LastSeq; seq += stride {
			m, err := s.GetMsg(ctx, seq)
			if err != nil {
				t.Fatal(err)
			}
			var e bus.Entry
			if bus.NewBatchReader(m.Data).Next(&e) && e.CommitMs > 0 {
				if seq > st.FirstSeq+1 && first == 0 { // after the warm-up change
					first = e.CommitMs
				}
				d := float64(m.Time.UnixMicro()-e.CommitMs*1000) / 1000
				ms = append(ms, d)
				if first > 0 {
					sec := (e.CommitMs - first) / 1000
					worst[sec] = max(worst[sec], d)
				}
			}
		}
		if len(ms) == 0 {
			continue
		}
		var prof []string
		for sec := int64(0); sec < int64(len(worst)); sec++ {
			prof = append(prof, fmt.Sprintf("%.0f", worst[sec]))
		}
		t.Logf("%s: worst ms per second of commit time: %s", name, strings.Join(prof, " "))
		sort.Float64s(ms)
		parts = append(parts, fmt.Sprintf("%s p50 %.1f ms, p99 %.1f ms", name, ms[len(ms)/2], ms[min(len(ms)-1, len(ms)*99/100)]))
	}
	return strings.Join(parts, "; ")
}

// e2eScaling drains n changes (already routed into the delivery stream)
// into 8 S2 streams with the given number of delivery processes while
// s2local adds 20 ms to every append; it returns changes/s.
func e2eScaling(t *testing.T, b e2eBins, n, workers int, latency time.Duration) float64 {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	slot := fmt.Sprintf("capture_scale_%d_%d", workers, latency.Milliseconds())
	w := prepareWorkload(ctx, t, n, slot)
	var faults []string
	if latency > 0 {
		faults = []string{"--fault-latency", latency.String(), "--fault-appends-only"}
	}
	e := e2eStart(t, b, w, slot, "    routing: '{\"stream\": \"s-\" + string(record.id % 8)}'\n", faults...)
	e.service(t, b.capture, "capture")
	e.service(t, b.router, "router")

	// Wait for router to have published every change for delivery.
	nc, err := nats.Connect(e.natsURL)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	for deadline := time.Now().Add(10 * time.Minute); ; time.Sleep(100 * time.Millisecond) {
		e.checkAlive(t)
		if time.Now().After(deadline) {
			t.Fatalf("delivery stream not filled in 10m")
		}
		// Every change is routed when the last delivery message ends a
		// round whose last input is the changes stream's last message.
		s, err := js.Stream(ctx, "PGS2_DELIVERY")
		if err != nil {
			continue
		}
		m, err := s.GetLastMsgForSubject(ctx, ">")
		if err != nil {
			continue
		}
		ri, rn, _ := strings.Cut(m.Header.Get(bus.HeaderRound), "/")
		end, _ := strconv.ParseUint(m.Header.Get(bus.HeaderInputEnd), 10, 64)
		if cs, err := js.Stream(ctx, "PGS2_CHANGES"); err == nil && ri == rn && end > 0 && end == cs.CachedInfo().State.LastSeq {
			break
		}
	}
	e.stopAll(t, "router", "capture")

	streams := make([]string, 8)
	want := map[string]int{}
	for i := range streams {
		streams[i] = fmt.Sprintf("s-%d", i)
	}
	for id := 1; id <= n/2; id++ {
		want[fmt.Sprintf("s-%d", id%8)] += 2
	}
	c := newS2Counter(e, streams...)
	waitQuiet(t)
	start := time.Now()
	var labels []string
	for i := 0; i < workers; i++ {
		l := fmt.Sprintf("delivery-%d", i)
		e.service(t, b.delivery, l)
		labels = append(labels, l)
	}
	done, _ := c.waitAll(ctx, t, n, start, 15*time.Minute)
	rate := float64(n) / done.Seconds()
	time.Sleep(time.Second)
	c.check(ctx, t, want)
	_, fences := c.totals()
	e.stopAll(t, labels...)
	e.stopInfra(t)
	t.Logf("scaling: %d delivery process(es), %s per append: %d changes in %s (%.0f/s), %d fences", workers, latency, n, done.Round(time.Millisecond), rate, fences)
	return rate
}
