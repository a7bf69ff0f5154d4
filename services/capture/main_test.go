package main

// These tests build the capture binary and run it as users would: with a
// config file, against a real PostgreSQL and a real JetStream. Every bad input
// must end the process with a non-zero status and a message that names the
// problem and its fix, never with a panic.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pgs2/pgs2/pkg/natstest"
	"github.com/pgs2/pgs2/pkg/pgtest"
	"github.com/pgs2/pgs2/pkg/proctest"
)

// captureBin is the binary built by TestMain.
var captureBin string

func TestMain(m *testing.M) {
	os.Exit(buildAndRun(m))
}

func buildAndRun(m *testing.M) int {
	dir, err := os.MkdirTemp("", "pgs2-capture-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	goBin, err := exec.LookPath("go") // go test puts $GOROOT/bin first in PATH
	if err != nil {
		fmt.Fprintf(os.Stderr, "go tool not found: %v\n", err)
		return 1
	}
	captureBin = filepath.Join(dir, "capture")
	build := exec.Command(goBin, "build", "-o", captureBin, ".")
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "go build capture: %v\n%s", err, out)
		return 1
	}
	return m.Run()
}

// runTimeout bounds every run of the binary.
const runTimeout = 30 * time.Second

type result struct {
	code   int
	stderr string
	took   time.Duration
}

// env is the process environment without variables that would change the
// binary's behaviour behind a test's back.
func env(extra ...string) []string {
	var out []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "PGS2_") || strings.HasPrefix(kv, "PG") {
			continue
		}
		out = append(out, kv)
	}
	return append(out, extra...)
}

// run runs the binary to its end (at most runTimeout).
func run(t *testing.T, environ []string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), runTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, captureBin, args...)
	cmd.Env = environ
	cmd.WaitDelay = 5 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err := cmd.Run()
	r := result{stderr: stderr.String(), took: time.Since(start)}
	if ctx.Err() != nil {
		t.Fatalf("capture %v did not exit within %s; stderr:\n%s", args, runTimeout, r.stderr)
	}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
	default:
		t.Fatalf("run capture: %v", err)
	}
	t.Logf("capture %v: exit %d after %s; stderr:\n%s", args, r.code, r.took.Round(time.Millisecond), r.stderr)
	return r
}

