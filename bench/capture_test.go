// Package bench holds pgs2's benchmarks. They are tests that run only with
// PGS2_BENCH=1 (`make bench`); results are written up in docs/benchmarks.md.
package bench

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgs2/pgs2/pkg/change"
	"github.com/pgs2/pgs2/pkg/pgtest"
)

// clockTicks is USER_HZ, the unit of utime/stime in /proc/<pid>/stat (100 on Linux).
const clockTicks = 100

const (
	benchSource = "app"
	benchStream = "PGS2_CHANGES"
	txRows      = 1000 // rows per workload transaction
)

// TestBenchCapture measures how fast capture drains a slot backlog into
// JetStream, against pg_recvlogical draining the same WAL with the same
// plugin and publication (the decoding limit).
//
// The workload (PGS2_BENCH_CHANGES changes, default 300000: half inserts,
// half updates, in 1000-row transactions) is written before either reader
// starts, into two slots created before it, so both readers decode the same
// WAL as a backlog.
func TestBenchCapture(t *testing.T) {
	if os.Getenv("PGS2_BENCH") != "1" {
		t.Skip("benchmark: set PGS2_BENCH=1 (make bench)")
	}
	n := 300000
	if s := os.Getenv("PGS2_BENCH_CHANGES"); s != "" {
		v, err := strconv.Atoi(s)
		if err != nil || v <= 0 || v%(2*txRows) != 0 {
			t.Fatalf("PGS2_BENCH_CHANGES=%q: want a positive multiple of %d", s, 2*txRows)
		}
		n = v
	}

	root := repoRoot(t)
	binDir := t.TempDir()
	captureBin := filepath.Join(binDir, "capture")
	natsBin := filepath.Join(binDir, "nats-server")
	goBuild(t, root, captureBin, "./services/capture")
	goBuild(t, root, natsBin, "github.com/nats-io/nats-server/v2")

	pg := pgtest.New(t, pgtest.WithSettings(map[string]string{
		"max_wal_size":       "4GB",
		"checkpoint_timeout": "30min",
	}))
	recvBin := filepath.Join(pg.BinDir, "pg_recvlogical")
	if _, err := os.Stat(recvBin); err != nil {
		if recvBin, err = exec.LookPath("pg_recvlogical"); err != nil {
			t.Fatalf("pg_recvlogical not found in %s or PATH", pg.BinDir)
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Minute)
	defer cancel()

	// Schema, publication and both slots before the workload.
	pg.MustExec(t, "postgres", "CREATE DATABASE app")
	pg.MustExec(t, "app", `CREATE TABLE public.items (
		id bigint PRIMARY KEY, name text, qty int, price numeric(12,2),
		tags text[], doc jsonb, updated_at timestamptz)`)
	pg.MustExec(t, "app", `CREATE PUBLICATION pgs2 FOR TABLE public.items`)
	pg.MustExec(t, "app", `SELECT pg_create_logical_replication_slot('pgs2', 'pgoutput'),
		pg_create_logical_replication_slot('bench_recv', 'pgoutput')`)

	conn, err := pgx.Connect(ctx, pg.DSN("app"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var pgVersion string
	if err := conn.QueryRow(ctx, `SHOW server_version`).Scan(&pgVersion); err != nil {
		t.Fatal(err)
	}

	// Workload: n/2 inserts, then n/2 updates of the same rows, 1000 rows per transaction.
	wlStart := time.Now()
	rows := n / 2
	for lo := 1; lo <= rows; lo += txRows {
		if _, err := conn.Exec(ctx, `INSERT INTO public.items
			SELECT g, 'item-' || g, (g % 100)::int, ((g % 100000) / 100.0)::numeric(12,2),
			       ARRAY['tag-' || (g % 10), 'tag-' || (g % 7)],
			       jsonb_build_object('id', g, 'color', 'red', 'n', g % 7, 'nested', jsonb_build_object('x', g, 'ok', true)),
			       now()
			FROM generate_series($1::bigint, $2::bigint) g`, lo, lo+txRows-1); err != nil {
			t.Fatalf("insert: %v", err)
		}
	}
	for lo := 1; lo <= rows; lo += txRows {
		if _, err := conn.Exec(ctx, `UPDATE public.items
			SET qty = qty + 1, doc = jsonb_set(doc, '{n}', to_jsonb(qty + 1)), updated_at = now()
			WHERE id BETWEEN $1 AND $2`, lo, lo+txRows-1); err != nil {
			t.Fatalf("update: %v", err)
		}
	}
	var endLSN string
	var walBytes int64
	if err := conn.QueryRow(ctx, `SELECT pg_current_wal_lsn()::text,
		pg_wal_lsn_diff(pg_current_wal_lsn(), (SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = 'pgs2'))::bigint`).
		Scan(&endLSN, &walBytes); err != nil {
		t.Fatal(err)
	}
	wlDur := time.Since(wlStart)
	t.Logf("workload: %d changes in %d transactions, %.1f MiB of WAL, %s; end LSN %s",
		n, n/txRows, float64(walBytes)/(1<<20), wlDur.Round(time.Millisecond), endLSN)

	recv := runRecvLogical(ctx, t, pg, recvBin, endLSN, n)
	capt := runCapture(ctx, t, pg, captureBin, natsBin, n)

	report(t, resultsInput{n: n, pgVersion: pgVersion, walBytes: walBytes, recv: recv, capt: capt})
}

// recvResult is pg_recvlogical's run.
type recvResult struct {
	dur        time.Duration
	cpu        time.Duration // pg_recvlogical's own CPU
	walsender  time.Duration // its walsender's CPU (pgoutput decoding), sampled
	outBytes   int64
	changesPer float64
}

func runRecvLogical(ctx context.Context, t *testing.T, pg *pgtest.Instance, bin, endLSN string, n int) recvResult {
	t.Helper()
	out := filepath.Join(t.TempDir(), "recvlogical.out")
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, "-d", pg.DSN("app"), "--slot", "bench_recv", "--start",
		"-o", "proto_version=1", "-o", "publication_names=pgs2", "-E", endLSN, "-f", out, "--no-loop")
	cmd.Stderr = &stderr
	ws := sampleWalsender(ctx, t, pg, "bench_recv")
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatalf("start pg_recvlogical: %v", err)
	}
	err := cmd.Wait()
	dur := time.Since(start)
	wsCPU := ws()
	if err != nil {
		t.Fatalf("pg_recvlogical: %v\n%s", err, stderr.String())
	}
	if code := cmd.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("pg_recvlogical exited %d\n%s", code, stderr.String())
	}
	fi, err := os.Stat(out)
	if err != nil {
		t.Fatalf("pg_recvlogical output: %v", err)
	}
	r := recvResult{dur: dur, cpu: cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime(),
		walsender: wsCPU, outBytes: fi.Size(), changesPer: float64(n) / dur.Seconds()}
	t.Logf("pg_recvlogical: %d changes in %s (%.0f changes/s), %.1f MiB written",
		n, dur.Round(time.Millisecond), r.changesPer, float64(r.outBytes)/(1<<20))
	return r
}

