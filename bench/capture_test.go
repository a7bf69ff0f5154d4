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
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/change"
	"github.com/pgs2/pgs2/pkg/pgtest"
	"github.com/pgs2/pgs2/pkg/proctest"
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
// WAL as a backlog. pg_recvlogical is timed from its start until it exits
// at the workload's end LSN; capture (bin/capture as a process, with
// nats-server as another) from its start until PGS2_CHANGES holds every
// change. Before each reader the test waits for the machine to be idle, and
// it reports how much CPU other processes used during each measurement.
//
// It fails only when a result is wrong (message counts, exit statuses); a
// missed performance target is printed as "TARGET MISSED".
func TestBenchCapture(t *testing.T) {
	if os.Getenv("PGS2_BENCH") != "1" {
		t.Skip("benchmark: set PGS2_BENCH=1 (make bench)")
	}
	n := benchChanges(t)
	rounds := benchRounds(t)
	root := repoRoot(t)
	binDir := t.TempDir()
	captureBin := filepath.Join(binDir, "capture")
	natsBin := filepath.Join(binDir, "nats-server")
	goBuild(t, root, captureBin, "./services/capture")
	goBuild(t, root, natsBin, "github.com/nats-io/nats-server/v2")
	version := gitVersion(root)

	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Minute)
	defer cancel()
	// Two slots per round, all created before the workload: each reader
	// drains the same backlog from a slot of its own.
	var slots []string
	for i := 1; i <= rounds; i++ {
		slots = append(slots, fmt.Sprintf("recv_%d", i), fmt.Sprintf("capture_%d", i))
	}
	w := prepareWorkload(ctx, t, n, slots...)
	recvBin := filepath.Join(w.pg.BinDir, "pg_recvlogical")
	if _, err := os.Stat(recvBin); err != nil {
		if recvBin, err = exec.LookPath("pg_recvlogical"); err != nil {
			t.Fatalf("pg_recvlogical not found in %s or PATH", w.pg.BinDir)
		}
	}

	// Rounds alternate which reader goes first, so neither profits from
	// the order; each round's ratio compares two runs seconds apart.
	var rs []round
	for i := 1; i <= rounds; i++ {
		r := round{captureFirst: i%2 == 0}
		if r.captureFirst {
			r.capt = runCapture(ctx, t, w, captureBin, natsBin, fmt.Sprintf("capture_%d", i))
			r.recv = runRecvLogical(ctx, t, w, recvBin, fmt.Sprintf("recv_%d", i))
		} else {
			r.recv = runRecvLogical(ctx, t, w, recvBin, fmt.Sprintf("recv_%d", i))
			r.capt = runCapture(ctx, t, w, captureBin, natsBin, fmt.Sprintf("capture_%d", i))
		}
		t.Logf("round %d: capture/pg_recvlogical = %.2f", i, r.ratio())
		rs = append(rs, r)
	}
	report(t, w, version, rs)
}

// benchRounds is how many times each reader runs: PGS2_BENCH_ROUNDS or 5.
func benchRounds(t *testing.T) int {
	t.Helper()
	s := os.Getenv("PGS2_BENCH_ROUNDS")
	if s == "" {
		return 5
	}
	v, err := strconv.Atoi(s)
	if err != nil || v < 1 || v > 9 {
		t.Fatalf("PGS2_BENCH_ROUNDS=%q: want 1..9", s)
	}
	return v
}

// benchChanges is the workload size: PGS2_BENCH_CHANGES or 300000.
func benchChanges(t *testing.T) int {
	t.Helper()
	s := os.Getenv("PGS2_BENCH_CHANGES")
	if s == "" {
		return 300000
	}
	v, err := strconv.Atoi(s)
	if err != nil || v <= 0 || v%(2*txRows) != 0 {
		t.Fatalf("PGS2_BENCH_CHANGES=%q: want a positive multiple of %d", s, 2*txRows)
	}
	return v
}

// workload is a PostgreSQL server whose slots hold a backlog of n changes.
type workload struct {
	pg        *pgtest.Instance
	n         int
	endLSN    string // past the last commit of the workload
	walBytes  int64
	dur       time.Duration
	pgVersion string
}

