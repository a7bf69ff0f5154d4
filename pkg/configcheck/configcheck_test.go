package configcheck_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgs2/pgs2/pkg/configcheck"
	"github.com/pgs2/pgs2/pkg/natstest"
	"github.com/pgs2/pgs2/pkg/pgtest"
)

func writeConfig(t *testing.T, text string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "pgs2.yaml")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func check(t *testing.T, path string, connect bool) (string, *configcheck.CheckError) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var out bytes.Buffer
	err := configcheck.Run(ctx, path, connect, &out)
	if err == nil {
		return out.String(), nil
	}
	var ce *configcheck.CheckError
	if !errors.As(err, &ce) {
		t.Fatalf("Run: %v (not a *CheckError)\n%s", err, out.String())
	}
	for _, p := range ce.Problems {
		if p.What == "" || p.Problem == "" || p.Fix == "" {
			t.Errorf("problem without what, problem or fix: %+v", p)
		}
	}
	return out.String(), ce
}

// hasProblem reports whether a problem of what mentions every word.
func hasProblem(ce *configcheck.CheckError, what string, words ...string) bool {
	if ce == nil {
		return false
	}
next:
	for _, p := range ce.Problems {
		if !strings.HasPrefix(p.What, what) {
			continue
		}
		for _, w := range words {
			if !strings.Contains(p.Problem+" "+p.Fix, w) {
				continue next
			}
		}
		return true
	}
	return false
}

