package s2local

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"github.com/pgs2/pgs2/pkg/version"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/pgs2/pgs2/pkg/health"
)

// Main is the s2local command: it parses args, serves until SIGINT or
// SIGTERM, and returns the exit status (0 after a clean shutdown, 1 on a
// runtime error, 2 on bad flags), writing logs and errors to stderr.
func Main(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("s2local", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", "127.0.0.1:8089", "listen address host:port")
	dataDir := fs.String("data-dir", "", "data directory (empty: keep everything in memory)")
	token := fs.String("token", "", "the only access token accepted (default $S2LOCAL_TOKEN; empty: accept any)")
	fsync := fs.Bool("fsync", false, "fdatasync every append before acknowledging it (survives machine crashes, not only SIGKILL)")
	level := fs.String("log-level", "info", "debug, info, warn or error")
	latency := fs.Duration("fault-latency", 0, "fault injection: latency added to each matching request")
	jitter := fs.Duration("fault-jitter", 0, "fault injection: random extra latency, uniform in 0..jitter")
	rate := fs.Float64("fault-error-rate", 0, "fault injection: fraction (0..1) of matching requests that fail")
	statuses := fs.String("fault-statuses", "503", "fault injection: comma-separated statuses to fail with: 408, 429, 500, 502, 503, 504")
	retryAfter := fs.Duration("fault-retry-after", 200*time.Millisecond, "fault injection: retry-after-ms sent with 429")
	afterEffect := fs.String("fault-after-effect", "", "fault injection: true = errors follow the request's effect, false = precede it (default: only 504 follows)")
	appendsOnly := fs.Bool("fault-appends-only", false, "fault injection: only appends")
	basin := fs.String("fault-basin", "", "fault injection: only this basin")
	stream := fs.String("fault-stream", "", "fault injection: only this stream")
	seed := fs.Int64("fault-seed", -1, "fault injection: seed for a deterministic sequence (-1: random)")
	probe := fs.Bool("probe", false, "ask the running s2local at --addr whether it is ready (exit 0) or not (1), and exit")
	showVersion := fs.Bool("version", false, "print the version and exit")
	var basins []string
	fs.Func("create-basin", "create this basin at start if missing (repeatable)", func(v string) error {
		basins = append(basins, v)
		return nil
	})
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if *showVersion {
		fmt.Fprintln(os.Stdout, version.String("s2local"))
		return 0
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "s2local: unexpected arguments %q\n", fs.Args())
		return 2
	}
	if *probe {
		return health.Probe(*addr, stderr)
	}
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(*level)); err != nil {
		fmt.Fprintf(stderr, "s2local: --log-level %q: use debug, info, warn or error\n", *level)
		return 2
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: lvl})).With("service", "s2local")
	if *token == "" {
		*token = os.Getenv("S2LOCAL_TOKEN")
	}

	var faults FaultConfig
	if *latency > 0 || *jitter > 0 || *rate > 0 {
		rule := FaultRule{
			Basin: *basin, Stream: *stream, AppendsOnly: *appendsOnly,
			LatencyMS: float64(*latency) / float64(time.Millisecond), JitterMS: float64(*jitter) / float64(time.Millisecond),
			ErrorRate: *rate, RetryAfterMS: retryAfter.Milliseconds(),
		}
		if *rate > 0 {
			for _, s := range strings.Split(*statuses, ",") {
				n, err := strconv.Atoi(strings.TrimSpace(s))
				if err != nil {
					fmt.Fprintf(stderr, "s2local: --fault-statuses %q: not a list of statuses\n", *statuses)
					return 2
				}
				rule.Statuses = append(rule.Statuses, n)
			}
		}
		if *afterEffect != "" {
			b, err := strconv.ParseBool(*afterEffect)
			if err != nil {
				fmt.Fprintf(stderr, "s2local: --fault-after-effect %q: use true or false\n", *afterEffect)
				return 2
			}
			rule.AfterEffect = &b
		}
		faults.Rules = []FaultRule{rule}
	}
	if *seed >= 0 {
		u := uint64(*seed)
		faults.Seed = &u
	}
	if err := faults.Validate(); err != nil {
		fmt.Fprintf(stderr, "s2local: fault flags: %v\n", err)
		return 2
	}

	srv, err := New(Options{DataDir: *dataDir, Token: *token, Fsync: *fsync, Faults: faults, Logger: log, Basins: basins})
	if err != nil {
		fmt.Fprintf(stderr, "s2local: start with data directory %q: %v\n", *dataDir, err)
		return 1
	}
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		_ = srv.Close()
		fmt.Fprintf(stderr, "s2local: listen on %s: %v (choose another --addr)\n", *addr, err)
		return 1
	}
	mode := "memory"
	if *dataDir != "" {
		mode = "disk"
	}
	log.Info("listening", "addr", ln.Addr().String(), "storage", mode, "data_dir", *dataDir, "fsync", *fsync,
		"auth", *token != "", "fault_rules", len(faults.Rules))

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	serveErr := srv.Serve(ctx, ln)
	closeErr := srv.Close()
	if serveErr != nil {
		fmt.Fprintf(stderr, "s2local: %v\n", serveErr)
		return 1
	}
	if closeErr != nil {
		fmt.Fprintf(stderr, "s2local: close data directory: %v\n", closeErr)
		return 1
	}
	log.Info("stopped cleanly")
	return 0
}