// writeConfig writes a config file and returns its path.
func writeConfig(t *testing.T, yaml string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "cdc.yaml")
	if err := os.WriteFile(p, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// configYAML is a valid config for the given source and JetStream.
func configYAML(dsn, natsURL string, tables ...string) string {
	return fmt.Sprintf(`source:
  name: app
  dsn: %q
  slot: pgs2
  publication: pgs2
  tables: [%s]
nats:
  url: %s
  partitions: 4
  duplicate_window: 2m
`, dsn, strings.Join(tables, ", "), natsURL)
}

// refused checks a failed run: non-zero status (want, unless 0), no panic,
// and every wanted substring in stderr.
func refused(t *testing.T, r result, wantCode int, want ...string) {
	t.Helper()
	if r.code == 0 {
		t.Errorf("exit status 0; want non-zero")
	} else if wantCode != 0 && r.code != wantCode {
		t.Errorf("exit status %d; want %d", r.code, wantCode)
	}
	for _, p := range []string{"panic:", "goroutine "} {
		if strings.Contains(r.stderr, p) {
			t.Errorf("stderr contains %q (a panic?):\n%s", p, r.stderr)
		}
	}
	for _, w := range want {
		if !strings.Contains(r.stderr, w) {
			t.Errorf("stderr does not contain %q:\n%s", w, r.stderr)
		}
	}
}

func freePort(t *testing.T) int {
	t.Helper()
	p, err := pgtest.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// noHTTP turns the health endpoints off, so parallel runs do not fight over
// the default port.
const noHTTP = "--http-addr="

func TestBadConfigFile(t *testing.T) {
	t.Parallel()

	t.Run("malformed YAML", func(t *testing.T) {
		t.Parallel()
		p := writeConfig(t, "source:\n  name: app\n   dsn: [unclosed\nnats: {url: nats://127.0.0.1:1}\n")
		r := run(t, env(), "--config", p, noHTTP)
		refused(t, r, 2, p, "malformed YAML", "line 3")
	})

	t.Run("unknown key", func(t *testing.T) {
		t.Parallel()
		p := writeConfig(t, "source: {nmae: x}\n")
		r := run(t, env(), "--config", p, noHTTP)
		refused(t, r, 2, p, "nmae")
	})

	t.Run("invalid values", func(t *testing.T) {
		t.Parallel()
		p := writeConfig(t, `source: {name: app, dsn: "postgres://u:hunter2secret@127.0.0.1:1/app", slot: My-Slot, tables: [users]}
nats: {url: nats://127.0.0.1:1, partitions: 99999}
`)
		r := run(t, env(), "--config", p, noHTTP)
		refused(t, r, 2, p, `source.slot: "My-Slot" is not a valid replication slot name: use 1-63 of [a-z0-9_]`,
			"nats.partitions")
		if strings.Contains(r.stderr, "hunter2secret") {
			t.Errorf("stderr leaks the DSN password")
		}
	})

	t.Run("missing file", func(t *testing.T) {
		t.Parallel()
		p := filepath.Join(t.TempDir(), "nope.yaml")
		r := run(t, env(), "--config", p, noHTTP)
		refused(t, r, 2, p, "no such file")
	})

	t.Run("missing file via PGS2_CONFIG", func(t *testing.T) {
		t.Parallel()
		p := filepath.Join(t.TempDir(), "nope.yaml")
		r := run(t, env("PGS2_CONFIG="+p), noHTTP)
		refused(t, r, 2, p, "no such file")
	})

	t.Run("no config at all", func(t *testing.T) {
		t.Parallel()
		r := run(t, env(), noHTTP)
		refused(t, r, 2, "--config", "PGS2_CONFIG")
	})

	t.Run("config is a directory", func(t *testing.T) {
		t.Parallel()
		p := t.TempDir()
		r := run(t, env(), "--config", p, noHTTP)
		refused(t, r, 2, p)
	})

	t.Run("bad log level", func(t *testing.T) {
		t.Parallel()
		r := run(t, env(), "--config", "/nonexistent.yaml", "--log-level", "loud", noHTTP)
		refused(t, r, 2, "--log-level", "loud")
	})

	t.Run("unknown flag", func(t *testing.T) {
		t.Parallel()
		r := run(t, env(), "--confg", "x.yaml")
		refused(t, r, 2, "confg")
	})
}

func TestNothingListening(t *testing.T) {
	t.Parallel()
	ns := natstest.New(t)

	t.Run("postgres port", func(t *testing.T) {
		t.Parallel()
		port := freePort(t)
		p := writeConfig(t, configYAML(fmt.Sprintf("postgres://postgres@127.0.0.1:%d/app?sslmode=disable", port), ns.URL(), "public.users"))
		r := run(t, env(), "--config", p, noHTTP)
		refused(t, r, 0, "connect to source", fmt.Sprintf("127.0.0.1:%d", port))
	})

	t.Run("postgres port, password in DSN", func(t *testing.T) {
		t.Parallel()
		const secret = "hunter2secret"
		port := freePort(t)
		p := writeConfig(t, configYAML(fmt.Sprintf("postgres://postgres:%s@127.0.0.1:%d/app", secret, port), ns.URL(), "public.users"))
		r := run(t, env(), "--config", p, noHTTP)
		refused(t, r, 0, "connect to source", fmt.Sprintf("127.0.0.1:%d", port))
		if strings.Contains(r.stderr, secret) {
			t.Errorf("stderr leaks the DSN password %q:\n%s", secret, r.stderr)
		}
	})

	t.Run("postgres port, password in PGS2_SOURCE_PASSWORD", func(t *testing.T) {
		t.Parallel()
		const secret = "hunter3secret"
		port := freePort(t)
		p := writeConfig(t, configYAML(fmt.Sprintf("host=127.0.0.1 port=%d user=postgres dbname=app", port), ns.URL(), "public.users"))
		r := run(t, env("PGS2_SOURCE_PASSWORD="+secret), "--config", p, noHTTP)
		refused(t, r, 0, "connect to source", fmt.Sprintf("127.0.0.1:%d", port))
		if strings.Contains(r.stderr, secret) {
			t.Errorf("stderr leaks PGS2_SOURCE_PASSWORD %q:\n%s", secret, r.stderr)
		}
	})

	t.Run("nats port", func(t *testing.T) {
		t.Parallel()
		port := freePort(t)
		p := writeConfig(t, configYAML("postgres://postgres@127.0.0.1:1/app", fmt.Sprintf("nats://127.0.0.1:%d", port), "public.users"))
		r := run(t, env(), "--config", p, noHTTP)
		refused(t, r, 0, "nats.url", fmt.Sprintf("127.0.0.1:%d", port))
	})

	// The NATS URL may carry credentials (nats://user:password@host); they
	// must not reach the log either.
	t.Run("nats port, credentials in URL", func(t *testing.T) {
		t.Parallel()
		const secret = "natsS3cretPw"
		port := freePort(t)
		p := writeConfig(t, configYAML("postgres://postgres@127.0.0.1:1/app", fmt.Sprintf("nats://alice:%s@127.0.0.1:%d", secret, port), "public.users"))
		r := run(t, env(), "--config", p, noHTTP)
		refused(t, r, 0, "nats.url", fmt.Sprintf("127.0.0.1:%d", port))
		if strings.Contains(r.stderr, secret) {
			t.Errorf("stderr leaks the nats.url password %q (pkg/service/service.go ConnectJetStream prints the raw URL):\n%s", secret, r.stderr)
		}
	})

	// A DSN that passes the config check but that the driver cannot parse.
	for name, dsn := range map[string]string{
		"unparsable DSN URL with password":       "postgres://postgres:hunter2secret@127.0.0.1:1/app?sslmode=bogus",
		"unparsable DSN key=value with password": "host=127.0.0.1 port=1 user=postgres password=hunter2secret sslmode=bogus",
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			p := writeConfig(t, configYAML(dsn, ns.URL(), "public.users"))
			r := run(t, env(), "--config", p, noHTTP)
			refused(t, r, 0, "source.dsn", "sslmode")
			if strings.Contains(r.stderr, "hunter2secret") {
				t.Errorf("stderr leaks the DSN password:\n%s", r.stderr)
			}
		})
	}
}

