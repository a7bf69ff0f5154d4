// Package configcheck is `pgs2ctl config check`: it loads and validates a
// config file as the services do, compiles the sinks' functions, prints
// what the file configures and, with connect, checks the source database
// and NATS JetStream read-only, printing what capture, router and delivery
// would create there. It never creates, alters or drops anything.
package configcheck

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"

	"github.com/s2-streamstore/s2-sdk-go/s2"

	"github.com/pgs2/pgs2/pkg/capture"
	"github.com/pgs2/pgs2/pkg/config"
	"github.com/pgs2/pgs2/pkg/fn"
	"github.com/pgs2/pgs2/pkg/s2sink"
	"github.com/pgs2/pgs2/pkg/service"
)

// Problem is one thing that stops pgs2 from running as configured, with
// how to fix it.
type Problem struct {
	// What names what was checked: "config", "source", "table public.t",
	// "publication pgs2", "sink users", "nats", "stream PGS2_CHANGES".
	What    string
	Problem string
	Fix     string
}

func (p Problem) String() string {
	s := p.What + ": " + p.Problem
	if p.Fix != "" {
		s += "; fix: " + p.Fix
	}
	return s
}

// CheckError is a config check that found problems: every one of them,
// each with its fix.
type CheckError struct {
	Problems []Problem
}

func (e *CheckError) Error() string {
	if len(e.Problems) == 1 {
		return "config check: 1 problem: " + e.Problems[0].String()
	}
	lines := make([]string, len(e.Problems))
	for i, p := range e.Problems {
		lines[i] = fmt.Sprintf("  %d. %s", i+1, p)
	}
	return fmt.Sprintf("config check: %d problems:\n%s", len(e.Problems), strings.Join(lines, "\n"))
}

// Run checks the config file at path (PGS2_CONFIG when empty) and prints
// a summary to out; with connect it also checks the source database and
// NATS, read-only. It returns a *CheckError when any check fails (after
// printing every problem with its fix), another error only when out
// cannot be written. Secrets (passwords, tokens) are never printed.
func Run(ctx context.Context, path string, connect bool, out io.Writer) error {
	r := &report{}
	cfg := r.run(ctx, path, connect)
	// Every line goes out through the secret scrubber, as a last guard
	// behind the redaction of DSNs and URLs.
	sec := secretsOf(cfg)
	text := scrub(r.buf.String(), sec)
	if _, err := io.WriteString(out, text); err != nil {
		return fmt.Errorf("config check: write output: %w", err)
	}
	if len(r.problems) == 0 {
		return nil
	}
	ps := make([]Problem, len(r.problems))
	for i, p := range r.problems {
		ps[i] = Problem{What: scrub(p.What, sec), Problem: scrub(p.Problem, sec), Fix: scrub(p.Fix, sec)}
	}
	return &CheckError{Problems: ps}
}

// report collects the output and the problems found.
type report struct {
	buf      bytes.Buffer
	problems []Problem
	warnings []Problem
}

func (r *report) printf(format string, a ...any) { fmt.Fprintf(&r.buf, format, a...) }

func (r *report) problem(what, problem, fix string) {
	r.problems = append(r.problems, Problem{What: what, Problem: problem, Fix: fix})
}

func (r *report) warn(what, problem, fix string) {
	r.warnings = append(r.warnings, Problem{What: what, Problem: problem, Fix: fix})
}

// run does the checks; it returns the config when it loaded (for the
// secrets to scrub).
func (r *report) run(ctx context.Context, path string, connect bool) *config.Config {
	shown := path
	if shown == "" {
		shown = os.Getenv("PGS2_CONFIG")
	}
	cfg, err := config.Load(path)
	if err != nil {
		r.printf("config %s: does not load\n", shown)
		r.loadProblems(err, shown)
		r.finish()
		return nil
	}
	r.printf("config %s: valid\n", shown)
	r.summary(cfg)
	if connect {
		db := r.checkDatabase(ctx, cfg)
		r.checkNATS(ctx, cfg, db)
	} else {
		r.printf("\nnot connected: run with --connect to check the database and NATS (read-only)\n")
	}
	r.finish()
	return cfg
}