// captureResult is capture's run.
type captureResult struct {
	dur        time.Duration // process start → stream holds n
	firstMsg   time.Duration // process start → first message stored
	steady     float64       // changes/s between 10% and 90% of n stored
	changesPer float64
	rssHWM     int64         // VmHWM bytes at n
	cpuAtN     time.Duration // capture's CPU when the stream held n
	cpuTotal   time.Duration // capture's CPU including shutdown
	natsCPU    time.Duration // nats-server's CPU during the run
	walsender  time.Duration // capture's walsender CPU, sampled
	stopDur    time.Duration // SIGTERM → exit
	streamMB   float64
}

func runCapture(ctx context.Context, t *testing.T, pg *pgtest.Instance, captureBin, natsBin string, n int) captureResult {
	t.Helper()
	dir := t.TempDir()

	// nats-server as its own process.
	natsPort, err := pgtest.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	storeDir := filepath.Join(dir, "js")
	natsLog := filepath.Join(dir, "nats-server.log")
	ns := startProcess(t, natsBin, natsLog, "-js", "-sd", storeDir, "-p", strconv.Itoa(natsPort), "-a", "127.0.0.1")
	natsURL := fmt.Sprintf("nats://127.0.0.1:%d", natsPort)
	var nc *nats.Conn
	for deadline := time.Now().Add(30 * time.Second); ; {
		nc, err = nats.Connect(natsURL)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("nats-server not reachable at %s: %v\n%s", natsURL, err, tailFile(natsLog))
		}
		time.Sleep(50 * time.Millisecond)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}

	httpPort, err := pgtest.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(dir, "pgs2.yaml")
	cfg := fmt.Sprintf(`source:
  name: %s
  dsn: %s
  slot: pgs2
  publication: pgs2
  tables: [public.items]
nats:
  url: %s
  partitions: 64
  changes_stream: %s
`, benchSource, pg.DSN("app"), natsURL, benchStream)
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}

	natsCPU0 := procCPU(ns.pid())
	ws := sampleWalsender(ctx, t, pg, "pgs2")
	capLog := filepath.Join(dir, "capture.log")
	start := time.Now()
	cp := startProcess(t, captureBin, capLog, "--config", cfgPath, "--http-addr", fmt.Sprintf("127.0.0.1:%d", httpPort))

	var samples []sample
	var stream jetstream.Stream
	var r captureResult
	deadline := time.Now().Add(30 * time.Minute)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-cp.done:
			t.Fatalf("capture exited before the stream held %d messages: %v\n%s", n, cp.err, tailFile(capLog))
		case <-tick.C:
		}
		if time.Now().After(deadline) {
			t.Fatalf("stream holds %d of %d messages after 30m\n%s", lastMsgs(samples), n, tailFile(capLog))
		}
		if stream == nil {
			s, err := js.Stream(ctx, benchStream)
			if errors.Is(err, jetstream.ErrStreamNotFound) {
				continue
			}
			if err != nil {
				t.Fatalf("stream %s: %v", benchStream, err)
			}
			stream = s
		}
		info, err := stream.Info(ctx)
		if err != nil {
			t.Fatalf("stream info: %v", err)
		}
		now := time.Since(start)
		msgs := info.State.Msgs
		samples = append(samples, sample{now, msgs})
		if msgs > 0 && r.firstMsg == 0 {
			r.firstMsg = now
		}
		if msgs >= uint64(n) {
			r.dur = now
			r.streamMB = float64(info.State.Bytes) / (1 << 20)
			break
		}
	}
	r.changesPer = float64(n) / r.dur.Seconds()
	r.rssHWM = procHWM(cp.pid())
	r.cpuAtN = procCPU(cp.pid())
	r.natsCPU = procCPU(ns.pid()) - natsCPU0
	r.walsender = ws()

	// Steady rate: from the first sample at >= 10% of n to the first at >= 90%.
	var a, b *sample
	for i := range samples {
		s := &samples[i]
		if a == nil && s.msgs >= uint64(n)/10 {
			a = s
		}
		if b == nil && s.msgs >= uint64(n)*9/10 {
			b = s
		}
	}
	if a != nil && b != nil && b.at > a.at {
		r.steady = float64(b.msgs-a.msgs) / (b.at - a.at).Seconds()
	}

	// Nothing beyond n arrives.
	time.Sleep(time.Second)
	info, err := stream.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Msgs != uint64(n) {
		t.Errorf("stream holds %d messages, want exactly %d", info.State.Msgs, n)
	}

	// Clean shutdown.
	stopAt := time.Now()
	if err := syscall.Kill(cp.pid(), syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-cp.done:
	case <-time.After(60 * time.Second):
		t.Fatalf("capture did not exit within 60s of SIGTERM\n%s", tailFile(capLog))
	}
	r.stopDur = time.Since(stopAt)
	if code := cp.state.ExitCode(); code != 0 {
		t.Errorf("capture exited %d after SIGTERM, want 0 (%v)\n%s", code, cp.err, tailFile(capLog))
	}
	r.cpuTotal = cp.state.UserTime() + cp.state.SystemTime()

	// The first and last messages are the first insert and the last update.
	checkMsg(ctx, t, stream, 1, change.Insert)
	checkMsg(ctx, t, stream, uint64(n), change.Update)
	if info, err := stream.Info(ctx); err != nil || info.State.Msgs != uint64(n) {
		t.Errorf("after shutdown the stream holds %v messages (err %v), want %d", info.State.Msgs, err, n)
	}
	t.Logf("capture: %d changes in %s (%.0f changes/s), first message after %s",
		n, r.dur.Round(time.Millisecond), r.changesPer, r.firstMsg.Round(time.Millisecond))
	return r
}

