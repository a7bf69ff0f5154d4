package config_test

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/pgs2/pgs2/pkg/config"
)

// readmeExample is the configuration shown in README.md.
const readmeExample = `
source:
  name: app                      # [A-Za-z0-9_-], names the source in subjects
  dsn: postgres://replicator@localhost:5432/app   # password here or in PGS2_SOURCE_PASSWORD
  slot: pgs2                     # created if missing (pgoutput)
  publication: pgs2              # created if missing; missing tables are added
  tables: [public.users, public.orders]
nats:
  url: nats://127.0.0.1:4222     # or embedded: true with store_dir (capture hosts the server)
  replicas: 1
  partitions: 64                 # subjects per table; a group always maps to one
  changes_stream: PGS2_CHANGES   # one per source (see below)
  duplicate_window: 10m
sinks:
  - name: users-to-s2
    tables: [public.users]
    basin: my-basin
    stream: users
    group_columns: {public.users: [org_id]}   # optional; default primary key
`

// minimal is the smallest valid file: everything else takes its default.
const minimal = `
source:
  name: app
  dsn: postgres://replicator@localhost:5432/app
  tables: [users, sales.orders]
nats:
  url: nats://127.0.0.1:4222
sinks:
  - name: users-to-s2
    tables: [users]
    basin: my-basin
    stream: users
`

func TestParseREADMEExample(t *testing.T) {
	t.Parallel()
	c, err := config.Parse([]byte(readmeExample))
	if err != nil {
		t.Fatalf("README example does not parse: %v", err)
	}
	if c.Source.Name != "app" || c.Source.DSN != "postgres://replicator@localhost:5432/app" ||
		c.Source.Slot != "pgs2" || c.Source.Publication != "pgs2" {
		t.Errorf("source = %+v", c.Source)
	}
	if want := []string{"public.users", "public.orders"}; !reflect.DeepEqual(c.Source.Tables, want) {
		t.Errorf("source.tables = %v, want %v", c.Source.Tables, want)
	}
	n := c.NATS
	if n.URL != "nats://127.0.0.1:4222" || n.Replicas != 1 || n.Partitions != 64 ||
		n.ChangesStream != "PGS2_CHANGES" || n.DuplicateWindow.D() != 10*time.Minute || n.SyncInterval.D() != time.Second {
		t.Errorf("nats = %+v", n)
	}
	if len(c.Sinks) != 1 {
		t.Fatalf("sinks = %+v", c.Sinks)
	}
	s := c.Sinks[0]
	if s.Name != "users-to-s2" || s.Basin != "my-basin" || s.Stream != "users" ||
		!reflect.DeepEqual(s.Tables, []string{"public.users"}) {
		t.Errorf("sink = %+v", s)
	}
	if want := map[string][]string{"public.users": {"org_id"}}; !reflect.DeepEqual(s.GroupColumns, want) {
		t.Errorf("sink group_columns = %v, want %v", s.GroupColumns, want)
	}
	gc, err := c.GroupColumns()
	if err != nil || !reflect.DeepEqual(gc, map[string][]string{"public.users": {"org_id"}}) {
		t.Errorf("GroupColumns() = %v, %v", gc, err)
	}
}