// benchPostgres starts the benchmarks' PostgreSQL.
func benchPostgres(t *testing.T) *pgtest.Instance {
	return pgtest.New(t, pgtest.WithSettings(map[string]string{
		"max_wal_size":       "4GB",
		"checkpoint_timeout": "30min",
		// No background work competing with the readers on a small machine.
		"autovacuum": "off",
		// As in production: a commit is flushed at once. With pgtest's
		// default (off) the walsender sees a commit only when the WAL writer
		// flushes it (wal_writer_delay, 200 ms), which the latency benchmark
		// would otherwise measure. fsync stays off, so commits stay cheap.
		"synchronous_commit": "on",
	}))
}

// prepareWorkload starts PostgreSQL, creates database app, table
// public.items, publication pgs2 and the given pgoutput slots, and then
// writes the workload: n/2 inserts, then n/2 updates of the same rows, 1000
// rows per transaction.
func prepareWorkload(ctx context.Context, t *testing.T, n int, slots ...string) *workload {
	t.Helper()
	pg := benchPostgres(t)
	pg.MustExec(t, "postgres", "CREATE DATABASE app")
	pg.MustExec(t, "app", `CREATE TABLE public.items (
		id bigint PRIMARY KEY, name text, qty int, price numeric(12,2),
		tags text[], doc jsonb, updated_at timestamptz)`)
	pg.MustExec(t, "app", `CREATE PUBLICATION pgs2 FOR TABLE public.items`)
	for _, s := range slots {
		pg.MustExec(t, "app", `SELECT pg_create_logical_replication_slot($1, 'pgoutput')`, s)
	}

	conn, err := pgx.Connect(ctx, pg.DSN("app"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	w := &workload{pg: pg, n: n}
	if err := conn.QueryRow(ctx, `SHOW server_version`).Scan(&w.pgVersion); err != nil {
		t.Fatal(err)
	}
	var startLSN string
	if err := conn.QueryRow(ctx, `SELECT pg_current_wal_insert_lsn()::text`).Scan(&startLSN); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
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
	// The insert position is past every commit record of the workload.
	if err := conn.QueryRow(ctx, `SELECT pg_current_wal_insert_lsn()::text,
		pg_wal_lsn_diff(pg_current_wal_insert_lsn(), $1::text::pg_lsn)::bigint`, startLSN).
		Scan(&w.endLSN, &w.walBytes); err != nil {
		t.Fatal(err)
	}
	w.dur = time.Since(start)
	// Write the workload's dirty pages now rather than during a measurement.
	if _, err := conn.Exec(ctx, `CHECKPOINT`); err != nil {
		t.Fatal(err)
	}
	t.Logf("workload: %d changes in %d transactions, %.1f MiB of WAL, written in %s; end LSN %s",
		n, n/txRows, float64(w.walBytes)/(1<<20), w.dur.Round(time.Millisecond), w.endLSN)
	return w
}

// recvResult is pg_recvlogical's run.
type recvResult struct {
	dur        time.Duration
	cpu        time.Duration // pg_recvlogical's own CPU
	walsender  time.Duration // its walsender's CPU (pgoutput decoding), sampled
	machine    sysCPU        // the whole machine's CPU during the run
	others     time.Duration // machine CPU not used by pg_recvlogical, its walsender or this test
	busiest    string        // the other processes that used most CPU
	outBytes   int64
	changesPer float64
}

func runRecvLogical(ctx context.Context, t *testing.T, w *workload, bin, slot string) recvResult {
	t.Helper()
	// The output goes to memory (tmpfs) when it can: what is measured is
	// decoding and delivery, not the file system, whose state otherwise
	// changes from round to round.
	outDir := t.TempDir()
	if d, err := os.MkdirTemp("/dev/shm", "pgs2-bench-"); err == nil {
		outDir = d
		defer os.RemoveAll(d)
	}
	out := filepath.Join(outDir, "recvlogical.out")
	defer os.Remove(out)
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, "-d", w.pg.DSN("app"), "--slot", slot, "--start",
		"-o", "proto_version=1", "-o", "publication_names=pgs2", "-E", w.endLSN, "-f", out, "--no-loop")
	cmd.Stderr = &stderr
	waitQuiet(t)
	ws := sampleWalsender(ctx, t, w.pg, slot)
	sys0, self0, pt0 := readSysCPU(), proctest.CPU(os.Getpid()), readProcTable()
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatalf("start pg_recvlogical: %v", err)
	}
	err := cmd.Wait()
	dur := time.Since(start)
	sys1, self1, pt1 := readSysCPU(), proctest.CPU(os.Getpid()), readProcTable()
	wsCPU, wsPid := ws()
	if err != nil {
		t.Fatalf("pg_recvlogical: %v\n%s", err, stderr.String())
	}
	if code := cmd.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("pg_recvlogical exited %d\n%s", code, stderr.String())
	}
	data, err := os.ReadFile(out)
	if err != nil {
		t.Fatalf("pg_recvlogical output: %v", err)
	}
	// It must have received the whole workload, not stopped early.
	counts, err := countPgoutput(data)
	if err != nil {
		t.Fatalf("pg_recvlogical output: %v", err)
	}
	if counts['I'] != w.n/2 || counts['U'] != w.n/2 || counts['C'] != w.n/txRows {
		t.Fatalf("pg_recvlogical received %d inserts, %d updates, %d commits; want %d, %d, %d",
			counts['I'], counts['U'], counts['C'], w.n/2, w.n/2, w.n/txRows)
	}
	r := recvResult{dur: dur, cpu: cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime(),
		walsender: wsCPU, outBytes: int64(len(data)), changesPer: float64(w.n) / dur.Seconds()}
	r.machine = sys1.sub(sys0)
	r.others = r.machine.busy - r.cpu - r.walsender - (self1 - self0)
	r.busiest = busiestOthers(pt0, pt1, os.Getpid(), cmd.Process.Pid, wsPid)
	t.Logf("pg_recvlogical: %d changes in %s (%.0f changes/s), %.1f MiB written; CPU user %s sys %s, walsender %s",
		w.n, dur.Round(time.Millisecond), r.changesPer, float64(r.outBytes)/(1<<20),
		cmd.ProcessState.UserTime().Round(time.Millisecond), cmd.ProcessState.SystemTime().Round(time.Millisecond), wsCPU)
	return r
}