func TestWALLevelReplica(t *testing.T) {
	t.Parallel()
	pg := pgtest.New(t, pgtest.WithSettings(map[string]string{"wal_level": "replica"}))
	ns := natstest.New(t)
	pg.MustExec(t, "postgres", "CREATE DATABASE app")
	pg.MustExec(t, "app", "CREATE TABLE users (id int PRIMARY KEY)")
	p := writeConfig(t, configYAML(pg.DSN("app"), ns.URL(), "public.users"))
	r := run(t, env(), "--config", p, noHTTP)
	refused(t, r, 0, "wal_level", `"replica"`, "ALTER SYSTEM SET wal_level = logical")
}

// TestSourceRefused runs the checks of the source's tables and role against
// one server.
func TestSourceRefused(t *testing.T) {
	t.Parallel()
	pg := pgtest.New(t)
	ns := natstest.New(t)
	pg.MustExec(t, "postgres", "CREATE DATABASE app")
	pg.MustExec(t, "app", `
		CREATE TABLE users (id int PRIMARY KEY, org int);
		CREATE TABLE nopk (a int, b text);
		CREATE TABLE nothing_t (id int PRIMARY KEY);
		ALTER TABLE nothing_t REPLICA IDENTITY NOTHING;
		CREATE VIEW users_v AS SELECT * FROM users;
		CREATE ROLE nonrepl LOGIN;
		GRANT SELECT ON ALL TABLES IN SCHEMA public TO nonrepl;`)
	appDSN := pg.DSN("app")
	nonreplDSN := fmt.Sprintf("postgres://nonrepl@127.0.0.1:%d/app?sslmode=disable", pg.Port)

	tests := []struct {
		name   string
		dsn    string
		tables []string
		extra  string // appended to the config
		want   []string
	}{
		{
			name:   "no primary key",
			tables: []string{"public.users", "public.nopk"},
			want:   []string{"public.nopk", "no primary key", "ADD PRIMARY KEY", "REPLICA IDENTITY FULL"},
		},
		{
			name:   "replica identity nothing",
			tables: []string{"public.nothing_t"},
			want:   []string{"public.nothing_t", "REPLICA IDENTITY NOTHING", "REPLICA IDENTITY FULL"},
		},
		{
			name:   "missing table",
			tables: []string{"public.users", "public.missing"},
			want:   []string{"public.missing", "does not exist", "source.tables"},
		},
		{
			name:   "missing schema",
			tables: []string{"nosuch.users"},
			want:   []string{"nosuch.users", "does not exist"},
		},
		{
			name:   "every problem at once",
			tables: []string{"public.missing", "public.nopk", "public.nothing_t"},
			want:   []string{"public.missing", "public.nopk", "public.nothing_t"},
		},
		{
			name:   "a view",
			tables: []string{"public.users_v"},
			want:   []string{"public.users_v", "not a table"},
		},
		{
			name:   "role without REPLICATION",
			dsn:    nonreplDSN,
			tables: []string{"public.users"},
			want:   []string{"nonrepl", "replication", "ALTER ROLE", "WITH REPLICATION"},
		},
		{
			name:   "group column outside the key without REPLICA IDENTITY FULL",
			tables: []string{"public.users"},
			extra: `sinks:
  - name: by-org
    tables: [public.users]
    basin: my-basin
    stream: users
    group_columns: {public.users: [org]}
`,
			want: []string{`"org"`, "public.users", "REPLICA IDENTITY FULL"},
		},
		{
			name:   "group column that does not exist",
			tables: []string{"public.users"},
			extra: `sinks:
  - name: by-org
    tables: [public.users]
    basin: my-basin
    stream: users
    group_columns: {public.users: [tenant]}
`,
			want: []string{`"tenant"`, "does not exist", "group_columns"},
		},
	}
	t.Run("health port in use", func(t *testing.T) {
		t.Parallel()
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		p := writeConfig(t, configYAML(appDSN, ns.URL(), "public.users"))
		r := run(t, env(), "--config", p, "--http-addr", l.Addr().String())
		refused(t, r, 0, l.Addr().String(), "--http-addr")
	})
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dsn := tc.dsn
			if dsn == "" {
				dsn = appDSN
			}
			p := writeConfig(t, configYAML(dsn, ns.URL(), tc.tables...)+tc.extra)
			r := run(t, env(), "--config", p, noHTTP)
			refused(t, r, 0, tc.want...)
			if !strings.Contains(r.stderr, "fix:") {
				t.Errorf("stderr has no fix:\n%s", r.stderr)
			}
		})
	}
}

