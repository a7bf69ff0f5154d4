// Package devrun is `make run`: the whole pgs2 pipeline on one machine —
// a throwaway PostgreSQL (or $PGS2_SOURCE_DSN), JetStream embedded in this
// process, s2local, and bin/capture, bin/router and bin/delivery — with its
// state under one directory (.run by default), so that a second run resumes
// where the first stopped.
package devrun

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/pgs2/pgs2/pkg/pgtest"
)

// Config is what the runner starts and where.
type Config struct {
	// Dir holds every piece of state (pg, nats, s2, logs, pgs2.yaml).
	Dir string
	// BinDir holds capture, router, delivery, s2local and pgs2ctl.
	BinDir string
	// Clean removes Dir's contents first.
	Clean bool
	// SourceDSN is an existing database to capture instead of a throwaway
	// one ($PGS2_SOURCE_DSN). It may hold a password: it is never printed.
	SourceDSN string

	PGPort, NATSPort, S2Port              int
	CapturePort, RouterPort, DeliveryPort int
	// NATS is an external JetStream (a server or a cluster) instead of
	// the embedded one: its URL(s), the replicas of pgs2's streams and
	// buckets, and how to authenticate (the password and token come from
	// PGS2_NATS_PASSWORD and PGS2_NATS_TOKEN, as the services read them).
	NATS ExternalNATS
	// Timeout bounds each component's start-up.
	Timeout time.Duration
	// StopTimeout bounds each component's shutdown before it is killed.
	StopTimeout time.Duration
}

// ExternalNATS is a JetStream that make run uses instead of its own.
type ExternalNATS struct {
	URL                      string // empty: the embedded server
	Replicas                 int
	User, Creds, NKey        string
	CA, Cert, Key, TLSServer string
}

// Names of the sample's objects.
const (
	SourceName = "app"
	Database   = "app"
	Table      = "public.users"
	SinkName   = "users-to-s2"
	Basin      = "pgs2-local"
	Stream     = "users"
	slotName   = "pgs2_run"
	pubName    = "pgs2_run"
	markerFile = ".pgs2-run"
	lockFile   = ".lock"
	// PIDsFile lists the processes of the last start, "name pid" a line
	// (each leads its own process group).
	PIDsFile = "pids"
)

// Main parses args, runs until SIGINT or SIGTERM and returns the exit
// status: 0 after a clean stop, 1 when something failed, 2 on bad flags.
func Main(args []string, stdout, stderr io.Writer) int {
	cfg, err := parseFlags(args, stderr)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		fmt.Fprintf(stderr, "pgs2 run: %v\n", err)
		return 2
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelInfo})).With("service", "run")

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	force := make(chan struct{})
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigs)
	go func() {
		s := <-sigs
		log.Info("stopping everything in order (interrupt again to kill instead)", "signal", s.String())
		cancel()
		<-sigs
		close(force)
	}()

	if err := Run(ctx, cfg, stdout, log, force); err != nil {
		fmt.Fprintf(stderr, "pgs2 run: %v\n", err)
		return 1
	}
	return 0
}

