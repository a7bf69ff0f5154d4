package bench

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/s2-streamstore/s2-sdk-go/s2"

	"github.com/pgs2/pgs2/pkg/proctest"
)

// s2BenchTarget is the records/s target for appends through the SDK.
const s2BenchTarget = 200_000

// TestBenchS2Local measures bin/s2local's append path: bin/s2local runs as
// its own process on a data directory (disk mode, no fsync), and 4
// concurrent writers append 300-byte records to one stream through the
// official Go SDK (protobuf bodies), in batches of 100 and then of 1000,
// first with unary appends, then with the SDK's append sessions (s2s/proto
// over h2c, pipelined). Each run appends PGS2_BENCH_S2_RECORDS records
// (default 1 000 000) to a stream of its own and checks that the stream's
// tail equals the number of records appended. PGS2_BENCH_S2_ARGS adds
// s2local flags (e.g. "--fsync").
//
// It fails only when a result is wrong; a missed target is printed as
// "TARGET MISSED".
func TestBenchS2Local(t *testing.T) {
	if os.Getenv("PGS2_BENCH") != "1" {
		t.Skip("benchmark: set PGS2_BENCH=1 (make bench)")
	}
	total := 1_000_000
	if v := os.Getenv("PGS2_BENCH_S2_RECORDS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 4000 {
			t.Fatalf("PGS2_BENCH_S2_RECORDS=%q: use a number ≥ 4000", v)
		}
		total = n
	}
	bin := filepath.Join(t.TempDir(), "s2local")
	s2BenchBuild(t, bin)
	dataDir := t.TempDir()
	// PGS2_BENCH_S2_ARGS adds s2local flags, e.g. "--fsync".
	extra := strings.Fields(os.Getenv("PGS2_BENCH_S2_ARGS"))
	p := s2BenchStart(t, bin, append([]string{"--data-dir", dataDir}, extra...)...)
	defer p.stop(t)

	client := s2.New("bench", &s2.ClientOptions{
		BaseURL:          p.base + "/v1",
		MakeBasinBaseURL: func(string) string { return p.base + "/v1" },
		RetryConfig:      &s2.RetryConfig{MaxAttempts: 1},
		RequestTimeout:   30 * time.Second,
		HTTPClient: &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
			MaxIdleConnsPerHost: 16, IdleConnTimeout: 90 * time.Second,
		}},
	})
	ctx := context.Background()
	if _, err := client.Basins.Create(ctx, s2.CreateBasinArgs{Basin: "bench-basin"}); err != nil {
		t.Fatal(err)
	}
	basin := client.Basin("bench-basin")

	// Warm up: connections, page cache, both code paths.
	s2BenchRun(t, basin, "warmup", false, 100, 40_000, p.pid())
	s2BenchRun(t, basin, "warmup-session", true, 100, 40_000, p.pid())

	var results []s2BenchResult
	for _, session := range []bool{false, true} {
		for _, batch := range []int{100, 1000} {
			results = append(results, s2BenchRun(t, basin, fmt.Sprintf("bench-%v-%d", session, batch), session, batch, total, p.pid()))
		}
	}

	t.Logf("s2local append benchmark: %d records of 300 bytes per run, 4 writers, one stream, disk mode, flags %q, %s, %d CPUs",
		total, extra, runtime.Version(), runtime.NumCPU())
	t.Logf("%-24s %12s %9s %10s %10s %14s %14s", "mode", "records/s", "MiB/s", "p50", "p99", "server µs/rec", "client µs/rec")
	for _, r := range results {
		t.Logf("%-24s %12.0f %9.1f %10s %10s %14.2f %14.2f", r.name, r.recsPerSec, r.mibPerSec,
			r.p50.Round(10*time.Microsecond), r.p99.Round(10*time.Microsecond), r.serverUsPerRec, r.clientUsPerRec)
	}
	for _, r := range results {
		if r.recsPerSec < s2BenchTarget {
			t.Logf("TARGET MISSED: %s: %.0f records/s < %d", r.name, r.recsPerSec, s2BenchTarget)
		}
	}
}

type s2BenchResult struct {
	name                           string
	recsPerSec, mibPerSec          float64
	p50, p99                       time.Duration
	serverUsPerRec, clientUsPerRec float64
}

const (
	s2BenchWriters  = 4
	s2BenchBodySize = 300
)