// countPgoutput counts the messages by type in pg_recvlogical's output of
// pgoutput protocol version 1: each message followed by a newline.
func countPgoutput(b []byte) (map[byte]int, error) {
	counts := map[byte]int{}
	p := 0
	need := func(k int) error {
		if p+k > len(b) {
			return fmt.Errorf("truncated message at byte %d", p)
		}
		return nil
	}
	cstring := func() error {
		i := bytes.IndexByte(b[p:], 0)
		if i < 0 {
			return fmt.Errorf("unterminated string at byte %d", p)
		}
		p += i + 1
		return nil
	}
	tuple := func() error {
		if err := need(2); err != nil {
			return err
		}
		ncols := int(b[p])<<8 | int(b[p+1])
		p += 2
		for range ncols {
			if err := need(1); err != nil {
				return err
			}
			k := b[p]
			p++
			if k == 't' || k == 'b' {
				if err := need(4); err != nil {
					return err
				}
				l := int(b[p])<<24 | int(b[p+1])<<16 | int(b[p+2])<<8 | int(b[p+3])
				p += 4 + l
			}
		}
		return need(0)
	}
	for p < len(b) {
		typ := b[p]
		p++
		var err error
		switch typ {
		case 'B':
			err = need(20)
			p += 20
		case 'C':
			err = need(25)
			p += 25
		case 'R':
			if err = need(4); err == nil {
				p += 4
				if err = cstring(); err == nil {
					if err = cstring(); err == nil {
						if err = need(3); err == nil {
							ncols := int(b[p+1])<<8 | int(b[p+2])
							p += 3
							for i := 0; i < ncols && err == nil; i++ {
								p++ // flags
								if err = cstring(); err == nil {
									err = need(8)
									p += 8
								}
							}
						}
					}
				}
			}
		case 'Y':
			if err = need(4); err == nil {
				p += 4
				if err = cstring(); err == nil {
					err = cstring()
				}
			}
		case 'I':
			if err = need(5); err == nil {
				p += 5 // relid, 'N'
				err = tuple()
			}
		case 'U':
			if err = need(5); err == nil {
				p += 4
				if b[p] == 'K' || b[p] == 'O' {
					p++
					if err = tuple(); err == nil {
						err = need(1)
					}
				}
				if err == nil {
					p++ // 'N'
					err = tuple()
				}
			}
		case 'D':
			if err = need(5); err == nil {
				p += 5
				err = tuple()
			}
		default:
			return counts, fmt.Errorf("unexpected message type %q at byte %d", typ, p-1)
		}
		if err != nil {
			return counts, err
		}
		if p >= len(b) || b[p] != '\n' {
			return counts, fmt.Errorf("message %q not followed by a newline at byte %d", typ, p)
		}
		p++
		counts[typ]++
	}
	return counts, nil
}