func envName(flagName string) string {
	return "PGS2_RUN_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

func parseFlags(args []string, stderr io.Writer) (Config, error) {
	fs := flag.NewFlagSet("pgs2 run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: pgs2-run [flags]   (what `make run` runs)\n\n"+
			"Starts PostgreSQL (or uses $PGS2_SOURCE_DSN), JetStream, s2local, capture, router and delivery,\n"+
			"prints how to insert a row and watch it in S2, and stops everything on Ctrl-C.\n"+
			"Every flag also reads PGS2_RUN_<FLAG> (e.g. PGS2_RUN_NATS_PORT).\n\n")
		fs.PrintDefaults()
	}
	var c Config
	var bad []string
	str := func(p *string, name, def, usage string) {
		if v := os.Getenv(envName(name)); v != "" {
			def = v
		}
		fs.StringVar(p, name, def, usage)
	}
	num := func(p *int, name string, def int, usage string) {
		if v := os.Getenv(envName(name)); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil {
				bad = append(bad, fmt.Sprintf("$%s=%q is not a number", envName(name), v))
			} else {
				def = n
			}
		}
		fs.IntVar(p, name, def, usage)
	}
	str(&c.Dir, "dir", ".run", "directory for all state and logs")
	str(&c.BinDir, "bin", "bin", "directory of the built binaries (make build)")
	fs.BoolVar(&c.Clean, "clean", false, "remove the directory's contents first and start from scratch")
	num(&c.PGPort, "pg-port", 54329, "PostgreSQL port (unused with $PGS2_SOURCE_DSN)")
	num(&c.NATSPort, "nats-port", 4222, "JetStream (NATS) port")
	num(&c.S2Port, "s2-port", 8089, "s2local port")
	num(&c.CapturePort, "capture-port", 9101, "capture's --http-addr port")
	num(&c.RouterPort, "router-port", 9102, "router's --http-addr port")
	num(&c.DeliveryPort, "delivery-port", 9103, "delivery's --http-addr port (also its admin API)")
	str(&c.NATS.URL, "nats-url", "", "an external JetStream instead of the embedded one, e.g. a cluster: nats://a:4222,nats://b:4222,nats://c:4222")
	num(&c.NATS.Replicas, "nats-replicas", 1, "replicas of pgs2's streams and buckets on --nats-url (3 on a 3-node cluster)")
	str(&c.NATS.User, "nats-user", "", "NATS user on --nats-url (the password in $PGS2_NATS_PASSWORD; a token goes in $PGS2_NATS_TOKEN)")
	str(&c.NATS.Creds, "nats-creds", "", "NATS .creds file (JWT and NKey seed) for --nats-url")
	str(&c.NATS.NKey, "nats-nkey", "", "NATS NKey seed file for --nats-url")
	str(&c.NATS.CA, "nats-ca", "", "CA file that signs --nats-url's TLS certificate")
	str(&c.NATS.Cert, "nats-cert", "", "client certificate for --nats-url (with --nats-key)")
	str(&c.NATS.Key, "nats-key", "", "client certificate's key for --nats-url")
	str(&c.NATS.TLSServer, "nats-tls-server-name", "", "name to verify in --nats-url's certificate")
	fs.DurationVar(&c.Timeout, "timeout", 60*time.Second, "how long each component may take to become ready (PostgreSQL: at least 2m, for initdb)")
	fs.DurationVar(&c.StopTimeout, "stop-timeout", 30*time.Second, "how long each component may take to stop before it is killed")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		bad = append(bad, fmt.Sprintf("unexpected arguments %q", fs.Args()))
	}
	for _, p := range []struct {
		name string
		v    int
	}{{"pg-port", c.PGPort}, {"nats-port", c.NATSPort}, {"s2-port", c.S2Port},
		{"capture-port", c.CapturePort}, {"router-port", c.RouterPort}, {"delivery-port", c.DeliveryPort}} {
		if p.v < 1 || p.v > 65535 {
			bad = append(bad, fmt.Sprintf("--%s %d is not a TCP port", p.name, p.v))
		}
	}
	if c.NATS.URL == "" && (c.NATS.User != "" || c.NATS.Creds != "" || c.NATS.NKey != "" || c.NATS.CA != "" || c.NATS.Cert != "" ||
		c.NATS.Key != "" || c.NATS.TLSServer != "" || c.NATS.Replicas != 1) {
		bad = append(bad, "--nats-user, --nats-creds, --nats-nkey, --nats-ca, --nats-cert, --nats-key, --nats-tls-server-name and --nats-replicas are for an external JetStream: give --nats-url too")
	}
	for _, f := range []*string{&c.NATS.Creds, &c.NATS.NKey, &c.NATS.CA, &c.NATS.Cert, &c.NATS.Key} {
		if *f == "" {
			continue
		}
		abs, err := filepath.Abs(*f)
		if err != nil {
			bad = append(bad, fmt.Sprintf("%s: %v", *f, err))
		}
		*f = abs
	}
	if c.NATS.Replicas < 1 || c.NATS.Replicas > 5 {
		bad = append(bad, fmt.Sprintf("--nats-replicas %d: use 1 to 5", c.NATS.Replicas))
	}
	if c.Timeout <= 0 || c.StopTimeout <= 0 {
		bad = append(bad, "--timeout and --stop-timeout must be positive")
	}
	if len(bad) > 0 {
		return c, errors.New(strings.Join(bad, "; "))
	}
	c.SourceDSN = os.Getenv("PGS2_SOURCE_DSN")
	return c, nil
}

// run is one start of the pipeline: what it started, in start order.
type run struct {
	cfg   Config
	log   *slog.Logger
	dir   string // absolute
	logs  string
	force <-chan struct{}

	pg       *pgtest.Instance
	pgBinDir string
	nats     *server.Server
	s2local  *proc
	services []*proc // capture, router, delivery as started

	dsn      string // what the services use (no password)
	dsnFull  string // with the password, for this process only
	password string
}

