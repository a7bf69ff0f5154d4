package devrun

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/s2-streamstore/s2-sdk-go/s2"

	"github.com/pgs2/pgs2/pkg/pgtest"
)

const createTable = `CREATE TABLE IF NOT EXISTS public.users (
	id         bigserial PRIMARY KEY,
	name       text NOT NULL,
	email      text,
	created_at timestamptz NOT NULL DEFAULT now()
)`

// SampleInsert is the statement the banner suggests.
const SampleInsert = `INSERT INTO public.users (name, email) VALUES ('alice', 'alice@example.com')`

// startPostgres starts the throwaway server (or checks $PGS2_SOURCE_DSN)
// and creates the sample database and table when missing.
func (r *run) startPostgres(ctx context.Context) error {
	if r.cfg.SourceDSN != "" {
		return r.useSourceDSN(ctx)
	}
	bin, err := pgtest.FindBinDir()
	if err != nil {
		if errors.Is(err, pgtest.ErrNoBinaries) {
			return fmt.Errorf("%w\n(or set PGS2_SOURCE_DSN to a database with wal_level=logical)", err)
		}
		return err
	}
	r.pgBinDir = bin
	logPath := filepath.Join(r.logs, "postgres.log")
	// initdb on a first run takes a while on a slow or busy machine.
	limit := max(r.cfg.Timeout, 2*time.Minute)
	sctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	pg, err := pgtest.Start(sctx, pgtest.Options{
		BinDir:  bin,
		DataDir: filepath.Join(r.dir, "pg", "data"),
		Port:    r.cfg.PGPort,
		LogFile: logPath,
		// Kept between runs: make it survive a machine crash too.
		Settings:       map[string]string{"fsync": "on", "full_page_writes": "on"},
		FixParentPerms: true,
	})
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil {
			return fmt.Errorf("postgres not ready after %s; the end of %s:\n%s", limit, pathForHumans(logPath), tailFile(logPath, 0, 40))
		}
		return fmt.Errorf("start postgres (log %s): %w", pathForHumans(logPath), err)
	}
	r.pg = pg
	var exists bool
	if err := queryRow(ctx, pg.DSN("postgres"), "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", []any{Database}, &exists); err != nil {
		return fmt.Errorf("postgres: %w", err)
	}
	if !exists {
		if err := pg.CreateDB(ctx, Database); err != nil {
			return fmt.Errorf("postgres: create database %s: %w", Database, err)
		}
	}
	if err := pg.Exec(ctx, Database, createTable); err != nil {
		return fmt.Errorf("postgres: create %s: %w", Table, err)
	}
	r.dsn = pg.DSN(Database)
	r.dsnFull = r.dsn
	r.log.Info("postgres ready", "dsn", r.dsn, "data", pathForHumans(pg.DataDir), "log", pathForHumans(logPath))
	return nil
}

// useSourceDSN checks an existing database and creates the sample table.
// The password stays out of the config file (PGS2_SOURCE_PASSWORD) and out
// of everything printed.
func (r *run) useSourceDSN(ctx context.Context) error {
	r.dsnFull = r.cfg.SourceDSN
	r.dsn = r.cfg.SourceDSN
	if u, err := url.Parse(r.cfg.SourceDSN); err == nil && u.User != nil && strings.Contains(r.cfg.SourceDSN, "://") {
		if pw, ok := u.User.Password(); ok {
			r.password = pw
			u.User = url.User(u.User.Username())
			r.dsn = u.String()
		}
	}
	var wal string
	if err := queryRow(ctx, r.dsnFull, "SHOW wal_level", nil, &wal); err != nil {
		return fmt.Errorf("PGS2_SOURCE_DSN: %w", err)
	}
	if wal != "logical" {
		return fmt.Errorf("PGS2_SOURCE_DSN: wal_level is %q; capture needs logical: run `ALTER SYSTEM SET wal_level = logical;` and restart that server", wal)
	}
	c, err := pgx.Connect(ctx, r.dsnFull)
	if err != nil {
		return fmt.Errorf("PGS2_SOURCE_DSN: %w", err)
	}
	defer c.Close(context.WithoutCancel(ctx))
	if _, err := c.Exec(ctx, createTable); err != nil {
		return fmt.Errorf("PGS2_SOURCE_DSN: create %s: %w", Table, err)
	}
	if bin, err := pgtest.FindBinDir(); err == nil {
		r.pgBinDir = bin
	}
	r.log.Info("using PGS2_SOURCE_DSN", "database", c.Config().Database, "host", c.Config().Host)
	return nil
}