// sample is the stream's message count at a time after capture started.
type sample struct {
	at   time.Duration
	msgs uint64
}

func lastMsgs(s []sample) uint64 {
	if len(s) == 0 {
		return 0
	}
	return s[len(s)-1].msgs
}

func checkMsg(ctx context.Context, t *testing.T, s jetstream.Stream, seq uint64, want change.Action) {
	t.Helper()
	m, err := s.GetMsg(ctx, seq)
	if err != nil {
		t.Errorf("get message %d: %v", seq, err)
		return
	}
	var msg change.Message
	if err := json.Unmarshal(m.Data, &msg); err != nil {
		t.Errorf("message %d is not JSON: %v", seq, err)
		return
	}
	if msg.Action != want || msg.Metadata.TableName != "items" || msg.Record["doc"] == nil {
		t.Errorf("message %d: action %q table %q, want %q on items with a doc:\n%s", seq, msg.Action, msg.Metadata.TableName, want, m.Data)
	}
	if m.Header.Get("Nats-Msg-Id") != msg.Metadata.IdempotencyKey {
		t.Errorf("message %d: Nats-Msg-Id %q != idempotency_key %q", seq, m.Header.Get("Nats-Msg-Id"), msg.Metadata.IdempotencyKey)
	}
}

type resultsInput struct {
	n         int
	pgVersion string
	walBytes  int64
	recv      recvResult
	capt      captureResult
}