// TestReadyAndSIGTERM starts capture on a valid config, waits for /readyz and
// stops it with SIGTERM: it must exit 0 promptly.
func TestReadyAndSIGTERM(t *testing.T) {
	t.Parallel()
	pg := pgtest.New(t)
	ns := natstest.New(t)
	pg.MustExec(t, "postgres", "CREATE DATABASE app")
	pg.MustExec(t, "app", "CREATE TABLE users (id int PRIMARY KEY, name text)")
	p := writeConfig(t, configYAML(pg.DSN("app"), ns.URL(), "users"))
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, captureBin, "--config", p, "--http-addr", addr)
	cmd.Env = env()
	cmd.WaitDelay = 5 * time.Second
	var stderr proctest.Buffer // read while the process writes
	cmd.Stdout, cmd.Stderr = &stderr, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	defer func() {
		select {
		case <-done:
		default:
			_ = cmd.Process.Kill()
			<-done
		}
	}()

	client := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(runTimeout)
	for ready := false; !ready; {
		select {
		case err := <-done:
			done <- err
			t.Fatalf("capture exited before it was ready (%v); output:\n%s", err, stderr.String())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("/readyz not 200 within %s; output:\n%s", runTimeout, stderr.String())
		}
		resp, err := client.Get("http://" + addr + "/readyz")
		if err == nil {
			ready = resp.StatusCode == http.StatusOK
			resp.Body.Close()
		}
	}
	// The container health check: the binary probes its own /readyz.
	if out, err := exec.Command(captureBin, "--probe", "--http-addr", addr).CombinedOutput(); err != nil {
		t.Errorf("--probe of a ready capture: %v %s", err, out)
	}
	if err := exec.Command(captureBin, "--probe", "--http-addr", fmt.Sprintf("127.0.0.1:%d", freePort(t))).Run(); err == nil {
		t.Error("--probe of nothing listening: exit 0")
	}
	if resp, err := client.Get("http://" + addr + "/healthz"); err != nil || resp.StatusCode != http.StatusOK {
		t.Errorf("/healthz: %v %v", resp, err)
	} else {
		resp.Body.Close()
	}
	// A change while running, so shutdown has something to confirm.
	pg.MustExec(t, "app", "INSERT INTO users VALUES (1, 'a')")
	// /metrics counts it.
	for metric := ""; !strings.Contains(metric, `pgs2_capture_changes_published_total{source="app"} 1`); {
		if time.Now().After(deadline) {
			t.Fatalf("/metrics does not count the change:\n%s", metric)
		}
		time.Sleep(50 * time.Millisecond)
		if resp, err := client.Get("http://" + addr + "/metrics"); err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			metric = string(b)
		}
	}

	// SIGHUP with a table added: captured from then on, no restart.
	pg.MustExec(t, "app", "CREATE TABLE orders (id int PRIMARY KEY)")
	if err := os.WriteFile(p, []byte(configYAML(pg.DSN("app"), ns.URL(), "users", "orders")), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	for !strings.Contains(stderr.String(), "config reloaded") {
		if time.Now().After(deadline) {
			t.Fatalf("no reload after SIGHUP; output:\n%s", stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	pg.MustExec(t, "app", "INSERT INTO orders VALUES (1)")
	for metric := ""; !strings.Contains(metric, `pgs2_capture_changes_published_total{source="app"} 2`); {
		if time.Now().After(deadline) {
			t.Fatalf("/metrics does not count the change of the added table:\n%s\noutput:\n%s", metric, stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
		if resp, err := client.Get("http://" + addr + "/metrics"); err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			metric = string(b)
		}
	}

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		done <- err
		if err != nil {
			t.Errorf("exit after SIGTERM: %v; want status 0; output:\n%s", err, stderr.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("capture did not exit within 10s of SIGTERM; output:\n%s", stderr.String())
	}
	out := stderr.String()
	for _, p := range []string{"panic:", "goroutine "} {
		if strings.Contains(out, p) {
			t.Errorf("output contains %q:\n%s", p, out)
		}
	}
	t.Logf("output:\n%s", out)
}