func TestParseDefaults(t *testing.T) {
	t.Parallel()
	c, err := config.Parse([]byte(minimal))
	if err != nil {
		t.Fatalf("minimal config: %v", err)
	}
	if c.Source.Slot != "pgs2" {
		t.Errorf("default slot = %q, want pgs2", c.Source.Slot)
	}
	if c.Source.Publication != "pgs2" {
		t.Errorf("default publication = %q, want pgs2", c.Source.Publication)
	}
	if want := []string{"public.users", "sales.orders"}; !reflect.DeepEqual(c.Source.Tables, want) {
		t.Errorf("source.tables = %v, want bare names qualified to %v", c.Source.Tables, want)
	}
	n := c.NATS
	if n.Partitions != 64 {
		t.Errorf("default partitions = %d, want 64", n.Partitions)
	}
	if n.ChangesStream != "PGS2_CHANGES" {
		t.Errorf("default changes_stream = %q", n.ChangesStream)
	}
	if n.Replicas != 1 {
		t.Errorf("default replicas = %d", n.Replicas)
	}
	if n.DuplicateWindow.D() != 10*time.Minute {
		t.Errorf("default duplicate_window = %s", n.DuplicateWindow.D())
	}
	if n.SyncInterval.D() != time.Second {
		t.Errorf("default sync_interval = %s", n.SyncInterval.D())
	}
	s := c.Sinks[0]
	if !reflect.DeepEqual(s.Tables, []string{"public.users"}) {
		t.Errorf("sink tables = %v, want [public.users]", s.Tables)
	}
	if s.AccessTokenEnv != "S2_ACCESS_TOKEN" {
		t.Errorf("default access_token_env = %q", s.AccessTokenEnv)
	}
	if s.Batch.MaxRecords != 1000 || s.Batch.MaxBytes != 1<<20 || s.Batch.Linger.D() != 5*time.Millisecond {
		t.Errorf("default batch = %+v", s.Batch)
	}
	if s.Retry.Initial.D() != time.Second || s.Retry.Max.D() != 5*time.Minute || s.Retry.MaxAttempts != 0 {
		t.Errorf("default retry = %+v", s.Retry)
	}
	if c.Source.Password != "" {
		t.Errorf("password %q without PGS2_SOURCE_PASSWORD", c.Source.Password)
	}
	if b := c.Source.Backfill; b.ChunkSize != 1000 || b.StatementTimeout.D() != 30*time.Second || b.MaxRowsPerSecond != 0 {
		t.Errorf("default source.backfill = %+v", b)
	}
	if s.InitialBackfill != nil {
		t.Errorf("initial_backfill = %+v without the key", s.InitialBackfill)
	}
}

func TestParseBackfill(t *testing.T) {
	t.Parallel()
	base := strings.Replace(minimal, "tables: [users, sales.orders]", "tables: [users, sales.orders]\n  backfill: {chunk_size: 500, statement_timeout: 5s, max_rows_per_second: 2000}", 1)
	for _, tc := range []struct {
		initial string
		want    *config.InitialBackfill
	}{
		{"true", &config.InitialBackfill{All: true}},
		{"false", &config.InitialBackfill{}},
		{"[users]", &config.InitialBackfill{Tables: []config.BackfillTable{{Table: "public.users"}}}},
		{"\n      - sales.orders\n      - {table: users, where: \"id > 10\"}", &config.InitialBackfill{Tables: []config.BackfillTable{
			{Table: "sales.orders"}, {Table: "public.users", Where: "id > 10"}}}},
	} {
		y := strings.Replace(base, "tables: [users]\n", "tables: [users, sales.orders]\n    initial_backfill: "+tc.initial+"\n", 1)
		c, err := config.Parse([]byte(y))
		if err != nil {
			t.Fatalf("initial_backfill: %s: %v", tc.initial, err)
		}
		if got := c.Sinks[0].InitialBackfill; !reflect.DeepEqual(got, tc.want) {
			t.Errorf("initial_backfill: %s = %+v, want %+v", tc.initial, got, tc.want)
		}
		if b := c.Source.Backfill; b.ChunkSize != 500 || b.StatementTimeout.D() != 5*time.Second || b.MaxRowsPerSecond != 2000 {
			t.Errorf("source.backfill = %+v", b)
		}
	}
}

func TestParseExplicitValuesKept(t *testing.T) {
	t.Parallel()
	c, err := config.Parse([]byte(`
source: {name: app, dsn: "host=h user=u dbname=app", slot: my_slot, publication: my_pub, tables: [public.users]}
nats: {embedded: true, store_dir: /tmp/js, replicas: 3, partitions: 8, changes_stream: APP_CHANGES, duplicate_window: 2m, sync_interval: 250ms}
sinks:
  - name: s
    tables: [public.users]
    basin: my-basin
    stream: users
    group_columns: {users: [org_id]}
    batch: {max_records: 10, max_bytes: 4096, linger: 20ms}
    retry: {initial: 2s, max: 1m, max_attempts: 7}
`))
	if err != nil {
		t.Fatal(err)
	}
	if c.Source.Slot != "my_slot" || c.Source.Publication != "my_pub" {
		t.Errorf("source = %+v", c.Source)
	}
	n := c.NATS
	if !n.Embedded || n.StoreDir != "/tmp/js" || n.Replicas != 3 || n.Partitions != 8 || n.ChangesStream != "APP_CHANGES" ||
		n.DuplicateWindow.D() != 2*time.Minute || n.SyncInterval.D() != 250*time.Millisecond {
		t.Errorf("nats = %+v", n)
	}
	s := c.Sinks[0]
	if s.Batch != (config.Batch{MaxRecords: 10, MaxBytes: 4096, Linger: config.Duration(20 * time.Millisecond)}) {
		t.Errorf("batch = %+v", s.Batch)
	}
	if s.Retry != (config.Retry{Initial: config.Duration(2 * time.Second), Max: config.Duration(time.Minute), MaxAttempts: 7}) {
		t.Errorf("retry = %+v", s.Retry)
	}
	if !reflect.DeepEqual(s.GroupColumns, map[string][]string{"public.users": {"org_id"}}) {
		t.Errorf("group_columns keys should be qualified: %v", s.GroupColumns)
	}
}

