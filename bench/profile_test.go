package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/pgs2/pgs2/pkg/capture"
	"github.com/pgs2/pgs2/pkg/config"
	"github.com/pgs2/pgs2/pkg/health"
	"github.com/pgs2/pgs2/pkg/pgtest"
	"github.com/pgs2/pgs2/pkg/service"
)

// TestBenchCaptureProfile runs capture's Main in this process on the
// benchmark's workload and writes CPU and allocation profiles to
// PGS2_BENCH_PROFILE (a directory). nats-server runs as its own process.
func TestBenchCaptureProfile(t *testing.T) {
	dir := os.Getenv("PGS2_BENCH_PROFILE")
	if os.Getenv("PGS2_BENCH") != "1" || dir == "" {
		t.Skip("profile: set PGS2_BENCH=1 and PGS2_BENCH_PROFILE=<dir>")
	}
	n := benchChanges(t)
	natsBin := filepath.Join(t.TempDir(), "nats-server")
	goBuild(t, repoRoot(t), natsBin, "github.com/nats-io/nats-server/v2")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	w := prepareWorkload(ctx, t, n, "pgs2")
	profPort, _ := pgtest.FreePort()
	_, natsURL := startNATS(t, natsBin, t.TempDir(), "--profile", strconv.Itoa(profPort))
	natsProf := make(chan error, 1)
	go func() { // nats-server's CPU profile over the first seconds of the run
		time.Sleep(time.Second)
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/debug/pprof/profile?seconds=6", profPort))
		if err != nil {
			natsProf <- err
			return
		}
		defer resp.Body.Close()
		f, err := os.Create(filepath.Join(dir, "nats.cpu.pprof"))
		if err != nil {
			natsProf <- err
			return
		}
		defer f.Close()
		_, err = io.Copy(f, resp.Body)
		natsProf <- err
	}()

	cfg, err := config.Parse(fmt.Appendf(nil, `source:
  name: %s
  dsn: %s
  tables: [public.items]
nats:
  url: %s
  partitions: 64
`, benchSource, w.pg.DSN("app"), natsURL))
	if err != nil {
		t.Fatal(err)
	}
	nc, err := nats.Connect(natsURL)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)

	cpuf, err := os.Create(filepath.Join(dir, "capture.cpu.pprof"))
	if err != nil {
		t.Fatal(err)
	}
	defer cpuf.Close()
	runtime.MemProfileRate = 64 << 10
	if err := pprof.StartCPUProfile(cpuf); err != nil {
		t.Fatal(err)
	}
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	start := time.Now()
	go func() {
		done <- capture.Main(runCtx, service.Env{Config: cfg, Health: health.NewState(), Metrics: prometheus.NewRegistry(),
			Log: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))})
	}()
	var stored *atomic.Uint64
	for {
		time.Sleep(50 * time.Millisecond)
		if stored == nil {
			s, err := js.Stream(ctx, benchStream)
			if errors.Is(err, jetstream.ErrStreamNotFound) {
				continue
			}
			if err != nil {
				t.Fatal(err)
			}
			stored = countChanges(ctx, t, s)
		}
		if stored.Load() >= uint64(n) {
			break
		}
	}
	dur := time.Since(start)
	pprof.StopCPUProfile()
	stop()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	memf, err := os.Create(filepath.Join(dir, "capture.allocs.pprof"))
	if err != nil {
		t.Fatal(err)
	}
	defer memf.Close()
	if err := pprof.Lookup("allocs").WriteTo(memf, 0); err != nil {
		t.Fatal(err)
	}
	if err := <-natsProf; err != nil {
		t.Errorf("nats-server profile: %v", err)
	}
	t.Logf("in-process capture: %d changes in %s (%.0f/s); profiles in %s", n, dur, float64(n)/dur.Seconds(), dir)
}