// loadProblems turns config.Load's error (every problem of Validate,
// joined) into problems.
func (r *report) loadProblems(err error, path string) {
	errs := []error{err}
	if inner := errors.Unwrap(err); inner != nil {
		if j, ok := inner.(interface{ Unwrap() []error }); ok {
			errs = j.Unwrap()
		}
	}
	for _, e := range errs {
		msg := e.Error()
		problem, fix, ok := strings.Cut(msg, "; ")
		if !ok || strings.Contains(problem, "\n") {
			problem, fix = msg, "edit "+path
		}
		r.problem("config", problem, fix)
	}
}

// finish prints the warnings, the problems and the verdict.
func (r *report) finish() {
	if len(r.warnings) > 0 {
		r.printf("\nwarnings (%d):\n", len(r.warnings))
		for i, w := range r.warnings {
			r.printList(i, w)
		}
	}
	if len(r.problems) == 0 {
		r.printf("\nOK: no problems found\n")
		return
	}
	r.printf("\nproblems (%d):\n", len(r.problems))
	for i, p := range r.problems {
		r.printList(i, p)
	}
	r.printf("\nFAILED: %d problem(s)\n", len(r.problems))
}

func (r *report) printList(i int, p Problem) {
	r.printf("  %d. %s: %s\n", i+1, p.What, indentRest(p.Problem, "     "))
	if p.Fix != "" {
		r.printf("     fix: %s\n", indentRest(p.Fix, "     "))
	}
}

func indentRest(s, prefix string) string {
	return strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n"+prefix)
}

// summary prints what the file configures and compiles the sinks'
// functions as router and delivery do.
func (r *report) summary(c *config.Config) {
	s := c.Source
	r.printf("\nsource %s\n", s.Name)
	dsn := RedactDSN(s.DSN)
	if s.Password != "" {
		dsn += "  (password from PGS2_SOURCE_PASSWORD)"
	}
	r.printf("  dsn:          %s\n", dsn)
	r.printf("  slot:         %s\n", s.Slot)
	r.printf("  publication:  %s\n", s.Publication)
	r.printf("  tables:       %s\n", strings.Join(s.Tables, ", "))
	b := s.Backfill
	limit := "no limit"
	if b.MaxRowsPerSecond > 0 {
		limit = fmt.Sprintf("%d rows/s", b.MaxRowsPerSecond)
	}
	r.printf("  backfill:     chunk_size %d, statement_timeout %s, %s\n", b.ChunkSize, b.StatementTimeout.D(), limit)
	if _, err := capture.FromConfig(c); err != nil {
		r.problem("source", err.Error(), "fix group_columns in the sinks")
	}

	n := c.NATS
	r.printf("\nnats\n")
	if n.Embedded {
		r.printf("  server:       embedded in capture (store_dir %s, sync_interval %s)", n.StoreDir, n.SyncInterval.D())
		if n.URL != "" {
			r.printf(", url %s", service.RedactURLs(n.URL))
		}
		r.printf("\n")
	} else {
		r.printf("  url:          %s\n", service.RedactURLs(n.URL))
	}
	r.printf("  auth:         %s\n", natsAuth(n))
	if n.TLS.Enabled() {
		var parts []string
		for _, kv := range [][2]string{{"ca_file", n.TLS.CAFile}, {"cert_file", n.TLS.CertFile}, {"key_file", n.TLS.KeyFile}, {"server_name", n.TLS.ServerName}} {
			if kv[1] != "" {
				parts = append(parts, kv[0]+" "+kv[1])
			}
		}
		r.printf("  tls:          %s\n", strings.Join(parts, ", "))
	} else {
		r.printf("  tls:          off\n")
	}
	maxAge := "until deleted"
	if n.ChangesMaxAge > 0 {
		maxAge = n.ChangesMaxAge.D().String()
	}
	r.printf("  streams:      changes %s, delivery %s (replicas %d, partitions %d, duplicate_window %s, max_age %s)\n",
		n.ChangesStream, n.DeliveryStream, n.Replicas, n.Partitions, n.DuplicateWindow.D(), maxAge)

	if len(c.Sinks) == 0 {
		r.printf("\nsinks: none (capture and router run, but nothing is delivered)\n")
		r.warn("sinks", "no sink is configured: changes are captured but delivered nowhere", "add a sink under sinks")
	}
	for _, sk := range c.Sinks {
		r.sinkSummary(c, sk)
	}
}

func natsAuth(n config.NATS) string {
	switch {
	case n.User != "":
		return "user " + n.User + " (password from PGS2_NATS_PASSWORD)"
	case n.Token != "":
		return "token (from PGS2_NATS_TOKEN)"
	case n.CredentialsFile != "":
		return "credentials file " + n.CredentialsFile
	case n.NKeyFile != "":
		return "nkey file " + n.NKeyFile
	}
	return "none"
}

