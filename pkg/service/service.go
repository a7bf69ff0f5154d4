// Package service is the shared start-up of pgs2's binaries: flags, config,
// logging, signals, health endpoints and the JetStream connection.
package service

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"github.com/pgs2/pgs2/pkg/version"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"github.com/pgs2/pgs2/pkg/config"
	"github.com/pgs2/pgs2/pkg/health"
	"github.com/pgs2/pgs2/pkg/metrics"
	"github.com/pgs2/pgs2/pkg/restart"
)

// Env is what a service's run function gets.
type Env struct {
	Config *config.Config
	// ConfigPath is the file the config came from (for reloads).
	ConfigPath string
	Log        *slog.Logger
	Health     *health.State
	Metrics    *prometheus.Registry
	// Mux is the service's HTTP server (--http-addr): a service may add
	// its own endpoints before it starts serving them.
	Mux *http.ServeMux
	// HTTPAddr is --http-addr ("" = off).
	HTTPAddr string
}

// ErrUsage marks a run error that is the operator's to fix before a
// start (exit status 2, as a bad config).
var ErrUsage = errors.New("usage")

// AdminToken is the admin API's bearer token: PGS2_ADMIN_TOKEN, or the
// first line of the file PGS2_ADMIN_TOKEN_FILE names ("" = none).
func AdminToken() (string, error) { return config.Secret("PGS2_ADMIN_TOKEN") }

// AdminTokens are the tokens the admin API accepts, each with the operator
// it proves: PGS2_ADMIN_TOKENS_FILE holds one `NAME TOKEN` a line (blank
// lines and # comments aside), so the audit records who acted from the
// token they sent; PGS2_ADMIN_TOKEN (or _FILE), a shared token, proves no
// one (its callers name themselves). Errors name the line, never a token.
func AdminTokens() (map[string]string, error) {
	tokens := map[string]string{}
	shared, err := AdminToken()
	if err != nil {
		return nil, err
	}
	if shared != "" {
		tokens[shared] = ""
	}
	path := os.Getenv("PGS2_ADMIN_TOKENS_FILE")
	if path == "" {
		return tokens, nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("PGS2_ADMIN_TOKENS_FILE: %w", err)
	}
	names := map[string]bool{}
	for i, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		if len(f) != 2 || !validOperator(f[0]) || len(f[1]) < 16 {
			return nil, fmt.Errorf("PGS2_ADMIN_TOKENS_FILE %s line %d: want `NAME TOKEN` (a name of letters, digits and ._@-, a token of 16 or more characters)", path, i+1)
		}
		if _, dup := tokens[f[1]]; dup || names[f[0]] {
			return nil, fmt.Errorf("PGS2_ADMIN_TOKENS_FILE %s line %d: operator %s or its token is there twice: give each operator one token of their own", path, i+1, f[0])
		}
		tokens[f[1]], names[f[0]] = f[0], true
	}
	if len(names) == 0 {
		return nil, fmt.Errorf("PGS2_ADMIN_TOKENS_FILE %s names no operator: write one `NAME TOKEN` a line", path)
	}
	return tokens, nil
}

func validOperator(s string) bool {
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("._@-", r)) {
			return false
		}
	}
	return s != "" && len(s) <= 64
}