// s2BenchRun appends total records in batches from 4 writers to a new
// stream and checks the stream's tail.
func s2BenchRun(t *testing.T, basin *s2.BasinClient, stream string, session bool, batch, total int, serverPID int) s2BenchResult {
	t.Helper()
	ctx := context.Background()
	if _, err := basin.Streams.Create(ctx, s2.CreateStreamArgs{Stream: s2.StreamName(stream)}); err != nil {
		t.Fatal(err)
	}
	sc := basin.Stream(s2.StreamName(stream))
	body := make([]byte, s2BenchBodySize)
	for i := range body {
		body[i] = 'a' + byte(i%26)
	}
	perWriter := total / s2BenchWriters / batch
	lat := make([][]time.Duration, s2BenchWriters)
	var appended [s2BenchWriters]int
	errs := make(chan error, s2BenchWriters)
	var wg sync.WaitGroup
	serverCPU0, clientCPU0 := proctest.CPU(serverPID), s2BenchSelfCPU()
	start := time.Now()
	for w := range s2BenchWriters {
		wg.Add(1)
		go func() {
			defer wg.Done()
			recs := make([]s2.AppendRecord, batch)
			for i := range recs {
				recs[i].Body = body
			}
			in := &s2.AppendInput{Records: recs}
			if !session {
				for range perWriter {
					t0 := time.Now()
					ack, err := sc.Append(ctx, in)
					if err != nil {
						errs <- err
						return
					}
					lat[w] = append(lat[w], time.Since(t0))
					appended[w] += int(ack.End.SeqNum - ack.Start.SeqNum)
				}
				return
			}
			as, err := sc.AppendSession(ctx, nil)
			if err != nil {
				errs <- err
				return
			}
			type pending struct {
				t0     time.Time
				ticket *s2.BatchSubmitTicket
			}
			acks := make(chan pending, 64)
			done := make(chan error, 1)
			go func() {
				var err error
				for p := range acks {
					if err != nil {
						continue
					}
					var ack *s2.AppendAck
					if ack, err = p.ticket.Ack(ctx); err == nil {
						lat[w] = append(lat[w], time.Since(p.t0))
						appended[w] += int(ack.End.SeqNum - ack.Start.SeqNum)
					}
				}
				done <- err
			}()
			for range perWriter {
				t0 := time.Now()
				f, err := as.Submit(in)
				var ticket *s2.BatchSubmitTicket
				if err == nil {
					ticket, err = f.Wait(ctx)
				}
				if err != nil {
					errs <- err
					break
				}
				acks <- pending{t0, ticket}
			}
			close(acks)
			if err := <-done; err != nil {
				errs <- err
			}
			if err := as.Close(); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	serverCPU, clientCPU := proctest.CPU(serverPID)-serverCPU0, s2BenchSelfCPU()-clientCPU0
	close(errs)
	for err := range errs {
		t.Fatalf("%s: %v", stream, err)
	}
	n := 0
	var all []time.Duration
	for w := range s2BenchWriters {
		n += appended[w]
		all = append(all, lat[w]...)
	}
	want := perWriter * batch * s2BenchWriters
	if n != want {
		t.Fatalf("%s: %d records acknowledged, want %d", stream, n, want)
	}
	tail, err := sc.CheckTail(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if tail.Tail.SeqNum != uint64(n) {
		t.Fatalf("%s: tail %d, appended %d", stream, tail.Tail.SeqNum, n)
	}
	slices.Sort(all)
	mode := "unary"
	if session {
		mode = "session"
	}
	return s2BenchResult{
		name:           fmt.Sprintf("%s, batch %d", mode, batch),
		recsPerSec:     float64(n) / elapsed.Seconds(),
		mibPerSec:      float64(n*s2BenchBodySize) / elapsed.Seconds() / (1 << 20),
		p50:            all[len(all)/2],
		p99:            all[len(all)*99/100],
		serverUsPerRec: float64(serverCPU.Microseconds()) / float64(n),
		clientUsPerRec: float64(clientCPU.Microseconds()) / float64(n),
	}
}

// --- s2local as a process ------------------------------------------------------

type s2BenchProc struct {
	cmd    *exec.Cmd
	base   string
	exited chan struct{}
	log    *os.File
}

func (p *s2BenchProc) pid() int { return p.cmd.Process.Pid }

func (p *s2BenchProc) stop(t *testing.T) {
	select {
	case <-p.exited:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
		if code := p.cmd.ProcessState.ExitCode(); code != 0 {
			t.Errorf("s2local exited with %d after SIGTERM (log %s)", code, p.log.Name())
		}
	case <-time.After(30 * time.Second):
		_ = p.cmd.Process.Kill()
		t.Errorf("s2local did not stop on SIGTERM")
	}
}

func s2BenchStart(t *testing.T, bin string, args ...string) *s2BenchProc {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	logf, err := os.Create(filepath.Join(t.TempDir(), "s2local.log"))
	if err != nil {
		t.Fatal(err)
	}
	p := &s2BenchProc{base: "http://" + addr, exited: make(chan struct{}), log: logf}
	p.cmd = exec.Command(bin, append([]string{"--addr", addr}, args...)...)
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		_ = p.cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-p.exited:
		default:
			_ = p.cmd.Process.Kill()
			<-p.exited
		}
	})
	for deadline := time.Now().Add(15 * time.Second); ; {
		if resp, err := http.Get(p.base + "/health"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return p
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("s2local not healthy after 15s (log %s)", logf.Name())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func s2BenchBuild(t *testing.T, out string) {
	t.Helper()
	goTool := "go"
	if _, err := exec.LookPath(goTool); err != nil {
		goTool = "/usr/local/go/bin/go"
	}
	root, err := exec.Command(goTool, "list", "-m", "-f", "{{.Dir}}").Output()
	if err != nil {
		t.Fatalf("go list -m: %v", err)
	}
	cmd := exec.Command(goTool, "build", "-trimpath", "-o", out, "./services/s2local")
	cmd.Dir = strings.TrimSpace(string(root))
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build s2local: %v\n%s", err, b)
	}
}

func s2BenchSelfCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