func queryRow(ctx context.Context, dsn, sql string, args []any, dst any) error {
	c, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return err
	}
	defer c.Close(context.WithoutCancel(ctx))
	return c.QueryRow(ctx, sql, args...).Scan(dst)
}

// startNATS runs JetStream inside this process, its store and log in the
// run directory.
func (r *run) startNATS() error {
	if r.cfg.NATS.URL != "" {
		r.log.Info("using an external JetStream", "url", r.cfg.NATS.URL, "replicas", r.cfg.NATS.Replicas)
		return nil
	}
	opts := &server.Options{
		ServerName:   "pgs2-run",
		Host:         "127.0.0.1",
		Port:         r.cfg.NATSPort,
		JetStream:    true,
		StoreDir:     filepath.Join(r.dir, "nats"),
		SyncInterval: time.Second,
		MaxPayload:   8 << 20,
		NoSigs:       true,
		LogFile:      filepath.Join(r.logs, "nats.log"),
		Logtime:      true,
	}
	s, err := server.NewServer(opts)
	if err != nil {
		return fmt.Errorf("JetStream: %w", err)
	}
	s.ConfigureLogger()
	go s.Start()
	if !s.ReadyForConnections(r.cfg.Timeout) {
		s.Shutdown()
		return fmt.Errorf("JetStream not ready after %s on port %d; the end of %s:\n%s",
			r.cfg.Timeout, r.cfg.NATSPort, pathForHumans(opts.LogFile), tailFile(opts.LogFile, 0, 40))
	}
	r.nats = s
	r.log.Info("JetStream ready", "url", r.natsURL(), "store", pathForHumans(opts.StoreDir), "log", pathForHumans(opts.LogFile))
	return nil
}

func (r *run) natsURL() string {
	if r.cfg.NATS.URL != "" {
		return r.cfg.NATS.URL
	}
	return "nats://127.0.0.1:" + strconv.Itoa(r.cfg.NATSPort)
}

// natsYAML is the config's nats section: the URL, and for an external
// JetStream its replicas, authentication and TLS (files made absolute by
// parseFlags).
func (r *run) natsYAML() string {
	n := r.cfg.NATS
	var b strings.Builder
	fmt.Fprintf(&b, "nats:\n  url: %s\n", yamlQuote(r.natsURL()))
	if n.URL == "" {
		return b.String()
	}
	key := func(indent, k, v string) {
		if v != "" {
			fmt.Fprintf(&b, "%s%s: %s\n", indent, k, yamlQuote(v))
		}
	}
	fmt.Fprintf(&b, "  replicas: %d\n", n.Replicas)
	key("  ", "user", n.User)
	key("  ", "credentials_file", n.Creds)
	key("  ", "nkey_file", n.NKey)
	if n.CA != "" || n.Cert != "" || n.Key != "" || n.TLSServer != "" {
		b.WriteString("  tls:\n")
		key("    ", "ca_file", n.CA)
		key("    ", "cert_file", n.Cert)
		key("    ", "key_file", n.Key)
		key("    ", "server_name", n.TLSServer)
	}
	return b.String()
}

func (r *run) s2URL() string { return "http://127.0.0.1:" + strconv.Itoa(r.cfg.S2Port) }