// Loopback reports whether addr (host:port) listens on loopback only.
func Loopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// Main parses flags, loads the config, serves health endpoints and calls
// run with a context that ends on SIGINT or SIGTERM. It returns the process
// exit code: 0 after a clean shutdown, 1 on a runtime error, 2 on bad
// configuration.
func Main(name, defaultHTTP string, args []string, stderr io.Writer, run func(ctx context.Context, env Env) error) int {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfgPath := fs.String("config", "", "config file (default $PGS2_CONFIG)")
	httpAddr := fs.String("http-addr", defaultHTTP, "address of /healthz and /readyz (empty = off)")
	level := fs.String("log-level", "info", "debug, info, warn or error")
	format := fs.String("log-format", "text", "text (logfmt) or json; both carry trace_id and span_id inside a traced operation")
	probe := fs.Bool("probe", false, "ask the running service at --http-addr whether it is ready (exit 0) or not (1), and exit")
	showVersion := fs.Bool("version", false, "print the version and exit")
	profile := fs.Bool("pprof", false, "serve Go's profiles at /debug/pprof/ on --http-addr (off by default: they show the process's internals to whoever reaches the address)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if *showVersion {
		fmt.Fprintln(os.Stdout, version.String(name))
		return 0
	}
	if *probe {
		return health.Probe(*httpAddr, stderr)
	}
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(*level)); err != nil {
		fmt.Fprintf(stderr, "%s: --log-level %q: use debug, info, warn or error\n", name, *level)
		return 2
	}
	logger, err := NewLogger(stderr, *format, lvl)
	if err != nil {
		fmt.Fprintf(stderr, "%s: %v\n", name, err)
		return 2
	}
	log := logger.With("service", name)
	slog.SetDefault(log)

	if *cfgPath == "" {
		*cfgPath = os.Getenv("PGS2_CONFIG")
	}
	cfg, err := config.Load(*cfgPath)
	if err != nil {
		fmt.Fprintf(stderr, "%s: %v\n", name, err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	state := health.NewState()
	reg := metrics.Registry()
	mux := http.NewServeMux()
	mux.Handle("/healthz", state.Handler())
	mux.Handle("/readyz", state.Handler())
	mux.Handle("GET /metrics", metrics.Handler(reg))
	if *profile {
		servePprof(mux)
	}
	g, gctx := errgroup.WithContext(ctx)
	runCtx, cancelRun := context.WithCancel(gctx)
	defer cancelRun()
	g.Go(func() error {
		defer cancelRun()
		return run(runCtx, Env{Config: cfg, ConfigPath: *cfgPath, Log: log, Health: state, Metrics: reg, Mux: mux, HTTPAddr: *httpAddr})
	})
	g.Go(func() error { return health.Serve(runCtx, *httpAddr, mux) })
	if err := g.Wait(); err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintf(stderr, "%s: %v\n", name, err)
		if errors.Is(err, ErrUsage) {
			return 2
		}
		return 1
	}
	log.Info("stopped cleanly")
	return 0
}

// NATSOptions are the authentication and TLS options of c.
func NATSOptions(c config.NATS) ([]nats.Option, error) {
	var opts []nats.Option
	switch {
	case c.User != "":
		opts = append(opts, nats.UserInfo(c.User, c.Password))
	case c.Token != "":
		opts = append(opts, nats.Token(c.Token))
	case c.CredentialsFile != "":
		opts = append(opts, nats.UserCredentials(c.CredentialsFile))
	case c.NKeyFile != "":
		o, err := nats.NkeyOptionFromSeed(c.NKeyFile)
		if err != nil {
			return nil, fmt.Errorf("nats.nkey_file %s: %w", c.NKeyFile, err)
		}
		opts = append(opts, o)
	}
	if t := c.TLS; t.Enabled() {
		tc := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: t.ServerName}
		if t.CAFile != "" {
			pem, err := os.ReadFile(t.CAFile)
			if err != nil {
				return nil, fmt.Errorf("nats.tls.ca_file: %w", err)
			}
			tc.RootCAs = x509.NewCertPool()
			if !tc.RootCAs.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("nats.tls.ca_file %s holds no PEM certificate", t.CAFile)
			}
		}
		if t.CertFile != "" {
			cert, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile)
			if err != nil {
				return nil, fmt.Errorf("nats.tls.cert_file and key_file: %w", err)
			}
			tc.Certificates = []tls.Certificate{cert}
		}
		opts = append(opts, nats.Secure(tc))
	}
	return opts, nil
}