// Run starts everything, prints the banner to stdout, and stops everything
// in order when ctx ends (or when a component fails). force, when closed,
// turns the orderly stop into killing.
func Run(ctx context.Context, cfg Config, stdout io.Writer, log *slog.Logger, force <-chan struct{}) (err error) {
	dir, err := filepath.Abs(cfg.Dir)
	if err != nil {
		return fmt.Errorf("--dir %s: %w", cfg.Dir, err)
	}
	r := &run{cfg: cfg, log: log, dir: dir, logs: filepath.Join(dir, "logs"), force: force}
	if err := r.checkBinaries(); err != nil {
		return err
	}
	unlock, err := r.prepareDir()
	if err != nil {
		return err
	}
	defer unlock()

	defer func() {
		if serr := r.stopAll(); serr != nil {
			if err == nil {
				err = serr
			} else {
				err = fmt.Errorf("%w\nand while stopping: %v", err, serr)
			}
		}
	}()
	if err := r.startAll(ctx); err != nil {
		if ctx.Err() != nil {
			log.Info("interrupted during start-up")
			return nil
		}
		return err
	}
	if err := r.banner(ctx, stdout); err != nil {
		return err
	}
	// Run until interrupted or until a component ends by itself.
	died := make(chan *proc, 4)
	for _, p := range append([]*proc{r.s2local}, r.services...) {
		go func() {
			<-p.done
			died <- p
		}()
	}
	select {
	case <-ctx.Done():
		return nil
	case p := <-died:
		return fmt.Errorf("%s exited unexpectedly (%v); stopping the rest. The end of %s:\n%s",
			p.name, p.err, pathForHumans(p.logPath), p.logTail())
	}
}

