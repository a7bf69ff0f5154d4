package capture_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgs2/pgs2/pkg/backfill"
	"github.com/pgs2/pgs2/pkg/backfill/backfilltest"
	"github.com/pgs2/pgs2/pkg/capture"
	"github.com/pgs2/pgs2/pkg/change"
	"github.com/pgs2/pgs2/pkg/config"
	"github.com/pgs2/pgs2/pkg/ctl"
	"github.com/pgs2/pgs2/pkg/delivery"
	"github.com/pgs2/pgs2/pkg/seed"
)

// pgs2ctl runs the command line against the admin API at addr and returns
// its exit code and output.
func pgs2ctl(t *testing.T, addr string, args ...string) (int, string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code := ctl.Run(context.Background(), append([]string{"--admin", addr}, args...), &out, &errOut)
	return code, out.String() + errOut.String()
}

// readsOf keeps the changes that are not reads, and the reads of job.
func readsOf(changes []got, job string) []got {
	var out []got
	for _, g := range changes {
		if g.Msg.Action != change.Read || string(g.Entry.Backfill) == job {
			out = append(out, g)
		}
	}
	return out
}

// TestBackfillControl: backfills started from the config (once) and with
// pgs2ctl through the admin API, paused, resumed and cancelled while a
// workload writes the table; the resumed one still replays to the table's
// content, the cancelled one reads no more, the initial one reads only the
// rows its where selects and is not run again by the next capture.
func TestBackfillControl(t *testing.T) {
	const rows = 20_000
	t.Setenv("USER", "ada") // pgs2ctl's operator
	rnd, s := seed.Rand(t)
	e := newEnv(t, fmt.Sprintf(backfilltest.ItemsSQL, rows), "public.items", "public.done")
	sinks := []config.Sink{{Name: "s", Tables: []string{"public.items"}}, {Name: "t", Tables: []string{"public.items"}},
		{Name: "u", Tables: []string{"public.items", "public.done"}}}
	e.cfg.Backfill = capture.BackfillConfig{ChunkSize: 200, MaxRowsPerSecond: 10_000,
		SinkTables: map[string][]string{"s": {"public.items"}, "t": {"public.items"}, "u": {"public.items", "public.done"}},
		Initial:    []backfill.Job{{ID: capture.InitialBackfillID("u"), Sink: "u", Tables: []backfill.TableSpec{{Table: "items", Where: "id % 2 = 0"}}}}}
	stopCapture := e.run(t)
	ctx := context.Background()
	admin, err := delivery.NewAdmin(ctx, e.js, 1)
	if err != nil {
		t.Fatal(err)
	}
	admin.SetSinks(sinks)
	mux := http.NewServeMux()
	admin.Register(mux)
	api := httptest.NewServer(mux)
	defer api.Close()
	addr := strings.TrimPrefix(api.URL, "http://")
	store := e.backfills(t)
	stop := make(chan struct{})
	wait := backfilltest.Workload(t, e.pg.DSN("app"), rows, rand.New(rand.NewPCG(s, 9)), stop)

	// Mistakes are refused with what to do.
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"backfill", "start", "--sink", "nope"}, 1, `sink "nope" is not in the config; sinks: s, t, u`},
		{[]string{"backfill", "start", "--sink", "s", "--table", "public.done"}, 1, "public.done is not a table of sink s"},
		{[]string{"backfill", "start", "--sink", "s", "--where", "id > 1"}, 2, "--where needs exactly one --table"},
		{[]string{"backfill", "start"}, 2, "needs --sink"},
		{[]string{"backfill", "pause", "missing"}, 1, "no backfill missing"},
		{[]string{"backfill", "frobnicate"}, 2, `unknown command "frobnicate"`},
	} {
		if code, out := pgs2ctl(t, addr, c.args...); code != c.code || !strings.Contains(out, c.want) {
			t.Errorf("pgs2ctl %v: exit %d, %q; want exit %d and %q", c.args, code, out, c.code, c.want)
		}
	}

	if code, out := pgs2ctl(t, addr, "backfill", "start", "--sink", "s", "--id", "bf", "--max-rows-per-second", "4000"); code != 0 || !strings.Contains(out, "started backfill bf") {
		t.Fatalf("start: exit %d: %s", code, out)
	}
	if code, out := pgs2ctl(t, addr, "backfill", "start", "--sink", "t", "--table", "items", "--id", "bf2", "--max-rows-per-second", "2000"); code != 0 {
		t.Fatalf("start: exit %d: %s", code, out)
	}
	// Pause bf once a seeded share is read: it stops reading.
	at := int64(1000 + rnd.IntN(rows/2))
	for {
		p, _, err := store.Progress(ctx, "bf", "app", "public.items")
		if err != nil {
			t.Fatal(err)
		}
		if p.Rows >= at {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	if code, out := pgs2ctl(t, addr, "backfill", "pause", "bf"); code != 0 || !strings.Contains(out, "paused") {
		t.Fatalf("pause: exit %d: %s", code, out)
	}
	paused := waitProgress(t, store, "bf", "public.items", backfill.Paused)
	time.Sleep(300 * time.Millisecond) // a window to read in, had it not paused
	if p, _, _ := store.Progress(ctx, "bf", "app", "public.items"); p.Rows != paused.Rows || p.State != backfill.Paused {
		t.Fatalf("paused at %d rows, %d rows (%s) later", paused.Rows, p.Rows, p.State)
	}
	code, out := pgs2ctl(t, addr, "backfill", "status")
	if code != 0 || !strings.Contains(out, "bf") || !strings.Contains(out, "public.items") || !strings.Contains(out, "paused") || !strings.Contains(out, "[#") {
		t.Fatalf("status: exit %d:\n%s", code, out)
	}
	t.Logf("status while paused:\n%s", out)
	code, out = pgs2ctl(t, addr, "backfill", "status", "bf", "--json")
	var st struct {
		Backfills []struct {
			ID       string `json:"id"`
			State    string `json:"state"`
			Progress []struct {
				Table string `json:"table"`
				Rows  string `json:"rows"`
			} `json:"progress"`
		} `json:"backfills"`
	}
	if err := json.Unmarshal([]byte(out), &st); code != 0 || err != nil || len(st.Backfills) != 1 || st.Backfills[0].State != "paused" ||
		len(st.Backfills[0].Progress) != 1 || st.Backfills[0].Progress[0].Rows != fmt.Sprint(paused.Rows) {
		t.Fatalf("status --json: exit %d, %v:\n%s", code, err, out)
	}

	// Cancel bf2: it stops for good.
	if code, out := pgs2ctl(t, addr, "backfill", "cancel", "bf2"); code != 0 || !strings.Contains(out, "cancelled") {
		t.Fatalf("cancel: exit %d: %s", code, out)
	}
	cancelled := waitProgress(t, store, "bf2", "public.items", backfill.Cancelled)
	if code, out := pgs2ctl(t, addr, "backfill", "resume", "bf2"); code != 1 || !strings.Contains(out, "cancelled already") {
		t.Fatalf("resume of a cancelled backfill: exit %d: %s", code, out)
	}

	if code, out := pgs2ctl(t, addr, "backfill", "resume", "bf"); code != 0 || !strings.Contains(out, "resumed") {
		t.Fatalf("resume: exit %d: %s", code, out)
	}
	done := waitProgress(t, store, "bf", "public.items", backfill.Done)
	initial := waitProgress(t, store, "initial-u", "public.items", backfill.Done)
	// The audit stream records who did what.
	for sink, want := range map[string]string{"s": "backfill start bf ada; backfill pause bf ada; backfill resume bf ada",
		"t": "backfill start bf2 ada; backfill cancel bf2 ada"} {
		resp, err := http.Get(api.URL + "/v1/sinks/" + sink + "/audit")
		if err != nil {
			t.Fatal(err)
		}
		var audit struct {
			Records []struct{ ID, Operator, Action string } `json:"records"`
		}
		err = json.NewDecoder(resp.Body).Decode(&audit)
		resp.Body.Close()
		var got []string
		for _, r := range audit.Records {
			got = append(got, r.Action+" "+r.ID+" "+r.Operator)
		}
		if err != nil || strings.Join(got, "; ") != want {
			t.Errorf("audit of sink %s: %q (%v), want %q", sink, strings.Join(got, "; "), err, want)
		}
	}
	code, out = pgs2ctl(t, addr, "backfill", "status", "--sink", "s", "--watch")
	if code != 0 || !strings.Contains(out, "done") || !strings.Contains(out, "100%") || strings.Contains(out, "bf2") {
		t.Fatalf("status --watch of finished backfills: exit %d:\n%s", code, out)
	}
	close(stop)
	wait()

	changes := e.allWritten(t)
	state, reads, _ := replayItems(t, readsOf(changes, "bf"), "bf")
	backfilltest.Compare(t, s, state, backfilltest.TableItems(t, e.pg.DSN("app")))
	counts := map[string]int{}
	for _, g := range changes {
		if g.Msg.Action != change.Read {
			continue
		}
		job := string(g.Entry.Backfill)
		counts[job]++
		if want := map[string]string{"bf": "s", "bf2": "t", "initial-u": "u"}[job]; string(g.Entry.Sink) != want {
			t.Fatalf("a read of %s for sink %q, want %q", job, g.Entry.Sink, want)
		}
		if job == "initial-u" && int(g.Msg.Record["id"].(float64))%2 != 0 {
			t.Fatalf("initial-u read row %v: its where selects even ids", g.Msg.Record["id"])
		}
	}
	t.Logf("reads: %v; bf paused at %d and read %d rows, bf2 cancelled at %d, initial-u read %d", counts, paused.Rows, done.Rows, cancelled.Rows, initial.Rows)
	if counts["bf"] != reads || int64(counts["bf2"]) > cancelled.Rows || cancelled.Rows >= rows || counts["initial-u"] < rows/4 {
		t.Fatalf("reads %v (bf replays as %d distinct reads): bf2 cancelled at %d rows", counts, reads, cancelled.Rows)
	}

	// The next capture does not run the initial backfill again.
	if err := stopCapture(); err != nil {
		t.Fatal(err)
	}
	e.run(t)
	e.pg.MustExec(t, "app", `DELETE FROM done`)
	after := e.allWritten(t)
	n := 0
	for _, g := range after {
		if g.Msg.Action == change.Read && string(g.Entry.Backfill) == "initial-u" {
			n++
		}
	}
	if n != counts["initial-u"] {
		t.Fatalf("initial-u: %d reads after a restart of capture, %d before", n, counts["initial-u"])
	}
}

// TestBackfillFromConfig: source.backfill and the sinks' initial_backfill
// reach capture's backfill settings.
func TestBackfillFromConfig(t *testing.T) {
	c, err := config.Parse([]byte(`
source:
  name: app
  dsn: postgres://replicator@localhost:5432/app
  tables: [users, sales.orders]
  backfill: {chunk_size: 250, statement_timeout: 2s, max_rows_per_second: 900}
nats: {url: "nats://127.0.0.1:4222"}
sinks:
  - {name: all, tables: [users, sales.orders], basin: my-basin, stream: s, initial_backfill: true}
  - {name: some, tables: [users, sales.orders], basin: my-basin, stream: s, initial_backfill: [{table: sales.orders, where: "id > 5"}]}
  - {name: none, tables: [users], basin: my-basin, stream: s, initial_backfill: false}
  - {name: unset, tables: [users], basin: my-basin, stream: s}
`))
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := capture.FromConfig(c)
	if err != nil {
		t.Fatal(err)
	}
	b := cfg.Backfill
	if b.ChunkSize != 250 || b.StatementTimeout != 2*time.Second || b.MaxRowsPerSecond != 900 {
		t.Errorf("backfill settings %+v", b)
	}
	if got := fmt.Sprint(b.SinkTables); got != "map[all:[public.users sales.orders] none:[public.users] some:[public.users sales.orders] unset:[public.users]]" {
		t.Errorf("sink tables %s", got)
	}
	if len(b.Initial) != 2 {
		t.Fatalf("initial backfills %+v, want all's and some's", b.Initial)
	}
	if j := b.Initial[0]; j.ID != "initial-all" || j.Sink != "all" || len(j.Tables) != 0 || j.By == "" {
		t.Errorf("initial backfill of all: %+v", j)
	}
	if j := b.Initial[1]; j.ID != "initial-some" || j.Sink != "some" || fmt.Sprint(j.Tables) != "[{sales.orders id > 5}]" {
		t.Errorf("initial backfill of some: %+v", j)
	}
}

// TestTablesAddedOnReload: a table added to the config is checked, added
// to the publication and captured from the reload on, without a restart
// of capture; its sink's initial backfill reads the rows it had. A table
// that does not exist is refused and the running config kept.
func TestTablesAddedOnReload(t *testing.T) {
	e := newEnv(t, `CREATE TABLE users (id int PRIMARY KEY); CREATE TABLE done (id int PRIMARY KEY)`, "public.users", "public.done")
	e.run(t)
	e.pg.MustExec(t, "app", `INSERT INTO users VALUES (1); CREATE TABLE orders (id int PRIMARY KEY); INSERT INTO orders VALUES (1)`)
	e.waitMessages(t, 1)
	ctx := context.Background()
	bad := e.cfg
	bad.Repl.Tables = []string{"public.users", "public.done", "public.nope"}
	if err := e.capture.Reload(ctx, bad); err == nil || !strings.Contains(err.Error(), "public.nope does not exist") {
		t.Fatalf("reload with a missing table: %v", err)
	}
	cfg := e.cfg
	cfg.Repl.Tables = []string{"public.users", "public.done", "public.orders"}
	cfg.Backfill = capture.BackfillConfig{SinkTables: map[string][]string{"o": {"public.orders"}},
		Initial: []backfill.Job{{ID: capture.InitialBackfillID("o"), Sink: "o"}}}
	if err := e.capture.Reload(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	store := e.backfills(t)
	e.pg.MustExec(t, "app", `INSERT INTO orders VALUES (2); INSERT INTO users VALUES (2)`)
	waitProgress(t, store, "initial-o", "public.orders", backfill.Done)
	var got []string
	for _, g := range e.allWritten(t) {
		if m := g.Msg; m.Metadata.TableName != "done" {
			got = append(got, fmt.Sprintf("%s %s %v", m.Metadata.TableName, m.Action, m.Record["id"]))
		}
	}
	slices.Sort(got) // the backfill's read and the inserts after the reload race
	if want := "orders insert 2; orders read 1; orders read 2; users insert 1; users insert 2"; strings.Join(got, "; ") != want &&
		strings.Join(got, "; ") != "orders insert 2; orders read 1; users insert 1; users insert 2" {
		t.Fatalf("changes: %s\nwant: %s (the read of row 2 only if the backfill began after its insert)", strings.Join(got, "; "), want)
	}
}

// TestTableAddedUnderLoad: inserts into a table run on while a reload adds
// it: from the first insert captured on, every later one is (the publication
// gains the table while the running session already decodes it), and every
// insert committed after the reload returned is there.
func TestTableAddedUnderLoad(t *testing.T) {
	e := newEnv(t, `CREATE TABLE users (id int PRIMARY KEY); CREATE TABLE orders (id int PRIMARY KEY); CREATE TABLE done (id int PRIMARY KEY)`,
		"public.users", "public.done")
	e.run(t)
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, e.pg.DSN("app"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var mu sync.Mutex
	committed := 0
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var failure error
	wg.Go(func() {
		for id := 1; ; id++ {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := conn.Exec(ctx, `INSERT INTO orders VALUES ($1)`, id); err != nil {
				failure = err
				return
			}
			mu.Lock()
			committed = id
			mu.Unlock()
		}
	})
	time.Sleep(100 * time.Millisecond) // inserts before the reload
	cfg := e.cfg
	cfg.Repl.Tables = []string{"public.users", "public.done", "public.orders"}
	if err := e.capture.Reload(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	after := committed + 1 // the first insert committed after the reload returned
	mu.Unlock()
	time.Sleep(200 * time.Millisecond)
	close(stop)
	wg.Wait()
	if failure != nil {
		t.Fatal(failure)
	}
	var ids []int
	for _, g := range e.allWritten(t) {
		if g.Msg.Metadata.TableName == "orders" {
			ids = append(ids, int(g.Msg.Record["id"].(float64)))
		}
	}
	if len(ids) == 0 || ids[0] > after || ids[len(ids)-1] != committed {
		t.Fatalf("orders inserts %d..%d captured (%d), want from at most %d to %d", ids[0], ids[len(ids)-1], len(ids), after, committed)
	}
	for i := 1; i < len(ids); i++ {
		if ids[i] != ids[i-1]+1 {
			t.Fatalf("insert %d missing after %d: every insert after the first captured one must be", ids[i-1]+1, ids[i-1])
		}
	}
	t.Logf("inserts %d..%d committed, %d..%d captured; the reload returned before %d", 1, committed, ids[0], ids[len(ids)-1], after)
}

// TestBackfillRefusesTableWithoutKey: a captured table without a primary
// key cannot be read in key order: its backfill fails with the fix.
func TestBackfillRefusesTableWithoutKey(t *testing.T) {
	e := newEnv(t, `CREATE TABLE nokey (a int, b text); ALTER TABLE nokey REPLICA IDENTITY FULL; INSERT INTO nokey VALUES (1, 'x')`, "public.nokey")
	e.cfg.Repl.GroupColumns = map[string][]string{"public.nokey": {"a"}}
	e.cfg.Backfill = capture.BackfillConfig{SinkTables: map[string][]string{"s": {"public.nokey"}}}
	e.run(t)
	ctx := context.Background()
	store := e.backfills(t)
	e.startBackfill(t, store, backfill.Job{ID: "bf", Sink: "s"})
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(20 * time.Millisecond) {
		p, _, err := store.Progress(ctx, "bf", "app", "public.nokey")
		if err != nil {
			t.Fatal(err)
		}
		if p.State == backfill.Failed {
			if !strings.Contains(p.Error, "no primary key") || !strings.Contains(p.Error, `ALTER TABLE "public"."nokey" ADD PRIMARY KEY`) {
				t.Fatalf("error %q does not name the problem and the fix", p.Error)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("backfill %+v, want failed", p)
		}
	}
	e.pg.MustExec(t, "app", `INSERT INTO nokey VALUES (2, 'y')`) // the live stream goes on
	if m := e.waitMessages(t, 1)[0].Msg; m.Action != change.Insert || backfilltest.Text(m.Record["a"]) != "2" {
		t.Fatalf("live change %+v", m)
	}
}

// leastPrivilegeSQL is what a DBA runs once for pgs2 (README): a login
// role with REPLICATION, the publication made by the tables' owner, SELECT
// for backfills, pg_read_all_stats for their staleness check.
const leastPrivilegeSQL = `CREATE ROLE pgs2 LOGIN REPLICATION;
	CREATE PUBLICATION pgs2 FOR TABLE items, done WITH (publish_via_partition_root = true);
	GRANT SELECT ON items, done TO pgs2;
	GRANT pg_read_all_stats TO pgs2`

// TestLeastPrivilegeRole: capture and a backfill work as a role with only
// the README's grants.
func TestLeastPrivilegeRole(t *testing.T) {
	e := newEnv(t, fmt.Sprintf(backfilltest.ItemsSQL, 500)+";"+leastPrivilegeSQL, "public.items", "public.done")
	e.cfg.Repl.DSN = strings.Replace(e.pg.DSN("app"), "postgres://postgres@", "postgres://pgs2@", 1)
	e.cfg.Backfill = capture.BackfillConfig{SinkTables: map[string][]string{"s": {"public.items"}}}
	e.run(t)
	store := e.backfills(t)
	e.startBackfill(t, store, backfill.Job{ID: "bf", Sink: "s"})
	waitProgress(t, store, "bf", "public.items", backfill.Done)
	e.pg.MustExec(t, "app", `UPDATE items SET ver = nextval('vers') WHERE id = 1`)
	reads, updates := 0, 0
	for _, g := range e.allWritten(t) {
		switch g.Msg.Action {
		case change.Read:
			reads++
		case change.Update:
			updates++
		}
	}
	if reads != 500 || updates != 1 {
		t.Fatalf("as the least-privileged role: %d reads, %d updates; want 500 and 1", reads, updates)
	}
}