// captureResult is capture's run.
type captureResult struct {
	dur        time.Duration // process start → stream holds n
	firstMsg   time.Duration // process start → first message stored
	steady     float64       // changes/s between 10% and 90% of n stored
	changesPer float64
	rssHWM     int64         // VmHWM bytes at n
	cpuAtN     time.Duration // capture's CPU when the stream held n
	natsCPU    time.Duration // nats-server's CPU during the run
	walsender  time.Duration // capture's walsender CPU, sampled
	machine    sysCPU        // the whole machine's CPU until n were stored
	others     time.Duration // machine CPU not used by capture, nats-server, the walsender or this test
	busiest    string        // the other processes that used most CPU
	stopDur    time.Duration // SIGTERM → exit
	streamMB   float64
	messages   uint64 // in the stream: changes travel in batches
}

func runCapture(ctx context.Context, t *testing.T, w *workload, captureBin, natsBin, slot string) captureResult {
	t.Helper()
	dir := t.TempDir()
	pg, n := w.pg, w.n
	var r captureResult

	ns, natsURL := startNATS(t, natsBin, dir)
	defer func() { // nats-server and its store go with the round
		ns.stop()
		os.RemoveAll(filepath.Join(dir, "js"))
	}()
	nc, err := nats.Connect(natsURL)
	if err != nil {
		t.Fatal(err)
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
  slot: %s
  publication: pgs2
  tables: [public.items]
nats:
  url: %s
  partitions: 64
  changes_stream: %s
`, benchSource, pg.DSN("app"), slot, natsURL, benchStream)
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}

	waitQuiet(t)
	natsCPU0 := proctest.CPU(ns.pid())
	ws := sampleWalsender(ctx, t, pg, slot)
	sys0, self0, pt0 := readSysCPU(), proctest.CPU(os.Getpid()), readProcTable()
	capLog := filepath.Join(dir, "capture.log")
	start := time.Now()
	cp := startProcess(t, captureBin, capLog, "--config", cfgPath, "--http-addr", fmt.Sprintf("127.0.0.1:%d", httpPort))

	var samples []sample
	var stream jetstream.Stream
	var stored *atomic.Uint64
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
			stored = countChanges(ctx, t, s)
		}
		now := time.Since(start)
		msgs := stored.Load()
		samples = append(samples, sample{now, msgs})
		if msgs > 0 && r.firstMsg == 0 {
			r.firstMsg = now
		}
		if msgs >= uint64(n) {
			r.dur = now
			info, err := stream.Info(ctx)
			if err != nil {
				t.Fatalf("stream info: %v", err)
			}
			r.streamMB = float64(info.State.Bytes) / (1 << 20)
			r.messages = info.State.Msgs
			break
		}
	}
	r.changesPer = float64(n) / r.dur.Seconds()
	r.rssHWM = procHWM(cp.pid())
	r.cpuAtN = proctest.CPU(cp.pid())
	r.natsCPU = proctest.CPU(ns.pid()) - natsCPU0
	r.machine = readSysCPU().sub(sys0)
	self, pt1 := proctest.CPU(os.Getpid())-self0, readProcTable()
	var wsPid int
	r.walsender, wsPid = ws()
	r.others = r.machine.busy - r.cpuAtN - r.natsCPU - r.walsender - self
	r.busiest = busiestOthers(pt0, pt1, os.Getpid(), cp.pid(), ns.pid(), wsPid)

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
	if got := stored.Load(); got != uint64(n) {
		t.Errorf("stream holds %d changes, want exactly %d", got, n)
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

	// The first and last changes are the first insert and the last update.
	checkMsg(ctx, t, stream, 1, change.Insert)
	checkMsg(ctx, t, stream, r.messages, change.Update)
	time.Sleep(200 * time.Millisecond)
	if got := stored.Load(); got != uint64(n) {
		t.Errorf("after shutdown the stream holds %d changes, want %d", got, n)
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

// checkMsg checks a message's first change (insert) or last (update).
func checkMsg(ctx context.Context, t *testing.T, s jetstream.Stream, seq uint64, want change.Action) {
	t.Helper()
	m, err := s.GetMsg(ctx, seq)
	if err != nil {
		t.Errorf("get message %d: %v", seq, err)
		return
	}
	r := bus.NewBatchReader(m.Data)
	var e, pick bus.Entry
	for i := 0; r.Next(&e); i++ {
		if i == 0 && want == change.Insert || want != change.Insert {
			pick = e
		}
	}
	if r.Err() != nil {
		t.Errorf("message %d: %v", seq, r.Err())
		return
	}
	var msg change.Message
	if err := json.Unmarshal(pick.Body, &msg); err != nil {
		t.Errorf("message %d: a change is not JSON: %v", seq, err)
		return
	}
	if msg.Action != want || msg.Metadata.TableName != "items" || msg.Record["doc"] == nil || string(pick.Action) != string(want) {
		t.Errorf("message %d: action %q table %q, want %q on items with a doc:\n%s", seq, msg.Action, msg.Metadata.TableName, want, pick.Body)
	}
	if string(pick.Key) != msg.Metadata.IdempotencyKey {
		t.Errorf("message %d: entry key %q != idempotency_key %q", seq, pick.Key, msg.Metadata.IdempotencyKey)
	}
	if want == change.Update && m.Header.Get(bus.HeaderID) != msg.Metadata.IdempotencyKey {
		t.Errorf("message %d: Pgs2-Msg-Id %q != its last change's idempotency_key %q", seq, m.Header.Get(bus.HeaderID), msg.Metadata.IdempotencyKey)
	}
}

// countChanges counts the changes stored in s as they arrive (the sum of
// the messages' Pgs2-Entries headers, read with a headers-only consumer).
func countChanges(ctx context.Context, t *testing.T, s jetstream.Stream) *atomic.Uint64 {
	t.Helper()
	var n atomic.Uint64
	cons, err := s.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{HeadersOnly: true})
	if err != nil {
		t.Fatalf("count changes: %v", err)
	}
	cc, err := cons.Consume(func(m jetstream.Msg) {
		k, _ := strconv.ParseUint(m.Headers().Get(bus.HeaderEntries), 10, 64)
		n.Add(k)
	})
	if err != nil {
		t.Fatalf("count changes: %v", err)
	}
	t.Cleanup(cc.Stop)
	return &n
}

// round is one run of each reader on the same backlog.
type round struct {
	captureFirst bool
	recv         recvResult
	capt         captureResult
}

func (r round) ratio() float64 { return r.capt.changesPer / r.recv.changesPer }

// disturbedCores is how much CPU other processes may use during a
// measurement (on average) before the round is left out of the medians;
// below disturbedMin in all it is noise (clock ticks, the kernel's share of
// loopback traffic).
const (
	disturbedCores = 0.10
	disturbedMin   = 200 * time.Millisecond
)

// disturbed reports whether other processes used noticeable CPU during
// either reader's run.
func (r round) disturbed() bool {
	bad := func(others, dur time.Duration) bool {
		return others > disturbedMin && cores(others, dur) > disturbedCores
	}
	return bad(r.recv.others, r.recv.dur) || bad(r.capt.others, r.capt.dur)
}

func report(t *testing.T, w *workload, version string, rs []round) {
	t.Helper()
	n := w.n
	var lines []string
	add := func(format string, a ...any) { lines = append(lines, fmt.Sprintf(format, a...)) }
	perChange := func(d time.Duration) float64 { return float64(d.Microseconds()) / float64(n) }
	mib := func(b int64) float64 { return float64(b) / (1 << 20) }
	// Medians over the rounds no other process disturbed (all rounds if
	// every one was disturbed).
	var quiet []round
	for _, r := range rs {
		if !r.disturbed() {
			quiet = append(quiet, r)
		}
	}
	if len(quiet) == 0 {
		quiet = rs
	}
	med := func(f func(r round) float64) float64 {
		xs := make([]float64, len(quiet))
		for i, r := range quiet {
			xs[i] = f(r)
		}
		return median(xs)
	}
	ratio := med(round.ratio)
	rss := med(func(r round) float64 { return mib(r.capt.rssHWM) })

	add("machine: %d CPUs (%s), %s, PostgreSQL %s, %s", runtime.NumCPU(), cpuModel(), memTotal(), w.pgVersion, runtime.Version())
	add("code: %s", version)
	add("workload: %d changes (%d inserts + %d updates) in %d-row transactions, %.1f MiB WAL; %d rounds",
		n, n/2, n/2, txRows, mib(w.walBytes), len(rs))
	add("")
	switch {
	case len(quiet) == len(rs):
		add("median of %d rounds:", len(rs))
	case len(quiet) < len(rs):
		add("median of the %d of %d rounds that other processes did not disturb (see *):", len(quiet), len(rs))
	}
	if len(quiet) == len(rs) && rs[0].disturbed() {
		add("WARNING: other processes used more than %.2f CPUs during every round; these numbers are not reliable", disturbedCores)
	}
	add("")
	add("| metric                                     | median   | target  |")
	add("|--------------------------------------------|----------|---------|")
	add("| pg_recvlogical changes/s                   | %8.0f |         |", med(func(r round) float64 { return r.recv.changesPer }))
	add("| capture changes/s (start → all stored)     | %8.0f |         |", med(func(r round) float64 { return r.capt.changesPer }))
	add("| capture / pg_recvlogical                   | %8.2f | >= 0.60 |", ratio)
	add("| capture changes/s, steady (10%% → 90%%)      | %8.0f |         |", med(func(r round) float64 { return r.capt.steady }))
	add("| capture start → first stored message, ms   | %8.0f |         |", med(func(r round) float64 { return float64(r.capt.firstMsg.Milliseconds()) }))
	add("| capture peak RSS (VmHWM), MiB              | %8.1f | < 200   |", rss)
	add("| capture CPU µs/change                      | %8.1f |         |", med(func(r round) float64 { return perChange(r.capt.cpuAtN) }))
	add("| nats-server CPU µs/change                  | %8.1f |         |", med(func(r round) float64 { return perChange(r.capt.natsCPU) }))
	add("| walsender CPU µs/change (capture's slot)   | %8.1f |         |", med(func(r round) float64 { return perChange(r.capt.walsender) }))
	add("| walsender CPU µs/change (pg_recvlogical's) | %8.1f |         |", med(func(r round) float64 { return perChange(r.recv.walsender) }))
	add("| pg_recvlogical CPU µs/change               | %8.1f |         |", med(func(r round) float64 { return perChange(r.recv.cpu) }))
	add("| capture SIGTERM → exit 0, ms               | %8.0f |         |", med(func(r round) float64 { return float64(r.capt.stopDur.Milliseconds()) }))
	add("| stream bytes/change                        | %8.0f |         |", med(func(r round) float64 { return r.capt.streamMB * (1 << 20) / float64(n) }))
	add("| changes per stream message                 | %8.1f |         |", med(func(r round) float64 { return float64(n) / float64(r.capt.messages) }))
	add("")
	add("each round (µs are CPU per change; busy = machine CPUs in use, other = of which not the measured processes;")
	add("* = other processes used more than %.2f CPUs, left out of the medians):", disturbedCores)
	add("")
	add("| round | first   | recvlogical/s | capture/s | ratio | steady/s | first msg ms | RSS MiB | capture µs | nats µs | walsender µs cap/recv | recvlogical µs | busy cap/recv | other cap/recv |")
	add("|-------|---------|---------------|-----------|-------|----------|--------------|---------|------------|---------|-----------------------|----------------|---------------|----------------|")
	for i, r := range rs {
		first := "recv"
		if r.captureFirst {
			first = "capture"
		}
		mark := " "
		if r.disturbed() {
			mark = "*"
		}
		add("| %4d%s | %-7s | %13.0f | %9.0f | %5.2f | %8.0f | %12d | %7.1f | %10.1f | %7.1f | %10.1f / %-10.1f | %14.1f | %5.2f / %-5.2f | %5.2f / %-6.2f |",
			i+1, mark, first, r.recv.changesPer, r.capt.changesPer, r.ratio(), r.capt.steady, r.capt.firstMsg.Milliseconds(), mib(r.capt.rssHWM),
			perChange(r.capt.cpuAtN), perChange(r.capt.natsCPU), perChange(r.capt.walsender), perChange(r.recv.walsender), perChange(r.recv.cpu),
			cores(r.capt.machine.busy, r.capt.dur), cores(r.recv.machine.busy, r.recv.dur), cores(r.capt.others, r.capt.dur), cores(r.recv.others, r.recv.dur))
	}
	add("")
	for i, r := range rs {
		add("round %d, other processes seen: during pg_recvlogical: %s; during capture: %s", i+1, r.recv.busiest, r.capt.busiest)
	}
	if ratio < 0.60 {
		add("TARGET MISSED: capture/pg_recvlogical = %.2f < 0.60 (median)", ratio)
	}
	if rss >= 200 {
		add("TARGET MISSED: capture peak RSS = %.1f MiB >= 200 (median)", rss)
	}

	for _, l := range lines {
		t.Log(l)
	}
	fmt.Println("\n=== capture benchmark ===")
	for _, l := range lines {
		fmt.Println(l)
	}
}

// median returns the median of xs.
func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// startNATS runs nats-server with JetStream as its own process, storing in
// dir, and waits until it accepts connections.
func startNATS(t *testing.T, bin, dir string, extra ...string) (*process, string) {
	t.Helper()
	port, err := pgtest.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(dir, "nats-server.log")
	args := append([]string{"-js", "-sd", filepath.Join(dir, "js"), "-p", strconv.Itoa(port), "-a", "127.0.0.1"}, extra...)
	p := startProcess(t, bin, logPath, args...)
	url := fmt.Sprintf("nats://127.0.0.1:%d", port)
	for deadline := time.Now().Add(30 * time.Second); ; {
		nc, err := nats.Connect(url)
		if err == nil {
			nc.Close()
			return p, url
		}
		if time.Now().After(deadline) {
			t.Fatalf("nats-server not reachable at %s: %v\n%s", url, err, tailFile(logPath))
		}
		time.Sleep(50 * time.Millisecond)
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

// stop SIGTERMs the process (if it still runs) and waits for it.
func (p *process) stop() {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(30 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

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
	t.Cleanup(p.stop)
	return p
}

// sampleWalsender follows the walsender serving slot (its active_pid) and
// samples its CPU every 50ms; the returned func stops sampling and returns
// the last sample. The walsender exits with its client, so the last sample
// can miss up to 50ms of its work.
func sampleWalsender(ctx context.Context, t *testing.T, pg *pgtest.Instance, slot string) func() (time.Duration, int) {
	t.Helper()
	conn, err := pgx.Connect(ctx, pg.DSN("app"))
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var mu sync.Mutex
	var last time.Duration
	var lastPid int
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
					mu.Lock()
					lastPid = pid
					mu.Unlock()
				}
				continue
			}
			if c := proctest.CPU(pid); c > 0 {
				mu.Lock()
				last = c
				mu.Unlock()
			}
		}
	}()
	return func() (time.Duration, int) {
		close(stop)
		wg.Wait()
		mu.Lock()
		defer mu.Unlock()
		return last, lastPid
	}
}

// sysCPU is the machine's CPU time from /proc/stat, summed over all CPUs.
type sysCPU struct{ busy, total time.Duration }

func readSysCPU() sysCPU {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return sysCPU{}
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	var c sysCPU
	// cpu user nice system idle iowait irq softirq steal ...
	for i := 1; i < len(f) && i <= 8; i++ {
		v, _ := strconv.ParseInt(f[i], 10, 64)
		d := time.Duration(v) * time.Second / clockTicks
		c.total += d
		if i != 4 && i != 5 {
			c.busy += d
		}
	}
	return c
}

func (c sysCPU) sub(o sysCPU) sysCPU { return sysCPU{c.busy - o.busy, c.total - o.total} }

// cores is the average number of busy CPUs over wall time d.
func cores(cpu, d time.Duration) float64 { return cpu.Seconds() / d.Seconds() }

// procTable is every process's CPU time, by pid.
type procTable map[int]procEntry

type procEntry struct {
	comm string
	cpu  time.Duration
}

func readProcTable() procTable {
	ents, _ := os.ReadDir("/proc")
	pt := procTable{}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		s := string(b)
		i, j := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
		if i < 0 || j < i {
			continue
		}
		pt[pid] = procEntry{comm: s[i+1 : j], cpu: proctest.CPU(pid)}
	}
	return pt
}

// busiestOthers names the processes, other than skip, that used the most CPU
// between two tables (processes that ended in between are not seen).
func busiestOthers(before, after procTable, skip ...int) string {
	type use struct {
		name string
		cpu  time.Duration
	}
	var uses []use
	for pid, a := range after {
		if slices.Contains(skip, pid) {
			continue
		}
		d := a.cpu - before[pid].cpu
		if d >= 50*time.Millisecond {
			uses = append(uses, use{fmt.Sprintf("%s[%d]", a.comm, pid), d})
		}
	}
	sort.Slice(uses, func(i, j int) bool { return uses[i].cpu > uses[j].cpu })
	var parts []string
	for i, u := range uses {
		if i == 4 {
			break
		}
		parts = append(parts, fmt.Sprintf("%s %.2fs", u.name, u.cpu.Seconds()))
	}
	if len(parts) == 0 {
		return "none seen"
	}
	return strings.Join(parts, ", ")
}

// waitQuiet waits (up to PGS2_BENCH_QUIET_WAIT, default 5m) until the
// machine is nearly idle for two seconds, so other work on a shared machine
// does not distort a measurement. It proceeds anyway after the wait; the
// report shows how much CPU other processes used during each run.
func waitQuiet(t *testing.T) {
	t.Helper()
	limit := 5 * time.Minute
	if v, err := time.ParseDuration(os.Getenv("PGS2_BENCH_QUIET_WAIT")); err == nil {
		limit = v
	}
	deadline := time.Now().Add(limit)
	for {
		a := readSysCPU()
		time.Sleep(2 * time.Second)
		d := readSysCPU().sub(a)
		busy := cores(d.busy, 2*time.Second)
		if busy < 0.15 {
			return
		}
		if time.Now().After(deadline) {
			t.Logf("WARNING: the machine is busy (%.2f of %d CPUs in use by other processes); measuring anyway", busy, runtime.NumCPU())
			return
		}
	}
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

// gitVersion describes the commit of the working tree and whether pkg/ or
// services/ differ from it.
func gitVersion(root string) string {
	out, err := exec.Command("git", "-C", root, "rev-parse", "--short", "HEAD").Output()
	if err != nil {
		return "unknown (not a git checkout)"
	}
	v := "commit " + strings.TrimSpace(string(out))
	st, err := exec.Command("git", "-C", root, "status", "--porcelain", "--", "pkg", "services", "go.mod", "go.sum").Output()
	if err != nil {
		return v
	}
	dirty := 0
	for _, l := range strings.Split(strings.TrimSpace(string(st)), "\n") {
		if l != "" && !strings.HasSuffix(l, "_test.go") {
			dirty++
		}
	}
	if dirty > 0 {
		v += fmt.Sprintf(" + uncommitted changes in %d non-test files under pkg/, services/", dirty)
	}
	return v
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