func report(t *testing.T, in resultsInput) {
	t.Helper()
	var lines []string
	add := func(format string, a ...any) { lines = append(lines, fmt.Sprintf(format, a...)) }
	perChange := func(d time.Duration) float64 { return float64(d.Microseconds()) / float64(in.n) }
	ratio := in.capt.changesPer / in.recv.changesPer
	rssMiB := float64(in.capt.rssHWM) / (1 << 20)

	add("machine: %d CPUs (%s), %s, PostgreSQL %s, %s", runtime.NumCPU(), cpuModel(), memTotal(), in.pgVersion, runtime.Version())
	add("workload: %d changes (%d inserts + %d updates) in %d-row transactions, %.1f MiB WAL",
		in.n, in.n/2, in.n/2, txRows, float64(in.walBytes)/(1<<20))
	add("")
	add("| metric                                      | value        | target   |")
	add("|---------------------------------------------|--------------|----------|")
	add("| pg_recvlogical changes/s                    | %12.0f |          |", in.recv.changesPer)
	add("| capture changes/s (start → all stored)      | %12.0f |          |", in.capt.changesPer)
	add("| capture / pg_recvlogical                    | %12.2f | >= 0.60  |", ratio)
	add("| capture steady changes/s (10%% → 90%%)        | %12.0f |          |", in.capt.steady)
	add("| capture time to first stored message        | %12s |          |", in.capt.firstMsg.Round(time.Millisecond))
	add("| capture peak RSS (VmHWM) MiB                | %12.1f | < 200    |", rssMiB)
	add("| capture CPU µs/change (at n stored)         | %12.1f |          |", perChange(in.capt.cpuAtN))
	add("| nats-server CPU µs/change                   | %12.1f |          |", perChange(in.capt.natsCPU))
	add("| walsender CPU µs/change, capture's slot     | %12.1f |          |", perChange(in.capt.walsender))
	add("| walsender CPU µs/change, pg_recvlogical's   | %12.1f |          |", perChange(in.recv.walsender))
	add("| pg_recvlogical CPU µs/change                | %12.1f |          |", perChange(in.recv.cpu))
	add("| pg_recvlogical wall s / capture wall s      | %5.2f / %5.2f |       |", in.recv.dur.Seconds(), in.capt.dur.Seconds())
	add("| capture shutdown (SIGTERM → exit 0)         | %12s |          |", in.capt.stopDur.Round(time.Millisecond))
	add("| stream size MiB (bytes/msg)                 | %6.1f (%4.0f) |        |", in.capt.streamMB, in.capt.streamMB*(1<<20)/float64(in.n))
	if ratio < 0.60 {
		add("TARGET MISSED: capture/pg_recvlogical = %.2f < 0.60", ratio)
	}
	if rssMiB >= 200 {
		add("TARGET MISSED: capture peak RSS = %.1f MiB >= 200", rssMiB)
	}
	// One machine-readable line per run, for docs/benchmarks.md.
	add("RESULT n=%d recv_per_s=%.0f capture_per_s=%.0f ratio=%.3f steady_per_s=%.0f first_msg_ms=%d rss_mib=%.1f "+
		"capture_cpu_us=%.2f nats_cpu_us=%.2f walsender_cap_us=%.2f walsender_recv_us=%.2f recv_cpu_us=%.2f",
		in.n, in.recv.changesPer, in.capt.changesPer, ratio, in.capt.steady, in.capt.firstMsg.Milliseconds(), rssMiB,
		perChange(in.capt.cpuAtN), perChange(in.capt.natsCPU), perChange(in.capt.walsender), perChange(in.recv.walsender), perChange(in.recv.cpu))

	for _, l := range lines {
		t.Log(l)
	}
	fmt.Println("\n=== capture benchmark ===")
	for _, l := range lines {
		fmt.Println(l)
	}
}