// edit returns minimal with old replaced by new (which must occur once).
func edit(t *testing.T, old, new string) string {
	t.Helper()
	if strings.Count(minimal, old) != 1 {
		t.Fatalf("%q does not occur exactly once in the base config", old)
	}
	return strings.Replace(minimal, old, new, 1)
}

func TestParseErrors(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		yaml func(t *testing.T) string
		// want are substrings the error must contain (the key, the problem).
		want []string
	}{
		{
			name: "nats security",
			yaml: func(t *testing.T) string {
				return edit(t, "url: nats://127.0.0.1:4222", "url: nats://127.0.0.1:4222\n  user: pgs2\n  credentials_file: /nonexistent.creds\n  tls: {cert_file: /nonexistent.pem}")
			},
			want: []string{"nats: give one way to authenticate", "nats.tls: cert_file and key_file go together", "nats.credentials_file: cannot read /nonexistent.creds"},
		},
		{
			name: "nats user without password",
			yaml: func(t *testing.T) string {
				return edit(t, "url: nats://127.0.0.1:4222", "url: nats://127.0.0.1:4222\n  user: pgs2")
			},
			want: []string{"nats.user: needs its password in PGS2_NATS_PASSWORD"},
		},
		{
			name: "backfill chunk size",
			yaml: func(t *testing.T) string {
				return edit(t, "tables: [users, sales.orders]", "tables: [users, sales.orders]\n  backfill: {chunk_size: -1, statement_timeout: 1ms, max_rows_per_second: -5}")
			},
			want: []string{"source.backfill.chunk_size: -1 is out of range", "source.backfill.statement_timeout: 1ms is too short", "source.backfill.max_rows_per_second: must be"},
		},
		{
			name: "backfill unknown key",
			yaml: func(t *testing.T) string {
				return edit(t, "tables: [users, sales.orders]", "tables: [users, sales.orders]\n  backfill: {chunks: 5}")
			},
			want: []string{"chunks", "under source.backfill"},
		},
		{
			name: "initial backfill of a table the sink lacks",
			yaml: func(t *testing.T) string {
				return edit(t, "    tables: [users]\n", "    tables: [users]\n    initial_backfill: [sales.orders, {table: users, where: \"a; DROP TABLE users\"}, {table: users}]\n")
			},
			want: []string{`sinks[0].initial_backfill[0]: "sales.orders" is not in this sink's tables`, `sinks[0].initial_backfill[1].where: invalid where "a; DROP TABLE users": it holds ';'`,
				`sinks[0].initial_backfill[2]: "public.users" is listed twice`},
		},
		{
			name: "initial backfill of a sink with a long name",
			yaml: func(t *testing.T) string {
				return edit(t, "  - name: users-to-s2\n    tables: [users]\n", "  - name: "+strings.Repeat("s", 57)+"\n    tables: [users]\n    initial_backfill: true\n")
			},
			want: []string{"sinks[0].name", "longer than 56 bytes"},
		},
		{
			name: "initial backfill not a list",
			yaml: func(t *testing.T) string {
				return edit(t, "    tables: [users]\n", "    tables: [users]\n    initial_backfill: yes please\n")
			},
			want: []string{"initial_backfill", "neither true, false nor a list"},
		},
		{
			name: "initial backfill unknown key",
			yaml: func(t *testing.T) string {
				return edit(t, "    tables: [users]\n", "    tables: [users]\n    initial_backfill: [{table: users, filter: x}]\n")
			},
			want: []string{"initial_backfill", `unknown key "filter"`},
		},
		{
			name: "malformed YAML",
			yaml: func(*testing.T) string { return "source:\n  name: app\n   dsn: [unclosed\n" },
			want: []string{"malformed YAML", "line "},
		},
		{
			name: "tab indentation",
			yaml: func(*testing.T) string { return "source:\n\tname: app\n" },
			want: []string{"malformed YAML", "line "},
		},
		{
			name: "unknown key",
			yaml: func(*testing.T) string { return "source: {nmae: x}\n" },
			want: []string{"nmae", "line 1"},
		},
		{
			name: "unknown top-level key",
			yaml: func(t *testing.T) string { return minimal + "sink:\n  - name: x\n" },
			want: []string{"sink", "not found"},
		},
		{
			name: "wrong type",
			yaml: func(t *testing.T) string {
				return edit(t, "url: nats://127.0.0.1:4222", "url: nats://127.0.0.1:4222\n  partitions: many")
			},
			want: []string{"invalid config", "line ", "many"},
		},
		{
			name: "source.name missing",
			yaml: func(t *testing.T) string { return edit(t, "  name: app\n", "") },
			want: []string{"source.name", "missing"},
		},
		{
			name: "source.name invalid",
			yaml: func(t *testing.T) string { return edit(t, "name: app", "name: my.app") },
			want: []string{"source.name", `"my.app"`},
		},
		{
			name: "source.dsn missing",
			yaml: func(t *testing.T) string { return edit(t, "  dsn: postgres://replicator@localhost:5432/app\n", "") },
			want: []string{"source.dsn", "missing"},
		},
		{
			name: "source.dsn not a URL",
			yaml: func(t *testing.T) string {
				return edit(t, "dsn: postgres://replicator@localhost:5432/app", `dsn: "postgres://u:p%zz@h/db"`)
			},
			want: []string{"source.dsn", "not a valid URL"},
		},
		{
			name: "source.slot invalid (README example)",
			yaml: func(t *testing.T) string {
				return edit(t, "  tables: [users, sales.orders]", "  slot: My-Slot\n  tables: [users, sales.orders]")
			},
			want: []string{`source.slot: "My-Slot" is not a valid replication slot name: use 1-63 of [a-z0-9_]`},
		},
		{
			name: "source.slot too long",
			yaml: func(t *testing.T) string {
				return edit(t, "  tables: [users, sales.orders]", "  slot: "+strings.Repeat("s", 64)+"\n  tables: [users, sales.orders]")
			},
			want: []string{"source.slot", "1-63"},
		},
		{
			name: "source.publication invalid",
			yaml: func(t *testing.T) string {
				return edit(t, "  tables: [users, sales.orders]", "  publication: 1pub\n  tables: [users, sales.orders]")
			},
			want: []string{"source.publication", `"1pub"`},
		},
		{
			name: "source.tables empty",
			yaml: func(t *testing.T) string { return edit(t, "tables: [users, sales.orders]", "tables: []") },
			want: []string{"source.tables", "empty"},
		},
		{
			name: "source.tables duplicate after qualifying",
			yaml: func(t *testing.T) string {
				return edit(t, "tables: [users, sales.orders]", "tables: [users, public.users]")
			},
			want: []string{"source.tables[1]", "twice"},
		},
		{
			name: "source.tables not schema.table",
			yaml: func(t *testing.T) string { return edit(t, "tables: [users, sales.orders]", "tables: [users, a.b.c]") },
			want: []string{"source.tables[1]", "schema.table"},
		},
		{
			name: "nats.url missing",
			yaml: func(t *testing.T) string { return edit(t, "  url: nats://127.0.0.1:4222\n", "") },
			want: []string{"nats.url", "missing"},
		},
		{
			name: "nats.store_dir missing with embedded",
			yaml: func(t *testing.T) string { return edit(t, "  url: nats://127.0.0.1:4222\n", "  embedded: true\n") },
			want: []string{"nats.store_dir", "embedded"},
		},
		{
			name: "nats.partitions too large",
			yaml: func(t *testing.T) string {
				return edit(t, "url: nats://127.0.0.1:4222", "url: nats://127.0.0.1:4222\n  partitions: 5000")
			},
			want: []string{"nats.partitions", "5000", "out of range"},
		},
		{
			name: "nats.partitions negative",
			yaml: func(t *testing.T) string {
				return edit(t, "url: nats://127.0.0.1:4222", "url: nats://127.0.0.1:4222\n  partitions: -1")
			},
			want: []string{"nats.partitions", "-1"},
		},
		{
			name: "nats.replicas out of range",
			yaml: func(t *testing.T) string {
				return edit(t, "url: nats://127.0.0.1:4222", "url: nats://127.0.0.1:4222\n  replicas: 7")
			},
			want: []string{"nats.replicas", "7"},
		},
		{
			name: "nats.changes_stream invalid",
			yaml: func(t *testing.T) string {
				return edit(t, "url: nats://127.0.0.1:4222", "url: nats://127.0.0.1:4222\n  changes_stream: a.b")
			},
			want: []string{"nats.changes_stream", `"a.b"`},
		},
		{
			name: "nats.duplicate_window too short",
			yaml: func(t *testing.T) string {
				return edit(t, "url: nats://127.0.0.1:4222", "url: nats://127.0.0.1:4222\n  duplicate_window: 10ms")
			},
			want: []string{"nats.duplicate_window", "10ms"},
		},
		{
			name: "nats.changes_max_age shorter than the duplicate window",
			yaml: func(t *testing.T) string {
				return edit(t, "url: nats://127.0.0.1:4222", "url: nats://127.0.0.1:4222\n  changes_max_age: 1m")
			},
			want: []string{"nats.changes_max_age", "1m0s"},
		},
		{
			name: "sink table not in source.tables",
			yaml: func(t *testing.T) string { return edit(t, "    tables: [users]", "    tables: [public.accounts]") },
			want: []string{"sinks[0].tables[0]", `"public.accounts"`, "not in source.tables"},
		},
		{
			name: "sink basin invalid",
			yaml: func(t *testing.T) string { return edit(t, "basin: my-basin", "basin: My_Basin") },
			want: []string{"sinks[0].basin", `"My_Basin"`, "not a valid basin name"},
		},
		{
			name: "sink basin too short",
			yaml: func(t *testing.T) string { return edit(t, "basin: my-basin", "basin: short") },
			want: []string{"sinks[0].basin", `"short"`},
		},
		{
			name: "sink basin missing",
			yaml: func(t *testing.T) string { return edit(t, "    basin: my-basin\n", "") },
			want: []string{"sinks[0].basin", "missing"},
		},
		{
			name: "sink name missing",
			yaml: func(t *testing.T) string { return edit(t, "  - name: users-to-s2\n    tables", "  - tables") },
			want: []string{"sinks[0].name", "missing"},
		},
		{
			name: "sink names not unique",
			yaml: func(t *testing.T) string {
				return minimal + "  - name: users-to-s2\n    tables: [users]\n    basin: my-basin\n    stream: other\n"
			},
			want: []string{"sinks[1].name", "unique"},
		},
		{
			name: "sink group_columns table not in sink",
			yaml: func(t *testing.T) string {
				return edit(t, "    stream: users\n", "    stream: users\n    group_columns: {sales.orders: [id]}\n")
			},
			want: []string{"sinks[0].group_columns", "sales.orders"},
		},
		{
			name: "sink batch.max_records out of range",
			yaml: func(t *testing.T) string {
				return edit(t, "    stream: users\n", "    stream: users\n    batch: {max_records: 1001}\n")
			},
			want: []string{"sinks[0].batch.max_records", "1001"},
		},
		{
			name: "sink retry.max below initial",
			yaml: func(t *testing.T) string {
				return edit(t, "    stream: users\n", "    stream: users\n    retry: {initial: 10s, max: 1s}\n")
			},
			want: []string{"sinks[0].retry.max"},
		},
		{
			name: "two sinks disagree on group_columns",
			yaml: func(t *testing.T) string {
				return edit(t, "    stream: users\n", "    stream: users\n    group_columns: {users: [org_id]}\n") +
					"  - name: users-by-id\n    tables: [public.users]\n    basin: my-basin\n    stream: users2\n" +
					"    group_columns: {public.users: [id]}\n"
			},
			want: []string{"group_columns", `"users-to-s2"`, `"users-by-id"`, "public.users", "same columns"},
		},
		{
			name: "bad duration",
			yaml: func(t *testing.T) string {
				return edit(t, "    stream: users\n", "    stream: users\n    batch: {linger: fast}\n")
			},
			want: []string{`"fast"`, "not a duration", "line 13"},
		},
		{
			name: "duration not a scalar",
			yaml: func(t *testing.T) string {
				return edit(t, "url: nats://127.0.0.1:4222", "url: nats://127.0.0.1:4222\n  duplicate_window: [1m]")
			},
			want: []string{"duration", "line 8"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			y := tc.yaml(t)
			c, err := config.Parse([]byte(y))
			if err == nil {
				t.Fatalf("Parse succeeded (%+v); want an error containing %q\n%s", c, tc.want, y)
			}
			msg := err.Error()
			for _, w := range tc.want {
				if !strings.Contains(msg, w) {
					t.Errorf("error does not contain %q:\n%s\nconfig:\n%s", w, msg, y)
				}
			}
			if strings.Contains(msg, "panic") {
				t.Errorf("error mentions a panic: %s", msg)
			}
		})
	}
}