func (r *report) sinkSummary(c *config.Config, sk config.Sink) {
	what := "sink " + sk.Name
	status := sk.Status
	if status == "" {
		status = "active"
	}
	r.printf("\nsink %s (source %s, status %s)\n", sk.Name, c.Source.Name, status)
	r.printf("  tables:       %s\n", strings.Join(sk.Tables, ", "))
	target := "basin " + orDash(sk.Basin) + ", stream " + orDash(sk.Stream)
	if sk.Routing != "" {
		target += " (the routing function may choose others)"
	}
	r.printf("  s2 target:    %s\n", target)
	endpoint := "S2 cloud (" + s2.DefaultBaseURL + ")"
	if sk.Endpoint != "" {
		endpoint = sk.Endpoint
	}
	token := "$" + sk.AccessTokenEnv + " is set"
	if os.Getenv(sk.AccessTokenEnv) == "" {
		token = "$" + sk.AccessTokenEnv + " is not set here"
	}
	r.printf("  s2 endpoint:  %s; access token: %s\n", endpoint, token)
	if sk.CreateStream {
		r.printf("  create_stream: delivery creates a missing S2 stream\n")
	}
	// Delivery builds its S2 client like this at start-up.
	if _, err := s2sink.New(s2sink.FromSink(sk)); err != nil {
		r.warn(what, fmt.Sprintf("delivery would refuse to start in this environment: %v", err),
			fmt.Sprintf("set %s in delivery's environment (or point the sink's endpoint at a local S2 server)", sk.AccessTokenEnv))
	}
	if len(sk.GroupColumns) > 0 {
		keys := make([]string, 0, len(sk.GroupColumns))
		for t := range sk.GroupColumns {
			keys = append(keys, t)
		}
		sort.Strings(keys)
		parts := make([]string, len(keys))
		for i, t := range keys {
			parts[i] = t + " (" + strings.Join(sk.GroupColumns[t], ", ") + ")"
		}
		r.printf("  group_columns: %s\n", strings.Join(parts, "; "))
	}
	if ib := sk.InitialBackfill; ib != nil && (ib.All || len(ib.Tables) > 0) {
		var tables []string
		if ib.All {
			tables = sk.Tables
		}
		for _, t := range ib.Tables {
			if t.Where != "" {
				tables = append(tables, t.Table+" WHERE "+t.Where)
			} else {
				tables = append(tables, t.Table)
			}
		}
		r.printf("  initial_backfill: job %s: %s\n", capture.InitialBackfillID(sk.Name), strings.Join(tables, ", "))
	}
	// Compiled as router and delivery compile them.
	_, err := fn.Compile(sk.Name, sk.Filter, sk.Transform, sk.Routing)
	failed := map[fn.Kind]*fn.CompileError{}
	for _, e := range flatten(err) {
		var ce *fn.CompileError
		if errors.As(e, &ce) {
			failed[ce.Kind] = ce
		} else if e != nil {
			r.problem(what, e.Error(), "fix the sink's functions")
		}
	}
	for _, f := range []struct {
		kind fn.Kind
		expr string
	}{{fn.Filter, sk.Filter}, {fn.Transform, sk.Transform}, {fn.Routing, sk.Routing}} {
		label := fmt.Sprintf("  %-13s ", string(f.kind)+":")
		switch ce := failed[f.kind]; {
		case strings.TrimSpace(f.expr) == "":
			r.printf("%snone\n", label)
		case ce != nil:
			r.printf("%sDOES NOT COMPILE: %s\n", label, oneLine(f.expr))
			r.problem(what, fmt.Sprintf("%s function does not compile: %s\n%s", f.kind, oneLine(f.expr), strings.TrimRight(ce.Issues, "\n")),
				fmt.Sprintf("correct the sink's %s expression (CEL over action, record, changes and metadata)", f.kind))
		default:
			r.printf("%scompiled: %s\n", label, oneLine(f.expr))
		}
	}
}

func flatten(err error) []error {
	if err == nil {
		return nil
	}
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		var out []error
		for _, e := range j.Unwrap() {
			out = append(out, flatten(e)...)
		}
		return out
	}
	return []error{err}
}

func oneLine(s string) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > 120 {
		s = s[:117] + "..."
	}
	return s
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