func TestCheckWithoutConnecting(t *testing.T) {
	t.Setenv("S2_ACCESS_TOKEN", "s2-token-never-shown")
	valid := writeConfig(t, `
source: {name: app, dsn: "postgres://capture:dsn-secret-pw@db.example:5432/app", tables: [users]}
nats: {url: "nats://127.0.0.1:4222"}
sinks:
  - name: users
    tables: [users]
    basin: app-basin
    routing: '{"stream": metadata.table_schema + "." + metadata.table_name}'
    filter: 'action != "delete"'
`)
	out, ce := check(t, valid, false)
	if ce != nil {
		t.Fatalf("valid config: %v\n%s", ce, out)
	}
	for _, want := range []string{"valid", "sink users", "routing:      compiled", "filter:       compiled", "transform:    none", "--connect", "OK"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	for _, secret := range []string{"dsn-secret-pw", "s2-token-never-shown"} {
		if strings.Contains(out, secret) {
			t.Errorf("output holds the secret %q:\n%s", secret, out)
		}
	}

	bad := writeConfig(t, `
source: {name: app, tables: [users]}
sinks:
  - name: users
    tables: [users]
    basin: app-basin
`)
	out, ce = check(t, bad, false)
	if ce == nil {
		t.Fatalf("config without a dsn or nats passed:\n%s", out)
	}
	if !hasProblem(ce, "config", "source.dsn") || !hasProblem(ce, "config", "nats.url") {
		t.Errorf("want problems naming source.dsn and nats.url, got %v", ce)
	}
	if !strings.Contains(out, "FAILED") {
		t.Errorf("output lacks the verdict:\n%s", out)
	}

	badFn := writeConfig(t, `
source: {name: app, dsn: "postgres://capture@db.example/app", tables: [users]}
nats: {url: "nats://127.0.0.1:4222"}
sinks:
  - name: users
    tables: [users]
    basin: app-basin
    stream: users
    transform: 'record.no_such_function()'
    routing: '{"stream": metadata.table_name +}'
`)
	out, ce = check(t, badFn, false)
	if !hasProblem(ce, "sink users", "routing function does not compile") {
		t.Errorf("want the routing function refused, got %v\n%s", ce, out)
	}
	if ce != nil && len(ce.Problems) != 1 && !hasProblem(ce, "sink users", "transform function") {
		t.Errorf("problems other than the functions: %v", ce)
	}

	_, ce = check(t, filepath.Join(t.TempDir(), "missing.yaml"), false)
	if !hasProblem(ce, "config") {
		t.Errorf("a missing file: want a config problem, got %v", ce)
	}
}

func TestCheckConnects(t *testing.T) {
	pg := pgtest.New(t)
	ns := natstest.New(t)
	ctx := context.Background()
	if err := pg.CreateDB(ctx, "app"); err != nil {
		t.Fatal(err)
	}
	pg.MustExec(t, "app", `CREATE TABLE users (id int PRIMARY KEY, name text);
		CREATE TABLE events (at timestamptz, what text);
		CREATE ROLE checker LOGIN PASSWORD 'role-secret-pw-42';
		GRANT SELECT ON users TO checker`)
	t.Setenv("S2_ACCESS_TOKEN", "s2-token-never-shown")
	sink := `
sinks:
  - name: users
    tables: [users]
    basin: app-basin
    stream: users
`

	// A role without REPLICATION, a table without a key, one missing.
	dsn := fmt.Sprintf("postgres://checker:role-secret-pw-42@127.0.0.1:%d/app?sslmode=disable", pg.Port)
	bad := writeConfig(t, fmt.Sprintf(`
source: {name: app, dsn: %q, tables: [users, events, missing_table]}
nats: {url: %q}
`, dsn, ns.URL())+sink)
	out, ce := check(t, bad, true)
	t.Logf("check of a bad source:\n%s", out)
	if ce == nil {
		t.Fatalf("no problems found:\n%s", out)
	}
	for _, want := range []struct{ what, word string }{
		{"role checker", "REPLICATION"},
		{"table public.events", "primary key"},
		{"table public.events", "may not read"},
		{"table public.missing_table", "does not exist"},
		{"publication pgs2", "could not create"},
	} {
		if !hasProblem(ce, want.what, want.word) {
			t.Errorf("want a problem of %s naming %q; got %v", want.what, want.word, ce)
		}
	}
	if hasProblem(ce, "table public.users") {
		t.Errorf("users is fine, got %v", ce)
	}
	for _, secret := range []string{"role-secret-pw-42", "s2-token-never-shown"} {
		if strings.Contains(out, secret) || strings.Contains(ce.Error(), secret) {
			t.Errorf("the secret %q is printed:\n%s\n%v", secret, out, ce)
		}
	}

	// As a superuser on a good table: nothing is wrong, and the check
	// says what would be created without creating it.
	good := writeConfig(t, fmt.Sprintf(`
source: {name: app, dsn: %q, tables: [users]}
nats: {url: %q}
`, pg.DSN("app"), ns.URL())+sink)
	out, ce = check(t, good, true)
	t.Logf("check of a good source:\n%s", out)
	if ce != nil {
		t.Fatalf("good config: %v\n%s", ce, out)
	}
	for _, want := range []string{"wal_level:    logical: ok", "capture would create slot pgs2", "capture would create it: CREATE PUBLICATION",
		"jetstream:    ok", "would be created (14)", "stream PGS2_CHANGES", "kv bucket PGS2_SINKS", "stream PGS2_PARKED"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	conn, err := pgx.Connect(ctx, pg.DSN("app"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var slots, pubs int
	if err := conn.QueryRow(ctx, `SELECT (SELECT count(*) FROM pg_replication_slots), (SELECT count(*) FROM pg_publication)`).Scan(&slots, &pubs); err != nil {
		t.Fatal(err)
	}
	if slots != 0 || pubs != 0 {
		t.Errorf("the check created %d slots and %d publications", slots, pubs)
	}
	_, js := ns.Connect(t)
	var streams []string
	for n := range js.StreamNames(ctx).Name() {
		streams = append(streams, n)
	}
	if len(streams) != 0 {
		t.Errorf("the check created streams %v", streams)
	}

	// A stream of the same name holding another source's subjects.
	pg.MustExec(t, "app", `CREATE PUBLICATION pgs2 FOR TABLE users`)
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "PGS2_CHANGES", Subjects: []string{"pgs2.changes.other.>"}}); err != nil {
		t.Fatal(err)
	}
	out, ce = check(t, good, true)
	if !hasProblem(ce, "stream PGS2_CHANGES", "another source") {
		t.Errorf("want the shared stream refused, got %v\n%s", ce, out)
	}
	if !strings.Contains(out, "publication pgs2: exists") || !strings.Contains(out, "would be created (13)") {
		t.Errorf("output lacks the existing publication and stream:\n%s", out)
	}

	// A partitioned table in a publication without
	// publish_via_partition_root (which lists its partitions): covered,
	// and capture would set the option.
	pg.MustExec(t, "app", `CREATE TABLE m (id int PRIMARY KEY) PARTITION BY RANGE (id);
		CREATE TABLE m1 PARTITION OF m FOR VALUES FROM (0) TO (100);
		CREATE PUBLICATION pgs2p FOR TABLE m`)
	part := writeConfig(t, fmt.Sprintf(`
source: {name: part, dsn: %q, tables: [m], publication: pgs2p, slot: pgs2p}
nats: {url: %q, changes_stream: PART_CHANGES, delivery_stream: PART_DELIVERY}
sinks:
  - {name: m, tables: [m], basin: app-basin, stream: m}
`, pg.DSN("app"), ns.URL()))
	out, ce = check(t, part, true)
	if ce != nil || !strings.Contains(out, "covers 1 of 1 tables: public.m") || !strings.Contains(out, "publish_via_partition_root = true") ||
		strings.Contains(out, "lacks") || strings.Contains(out, "also publishes") {
		t.Errorf("partitioned table: %v\n%s", ce, out)
	}
}

func TestRedactDSN(t *testing.T) {
	for _, c := range []struct{ dsn, want string }{
		{"postgres://u:pw-secret@h:5432/app?sslmode=require", "postgres://u:xxxxx@h:5432/app?sslmode=require"},
		{"postgres://u@h/app?password=pw-secret&sslpassword=key-secret", "postgres://u@h/app?password=xxxxx&sslpassword=xxxxx"},
		{"host=h password=pw-secret sslpassword=key-secret user=u", "host=h password=xxxxx sslpassword=xxxxx user=u"},
		{"host=h password='a \\' secret' user=u", "host=h password=xxxxx user=u"},
	} {
		if got := configcheck.RedactDSN(c.dsn); got != c.want {
			t.Errorf("RedactDSN(%q) = %q, want %q", c.dsn, got, c.want)
		}
	}
}