// process is a child process whose exit is watched.
type process struct {
	cmd   *exec.Cmd
	done  chan struct{}
	err   error
	state *os.ProcessState
}

func (p *process) pid() int { return p.cmd.Process.Pid }

// startProcess starts bin with its output in logPath and kills it at cleanup
// if it is still running.
func startProcess(t *testing.T, bin, logPath string, args ...string) *process {
	t.Helper()
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("start %s: %v", bin, err)
	}
	p := &process{cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		p.state = cmd.ProcessState
		logf.Close()
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
			return
		default:
		}
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-p.done
		}
	})
	return p
}

// sampleWalsender follows the walsender serving slot (its active_pid) and
// samples its CPU every 50ms; the returned func stops sampling and returns
// the last sample. The walsender exits with its client, so the last sample
// can miss up to 50ms of its work.
func sampleWalsender(ctx context.Context, t *testing.T, pg *pgtest.Instance, slot string) func() time.Duration {
	t.Helper()
	conn, err := pgx.Connect(ctx, pg.DSN("app"))
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var mu sync.Mutex
	var last time.Duration
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer conn.Close(context.Background())
		pid := 0
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			if pid == 0 {
				var p *int32
				if err := conn.QueryRow(ctx, `SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&p); err == nil && p != nil {
					pid = int(*p)
				}
				continue
			}
			if c := procCPU(pid); c > 0 {
				mu.Lock()
				last = c
				mu.Unlock()
			}
		}
	}()
	return func() time.Duration {
		close(stop)
		wg.Wait()
		mu.Lock()
		defer mu.Unlock()
		return last
	}
}

// procCPU returns a process's user+system CPU from /proc (0 if it is gone).
func procCPU(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64) // field 14
	st, _ := strconv.ParseInt(f[12], 10, 64) // field 15
	return time.Duration(ut+st) * time.Second / clockTicks
}

// procHWM returns a process's peak resident set size (VmHWM) in bytes.
func procHWM(pid int) int64 {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			return kb << 10
		}
	}
	return 0
}

func cpuModel() string {
	b, _ := os.ReadFile("/proc/cpuinfo")
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown CPU"
}

func memTotal() string {
	b, _ := os.ReadFile("/proc/meminfo")
	for _, l := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(l, "MemTotal:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			return fmt.Sprintf("%.1f GiB RAM", float64(kb)/(1<<20))
		}
	}
	return "unknown RAM"
}

// repoRoot is the directory of go.mod.
func repoRoot(t *testing.T) string {
	t.Helper()
	out, err := exec.Command(goTool(), "env", "GOMOD").Output()
	if err == nil {
		if p := strings.TrimSpace(string(out)); p != "" && p != os.DevNull {
			return filepath.Dir(p)
		}
	}
	abs, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	return abs
}

func goTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	return "/usr/local/go/bin/go"
}

func goBuild(t *testing.T, root, out, pkg string) {
	t.Helper()
	cmd := exec.Command(goTool(), "build", "-trimpath", "-o", out, pkg)
	cmd.Dir = root
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, b)
	}
}

func tailFile(path string) string {
	b, _ := os.ReadFile(path)
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}