// TestParseReportsAllProblems checks that one run reports every problem, each
// on its key, so a user fixes the file in one go.
func TestParseReportsAllProblems(t *testing.T) {
	t.Parallel()
	_, err := config.Parse([]byte(`
source: {name: "", dsn: "", slot: "Bad-Slot", tables: []}
nats: {partitions: 99999}
sinks:
  - {name: s, tables: [public.nope], basin: X, stream: s}
`))
	if err == nil {
		t.Fatal("want errors")
	}
	for _, key := range []string{"source.name", "source.dsn", "source.slot", "source.tables", "nats.url",
		"nats.partitions", "sinks[0].tables[0]", "sinks[0].basin"} {
		if !regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(key) + `: `).MatchString(err.Error()) {
			t.Errorf("no line starting with %q in:\n%s", key+": ", err)
		}
	}
}

// TestErrorsDoNotLeakPassword checks that the DSN's password is never part of
// an error, whether the DSN itself or another key is wrong.
func TestErrorsDoNotLeakPassword(t *testing.T) {
	t.Parallel()
	const secret = "s3cret"
	for _, tc := range []struct{ name, yaml string }{
		{"other key wrong", `
source: {name: app, dsn: "postgres://u:s3cret@h/db", slot: "BAD", tables: [users]}
nats: {partitions: 0, url: ""}
`},
		{"dsn unparsable", `
source: {name: app, dsn: "postgres://u:s3cret@h:port/db%zz", tables: [users]}
nats: {url: "nats://x"}
`},
		{"dsn key=value with other errors", `
source: {name: "a b", dsn: "host=h user=u password=s3cret dbname=db", tables: []}
nats: {url: "nats://x"}
`},
		{"dsn in the wrong place", `
source: "postgres://u:s3cret@h/db"
`},
		{"dsn of the wrong type", `
source: {name: app, dsn: {url: "postgres://u:s3cret@h/db"}, tables: [users]}
`},
		{"unknown key beside the dsn", `
source: {name: app, dsn: "postgres://u:s3cret@h/db", tabels: [users]}
`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := config.Parse([]byte(tc.yaml))
			if err == nil {
				t.Fatal("want an error")
			}
			if strings.Contains(err.Error(), secret) {
				t.Errorf("error leaks the password:\n%s", err)
			}
		})
	}
}