// ConnectJetStream connects to NATS at url (a service's nats.url, or an
// embedded server's) with c's authentication and TLS. Publishing fails
// fast while disconnected (no reconnect buffer) so callers see every
// failure.
func ConnectJetStream(ctx context.Context, url string, c config.NATS, name string, log *slog.Logger, jsOpts ...jetstream.JetStreamOpt) (*nats.Conn, jetstream.JetStream, error) {
	opts, err := NATSOptions(c)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %v", ErrUsage, err)
	}
	nc, err := nats.Connect(url, append(opts,
		nats.Name(name),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(250*time.Millisecond),
		nats.ReconnectBufSize(-1),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				log.Warn("nats disconnected", "error", err)
			}
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) { log.Info("nats reconnected", "url", nc.ConnectedUrlRedacted()) }),
	)...)
	if err != nil {
		return nil, nil, fmt.Errorf("connect to nats.url %s: %w", RedactURLs(url), err)
	}
	js, err := jetstream.New(nc, jsOpts...)
	if err != nil {
		nc.Close()
		return nil, nil, fmt.Errorf("jetstream: %w", err)
	}
	return nc, js, nil
}

// RedactURLs hides passwords in a comma-separated list of URLs.
func RedactURLs(urls string) string {
	parts := strings.Split(urls, ",")
	for i, p := range parts {
		if u, err := url.Parse(strings.TrimSpace(p)); err == nil && u.User != nil {
			parts[i] = u.Redacted()
		} else if err != nil && strings.Contains(p, "@") {
			parts[i] = "(unparsable URL)"
		}
	}
	return strings.Join(parts, ",")
}

// OnReload calls reload with the config file read again on every SIGHUP,
// until ctx ends. A file that does not load, or a config reload refuses
// (Refuse: functions that do not compile, a table that does not exist),
// is logged and the running config stays. Any other failure (NATS or the
// database unavailable for a moment) is retried with back-off, with the
// file as it was at the SIGHUP (an edit made since waits for its own:
// reloads go router first, capture second), until it applies or the next
// SIGHUP: a SIGHUP during a NATS restart was refused for good, and the
// fix it carried (parked changes waiting for it) never applied.
func OnReload(ctx context.Context, env Env, reload func(*config.Config) error) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	go func() {
		defer signal.Stop(hup)
		var retry <-chan time.Time
		var backoff *restart.Backoff
		var c *config.Config
		for {
			select {
			case <-ctx.Done():
				return
			case <-hup:
				backoff = restart.NewBackoff(reloadRetries)
				var err error
				if c, err = config.Load(env.ConfigPath); err != nil {
					env.Log.Error("config reload refused; keeping the running config", "error", err)
					retry = nil
					continue
				}
			case <-retry:
			}
			retry = nil
			if err := reload(c); err != nil {
				var r *refusal
				if errors.As(err, &r) {
					env.Log.Error("config reload refused; keeping the running config", "error", err)
					continue
				}
				wait := backoff.Next(0)
				env.Log.Warn("config reload failed; retrying", "error", err, "retry_in", wait)
				retry = time.After(wait)
				continue
			}
			env.Log.Info("config reloaded", "sinks", len(c.Sinks))
		}
	}()
}

// reloadRetries is the back-off between attempts of a reload that failed.
var reloadRetries = restart.Policy{Min: 500 * time.Millisecond, Max: 30 * time.Second}

// Refuse marks err as a reload's refusal of the config (not retried).
func Refuse(err error) error {
	if err == nil {
		return nil
	}
	return &refusal{err}
}

type refusal struct{ err error }

func (r *refusal) Error() string { return r.err.Error() }
func (r *refusal) Unwrap() error { return r.err }

// servePprof adds Go's profiles (net/http/pprof) to mux.
func servePprof(mux *http.ServeMux) {
	mux.HandleFunc("GET /debug/pprof/", pprof.Index)
	mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
}