// startS2 runs bin/s2local on disk and creates the sample basin and stream.
func (r *run) startS2(ctx context.Context) error {
	var env []string
	for _, kv := range os.Environ() {
		// Any token is accepted: a token in the user's environment must
		// not turn authentication on.
		if !strings.HasPrefix(kv, "S2LOCAL_TOKEN=") {
			env = append(env, kv)
		}
	}
	data := filepath.Join(r.dir, "s2")
	p, err := startProc("s2local", filepath.Join(r.cfg.BinDir, "s2local"),
		[]string{"--addr", "127.0.0.1:" + strconv.Itoa(r.cfg.S2Port), "--data-dir", data},
		filepath.Join(r.logs, "s2local.log"), env)
	if err != nil {
		return err
	}
	r.s2local = p
	if err := waitHTTP(ctx, p, r.s2URL()+"/health", r.cfg.Timeout); err != nil {
		return err
	}
	base := r.s2URL() + "/v1"
	c := s2.New("local", &s2.ClientOptions{BaseURL: base, MakeBasinBaseURL: func(string) string { return base },
		RequestTimeout: 10 * time.Second})
	if _, err := c.Basins.Create(ctx, s2.CreateBasinArgs{Basin: s2.BasinName(Basin)}); err != nil && !isConflict(err) {
		return fmt.Errorf("s2local: create basin %s: %w", Basin, err)
	}
	if _, err := c.Basin(Basin).Streams.Create(ctx, s2.CreateStreamArgs{Stream: s2.StreamName(Stream)}); err != nil && !isConflict(err) {
		return fmt.Errorf("s2local: create stream %s/%s: %w", Basin, Stream, err)
	}
	r.log.Info("s2local ready", "url", r.s2URL(), "data", pathForHumans(data), "log", pathForHumans(p.logPath))
	return nil
}

func isConflict(err error) bool {
	var se *s2.S2Error
	return errors.As(err, &se) && se.Status == http.StatusConflict
}

// writeConfig writes the services' config (at every start, so that ports
// given as flags apply).
func (r *run) writeConfig() (string, error) {
	path := filepath.Join(r.dir, "pgs2.yaml")
	natsSection := r.natsYAML()
	cfg := fmt.Sprintf(`# Written by pgs2 run (make run) at every start: edits are overwritten.
# Copy it elsewhere to experiment: bin/capture --config FILE, and so on.
source:
  name: %s
  dsn: %s
  slot: %s
  publication: %s
  tables: [%s]
%ssinks:
  - name: %s
    tables: [%s]
    basin: %s
    stream: %s
    endpoint: %s
    create_stream: true
    retry: {initial: 200ms, max: 10s}
`, SourceName, yamlQuote(r.dsn), slotName, pubName, Table, natsSection, SinkName, Table, Basin, Stream, r.s2URL())
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		return "", fmt.Errorf("write %s: %w", path, err)
	}
	return path, nil
}

// yamlQuote writes s as a double-quoted YAML scalar.
func yamlQuote(s string) string {
	return strconv.Quote(s)
}