// TestPasswordFromEnv is not parallel: it sets the environment.
func TestPasswordFromEnv(t *testing.T) {
	t.Setenv("PGS2_SOURCE_PASSWORD", "from-env")
	c, err := config.Parse([]byte(minimal))
	if err != nil {
		t.Fatal(err)
	}
	if c.Source.Password != "from-env" {
		t.Errorf("Source.Password = %q, want from-env", c.Source.Password)
	}
	if c.Source.DSN != "postgres://replicator@localhost:5432/app" {
		t.Errorf("DSN changed: %q", c.Source.DSN)
	}
}

// TestTableNames: table and column names are read as Postgres reads them.
func TestTableNames(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]string{
		"users":                      "public.users",
		"Users":                      "public.users",
		" sales . Orders ":           "sales.orders",
		`"Mixed Case"."Weird.Table"`: "Mixed Case.Weird.Table",
		`"Users"`:                    "public.Users",
		`"say ""hi"""`:               `public.say "hi"`,
		`app."t.1"`:                  "app.t.1",
		`café.naïve`:                 "café.naïve",
		`"a"."b"`:                    "a.b",
		`s$1._x`:                     "s$1._x",
	} {
		got, err := config.ParseTable(in)
		if err != nil || got != want {
			t.Errorf("ParseTable(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for in, want := range map[string]string{
		"":          "empty name",
		`"unclosed`: "not closed",
		"a.b.c":     "3 dotted parts",
		"my table":  `"my table" is not a plain name`,
		`"a.b".t`:   "holds a dot",
		`"".t`:      "empty quoted name",
		`"a"x`:      `unexpected "x"`,
		"1abc":      "not a plain name",
		"a.":        "empty name",
	} {
		if _, err := config.ParseTable(in); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("ParseTable(%q): %v; want an error with %q", in, err, want)
		}
	}
	y := strings.NewReplacer("tables: [users, sales.orders]", `tables: [users, '"Mixed Case"."Weird.Table"']`,
		"    tables: [users]\n", `    tables: ['"Mixed Case"."Weird.Table"']`+"\n"+`    group_columns: {'"Mixed Case"."Weird.Table"': ['"Col Name"', Org]}`+"\n"+
			`    initial_backfill: ['"Mixed Case"."Weird.Table"']`+"\n").Replace(minimal)
	c, err := config.Parse([]byte(y))
	if err != nil {
		t.Fatal(err)
	}
	if got := c.Source.Tables; !reflect.DeepEqual(got, []string{"public.users", "Mixed Case.Weird.Table"}) {
		t.Errorf("source.tables = %q", got)
	}
	s := c.Sinks[0]
	if !reflect.DeepEqual(s.Tables, []string{"Mixed Case.Weird.Table"}) || !reflect.DeepEqual(s.GroupColumns, map[string][]string{"Mixed Case.Weird.Table": {"Col Name", "org"}}) ||
		s.InitialBackfill.Tables[0].Table != "Mixed Case.Weird.Table" {
		t.Errorf("sink: tables %q, group_columns %q, initial_backfill %+v", s.Tables, s.GroupColumns, s.InitialBackfill)
	}
	_, err = config.Parse([]byte(strings.Replace(minimal, "tables: [users, sales.orders]", `tables: [users, 'my table', '"open']`, 1)))
	if err == nil || !strings.Contains(err.Error(), `source.tables[1]: "my table": "my table" is not a plain name`) || !strings.Contains(err.Error(), "source.tables[2]") {
		t.Errorf("bad table names: %v", err)
	}
}