func (r *run) checkBinaries() error {
	var missing []string
	for _, b := range []string{"capture", "router", "delivery", "s2local", "pgs2ctl"} {
		if fi, err := os.Stat(filepath.Join(r.cfg.BinDir, b)); err != nil || fi.IsDir() {
			missing = append(missing, filepath.Join(r.cfg.BinDir, b))
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("missing %s: run `make build` first (or point --bin at the binaries)", strings.Join(missing, ", "))
	}
	return nil
}

// prepareDir creates (or with --clean empties) the run directory and locks
// it against a second runner.
func (r *run) prepareDir() (unlock func(), err error) {
	if err := os.MkdirAll(r.dir, 0o755); err != nil {
		return nil, fmt.Errorf("create %s: %w", r.dir, err)
	}
	marker := filepath.Join(r.dir, markerFile)
	entries, err := os.ReadDir(r.dir)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", r.dir, err)
	}
	if _, err := os.Stat(marker); err != nil && len(entries) > 0 {
		return nil, fmt.Errorf("%s is not empty and was not made by pgs2 run (no %s file): choose another --dir", r.dir, markerFile)
	}
	if err := os.WriteFile(marker, []byte("made by pgs2 run (make run); `make run-clean` empties this directory\n"), 0o644); err != nil {
		return nil, fmt.Errorf("write %s: %w", marker, err)
	}
	lf, err := os.OpenFile(filepath.Join(r.dir, lockFile), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open lock file: %w", err)
	}
	if err := syscall.Flock(int(lf.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		lf.Close()
		return nil, fmt.Errorf("another pgs2 run is using %s: stop it first (Ctrl-C in its terminal)", pathForHumans(r.dir))
	}
	unlock = func() { _ = syscall.Flock(int(lf.Fd()), syscall.LOCK_UN); lf.Close() }
	if r.cfg.Clean {
		for _, e := range entries {
			if e.Name() == lockFile || e.Name() == markerFile {
				continue
			}
			if err := os.RemoveAll(filepath.Join(r.dir, e.Name())); err != nil {
				unlock()
				return nil, fmt.Errorf("--clean: %w", err)
			}
		}
		r.log.Info("removed the previous run's state", "dir", pathForHumans(r.dir))
	}
	// Readable by others: the postgres OS user must pass through it.
	if err := os.Chmod(r.dir, 0o755); err != nil {
		unlock()
		return nil, fmt.Errorf("chmod %s: %w", r.dir, err)
	}
	if err := os.MkdirAll(r.logs, 0o755); err != nil {
		unlock()
		return nil, fmt.Errorf("create %s: %w", r.logs, err)
	}
	return unlock, nil
}

func (r *run) ports() []namedPort {
	ps := []namedPort{
		{r.cfg.S2Port, "s2local", "s2-port"},
		{r.cfg.CapturePort, "capture's health endpoints", "capture-port"},
		{r.cfg.RouterPort, "router's health endpoints", "router-port"},
		{r.cfg.DeliveryPort, "delivery's health endpoints and admin API", "delivery-port"},
	}
	if r.cfg.NATS.URL == "" {
		ps = append([]namedPort{{r.cfg.NATSPort, "JetStream", "nats-port"}}, ps...)
	}
	if r.cfg.SourceDSN == "" {
		ps = append([]namedPort{{r.cfg.PGPort, "PostgreSQL", "pg-port"}}, ps...)
	}
	return ps
}

// startAll starts every component in order and waits until each is ready.
func (r *run) startAll(ctx context.Context) error {
	defer r.writePIDs()
	ps := r.ports()
	seen := map[int]string{}
	for _, p := range ps {
		if other, ok := seen[p.port]; ok {
			return fmt.Errorf("--%s and --%s are both %d: give each its own port", other, p.flag, p.port)
		}
		seen[p.port] = p.flag
	}
	if err := checkPorts(ps); err != nil {
		return err
	}
	if err := r.startPostgres(ctx); err != nil {
		return err
	}
	if err := r.startNATS(); err != nil {
		return err
	}
	if err := r.startS2(ctx); err != nil {
		return err
	}
	cfgPath, err := r.writeConfig()
	if err != nil {
		return err
	}
	for _, s := range []struct {
		name string
		port int
	}{{"capture", r.cfg.CapturePort}, {"router", r.cfg.RouterPort}, {"delivery", r.cfg.DeliveryPort}} {
		addr := "127.0.0.1:" + strconv.Itoa(s.port)
		env := os.Environ()
		if r.password != "" {
			env = append(env, "PGS2_SOURCE_PASSWORD="+r.password)
		}
		p, err := startProc(s.name, filepath.Join(r.cfg.BinDir, s.name),
			[]string{"--config", cfgPath, "--http-addr", addr}, filepath.Join(r.logs, s.name+".log"), env)
		if err != nil {
			return err
		}
		r.services = append(r.services, p)
		if err := waitHTTP(ctx, p, "http://"+addr+"/readyz", r.cfg.Timeout); err != nil {
			return err
		}
		r.log.Info(s.name+" ready", "http", addr, "log", pathForHumans(p.logPath))
	}
	return nil
}

// stopAll stops what was started, in order: capture, router, delivery
// (each drains and records its progress), then s2local, JetStream and
// PostgreSQL.
func (r *run) stopAll() error {
	if r.pg == nil && r.nats == nil && r.s2local == nil {
		return nil
	}
	var errs []error
	for _, p := range r.services {
		if err := p.stop(r.cfg.StopTimeout, r.force); err != nil {
			errs = append(errs, err)
		} else {
			r.log.Info(p.name + " stopped")
		}
	}
	if r.s2local != nil {
		if err := r.s2local.stop(r.cfg.StopTimeout, r.force); err != nil {
			errs = append(errs, err)
		} else {
			r.log.Info("s2local stopped")
		}
	}
	if r.nats != nil {
		r.nats.Shutdown()
		r.nats.WaitForShutdown()
		r.log.Info("JetStream stopped")
	}
	if r.pg != nil {
		if err := r.pg.Stop(); err != nil {
			errs = append(errs, fmt.Errorf("postgres: %w", err))
		} else {
			r.log.Info("postgres stopped")
		}
	}
	if len(errs) == 0 {
		r.log.Info("everything stopped cleanly", "dir", pathForHumans(r.dir))
	}
	return errors.Join(errs...)
}

// writePIDs records the processes of this start (for tests and for
// finding strays by hand).
func (r *run) writePIDs() {
	var b strings.Builder
	if r.pg != nil {
		if pid := r.postmasterPID(); pid > 0 {
			fmt.Fprintf(&b, "postgres %d\n", pid)
		}
	}
	if r.s2local != nil {
		fmt.Fprintf(&b, "%s %d\n", r.s2local.name, r.s2local.pid())
	}
	for _, p := range r.services {
		fmt.Fprintf(&b, "%s %d\n", p.name, p.pid())
	}
	if b.Len() == 0 {
		return
	}
	if err := os.WriteFile(filepath.Join(r.dir, PIDsFile), []byte(b.String()), 0o644); err != nil {
		r.log.Warn("cannot write the pids file", "error", err)
	}
}

func (r *run) postmasterPID() int {
	b, err := os.ReadFile(filepath.Join(r.pg.DataDir, "postmaster.pid"))
	if err != nil {
		return 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	pid, _ := strconv.Atoi(strings.TrimSpace(line))
	return pid
}