// shellQuote quotes s for a POSIX shell (bash, zsh): bare when it is
// plain, else in single quotes, else (SQL with string literals) in double
// quotes when nothing in it is special there.
func shellQuote(s string) string {
	plain := func(c rune) bool {
		return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.ContainsRune("-_./:@=,+", c)
	}
	switch {
	case s != "" && strings.IndexFunc(s, func(c rune) bool { return !plain(c) }) < 0:
		return s
	case !strings.Contains(s, "'"):
		return "'" + s + "'"
	case !strings.ContainsAny(s, "\"$`\\!"):
		return `"` + s + `"`
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// psqlPath is the psql to print: the one on PATH, else the server's.
func (r *run) psqlPath() string {
	if _, err := exec.LookPath("psql"); err == nil {
		return "psql"
	}
	if r.pgBinDir != "" {
		if p := filepath.Join(r.pgBinDir, "psql"); fileExists(p) {
			return p
		}
	}
	return "psql"
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// printedCommands are the commands the banner prints.
type printedCommands struct {
	Insert string
	Tail   string
}

func (r *run) commands() printedCommands {
	dsnArg := shellQuote(r.dsn)
	if r.cfg.SourceDSN != "" && (r.password != "" || strings.Contains(strings.ToLower(r.cfg.SourceDSN), "password")) {
		// Never print a password: the user's shell has it.
		dsnArg = `"$PGS2_SOURCE_DSN"`
	}
	ctl := commandPath(filepath.Join(r.cfg.BinDir, "pgs2ctl"))
	return printedCommands{
		Insert: fmt.Sprintf("%s %s -c %s", shellQuote(r.psqlPath()), dsnArg, shellQuote(SampleInsert)),
		Tail:   fmt.Sprintf("%s tail %s/%s --endpoint %s", shellQuote(ctl), Basin, Stream, r.s2URL()),
	}
}

// checkPSQL warns when psql cannot connect with the DSN the banner prints.
func (r *run) checkPSQL(ctx context.Context) {
	psql := r.psqlPath()
	cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	cmd := exec.CommandContext(cctx, psql, "-X", "-q", "-A", "-t", "-c", "SELECT 1", r.dsn)
	if r.password != "" {
		// Not on the command line, where other users could read it.
		cmd.Env = append(os.Environ(), "PGPASSWORD="+r.password)
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		r.log.Warn("psql cannot connect with the printed DSN; the insert command below may not work",
			"psql", psql, "error", err, "output", strings.TrimSpace(string(out)))
	}
}

// banner prints what to do next.
func (r *run) banner(ctx context.Context, w io.Writer) error {
	r.checkPSQL(ctx)
	cmds := r.commands()
	logs := pathForHumans(r.logs)
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintf(w, `
pgs2 is running. In a second terminal:

  # insert a row into %s
  %s

  # watch the change arrive in S2 (Ctrl-C to stop watching; --json for JSON lines)
  %s

`, Table, cmds.Insert, cmds.Tail)
	if r.cfg.SourceDSN != "" {
		fmt.Fprintf(tw, "  postgres\t$PGS2_SOURCE_DSN\t(your server's log)\n")
	} else {
		fmt.Fprintf(tw, "  postgres\t%s\t%s\n", r.dsn, filepath.Join(logs, "postgres.log"))
	}
	if r.cfg.NATS.URL != "" {
		fmt.Fprintf(tw, "  jetstream\t%s\t(external)\n", r.natsURL())
	} else {
		fmt.Fprintf(tw, "  jetstream\t%s\t%s\n", r.natsURL(), filepath.Join(logs, "nats.log"))
	}
	fmt.Fprintf(tw, "  s2local\t%s\t%s\n", r.s2URL(), filepath.Join(logs, "s2local.log"))
	for _, p := range r.services {
		port := map[string]int{"capture": r.cfg.CapturePort, "router": r.cfg.RouterPort, "delivery": r.cfg.DeliveryPort}[p.name]
		fmt.Fprintf(tw, "  %s\thttp://127.0.0.1:%d/readyz\t%s\n", p.name, port, pathForHumans(p.logPath))
	}
	fmt.Fprintf(tw, "  config\t%s\t\n", pathForHumans(filepath.Join(r.dir, "pgs2.yaml")))
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("print banner: %w", err)
	}
	_, err := fmt.Fprintf(w, `
  failed messages: %s --admin 127.0.0.1:%d messages list
Ctrl-C stops everything (state stays in %s: make run resumes; make run-clean starts afresh).
`, shellQuote(commandPath(filepath.Join(r.cfg.BinDir, "pgs2ctl"))), r.cfg.DeliveryPort, logsParent(logs))
	if err != nil {
		return fmt.Errorf("print banner: %w", err)
	}
	return nil
}

func logsParent(logs string) string { return filepath.Dir(logs) + "/" }