// TestCheckWhere: a where stays one condition.
func TestCheckWhere(t *testing.T) {
	for _, ok := range []string{"", "id > 5", "(a = 1 OR b = 'x;y') AND c IS NULL", `"Col Name" = 'it''s'`, "s$1 > 0", "f(g(x)) = ')'"} {
		if err := config.CheckWhere(ok); err != nil {
			t.Errorf("config.CheckWhere(%q): %v", ok, err)
		}
	}
	for in, want := range map[string]string{
		"a; DROP TABLE t":                "holds ';'",
		"true) UNION ALL SELECT 1 --":    "closes more",
		"a = 1 -- x":                     "comment",
		"a = 1 /* x */":                  "comment",
		"(a = 1":                         "not closed",
		"a = 'x":                         "quote is not closed",
		"a = $$x$$":                      "dollar quotes",
		"a = $1":                         "dollar quotes",
		`a = E'\' ) UNION SELECT 1 -- '`: "backslashes",
	} {
		if err := config.CheckWhere(in); err == nil || !errors.Is(err, config.ErrBadWhere) || !strings.Contains(err.Error(), want) {
			t.Errorf("config.CheckWhere(%q) = %v, want %q", in, err, want)
		}
	}
}

// TestNATSSecretsFromEnv: the NATS password and token come from the
// environment or a file, never from the config file.
func TestNATSSecretsFromEnv(t *testing.T) {
	pw := filepath.Join(t.TempDir(), "pw")
	if err := os.WriteFile(pw, []byte("from-file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PGS2_NATS_PASSWORD", "")
	t.Setenv("PGS2_NATS_PASSWORD_FILE", pw)
	t.Setenv("PGS2_NATS_TOKEN", "tok")
	c, err := config.Parse([]byte(strings.Replace(minimal, "url: nats://127.0.0.1:4222", "url: nats://127.0.0.1:4222\n  user: pgs2", 1)))
	if err == nil || !strings.Contains(err.Error(), "give one way") {
		t.Fatalf("a user and a token: %v", err)
	}
	t.Setenv("PGS2_NATS_TOKEN", "")
	c, err = config.Parse([]byte(strings.Replace(minimal, "url: nats://127.0.0.1:4222", "url: nats://127.0.0.1:4222\n  user: pgs2", 1)))
	if err != nil || c.NATS.Password != "from-file" {
		t.Fatalf("password from PGS2_NATS_PASSWORD_FILE: %q, %v", c.NATS.Password, err)
	}
}
