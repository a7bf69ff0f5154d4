package soak_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/s2-streamstore/s2-sdk-go/s2"

	"github.com/pgs2/pgs2/pkg/backfill"
	"github.com/pgs2/pgs2/pkg/backfill/backfilltest"
	"github.com/pgs2/pgs2/pkg/change"
	"github.com/pgs2/pgs2/pkg/ctl"
	"github.com/pgs2/pgs2/pkg/natstest"
	"github.com/pgs2/pgs2/pkg/pgtest"
	"github.com/pgs2/pgs2/pkg/proctest"
	"github.com/pgs2/pgs2/pkg/s2local"
	"github.com/pgs2/pgs2/pkg/s2sink"
)

// TestBackfillEndToEnd: a sink's initial backfill of a 200k-row table while a
// workload inserts, updates (keys too) and deletes its rows, through
// capture, router and delivery as processes into s2local, with capture,
// router and delivery SIGKILLed and Postgres restarted during it (in a
// seeded order, at seeded shares of the rows read). A second sink of the
// same tables gets no read. From S2 alone: replaying the backfilled sink's
// stream gives the table's final content, no read follows a newer change
// of its row or its delete, no record is there twice, the last read is
// marked; the other sink's stream holds the same live changes and
// nothing else.
func TestBackfillEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("process test: PostgreSQL, JetStream, s2local and three service processes under faults")
	}
	const rows = 200_000
	seed := seedFromEnv(t, "")
	rng := newRand(seed, 1)
	p := newPipeline(t, fmt.Sprintf(backfilltest.ItemsSQL, rows), func(dsn, natsURL, s2URL string) string {
		sink := func(name string, extra string) string {
			return fmt.Sprintf("  - {name: %s, tables: [public.items, public.done], basin: %s, stream: %s, endpoint: %q, create_stream: true, "+
				"batch: {linger: 5ms}, retry: {initial: 50ms, max: 1s}%s}\n", name, soakBasin, name, s2URL, extra)
		}
		return fmt.Sprintf(`source: {name: app, dsn: %q, slot: pgs2, publication: pgs2, tables: [public.items, public.done],
  backfill: {max_rows_per_second: 20000}}
nats: {url: %q, replicas: 1, partitions: 8}
sinks:
`, dsn, natsURL) + sink("bf", ", initial_backfill: true") + sink("live", "")
	})
	pg, js, svcs, all := p.pg, p.js, p.svcs, p.all
	ctx := context.Background()
	store, err := backfill.Ensure(ctx, js, 1)
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	wait := backfilltest.Workload(t, pg.DSN("app"), rows, newRand(seed, 2), stop)

	// The faults, in a seeded order, each at a seeded share of the rows.
	faults := []string{"capture", "router", "delivery", "postgres"}
	rng.Shuffle(len(faults), func(i, j int) { faults[i], faults[j] = faults[j], faults[i] })
	var at []int64
	for range faults {
		at = append(at, int64(rows/10+rng.IntN(rows*7/10)))
	}
	slices.Sort(at)
	t.Logf("faults %v at %v rows read", faults, at)
	deadline := time.Now().Add(5 * time.Minute)
	var prog backfill.Progress
	for i := 0; prog.State != backfill.Done; {
		if time.Now().After(deadline) {
			t.Fatalf("backfill not done after 5 minutes: %+v", prog)
		}
		checkAlive(t, all)
		prog, _, err = store.Progress(ctx, "initial-bf", "app", "public.items")
		if err != nil {
			t.Fatal(err)
		}
		if prog.State == backfill.Failed {
			t.Fatalf("backfill failed: %s", prog.Error)
		}
		if i < len(faults) && prog.Rows >= at[i] {
			t.Logf("%s at %d rows read", faults[i], prog.Rows)
			if s := svcs[faults[i]]; s != nil {
				s.kill()
				s.start(t)
			} else if err := pg.Restart(ctx); err != nil {
				t.Fatal(err)
			}
			i++
		}
		time.Sleep(10 * time.Millisecond)
	}
	close(stop)
	writes := wait()

	// Groups interleave in S2 in their own way, so a sentinel does not
	// mark the end: read until both streams hold it, the backfilled one
	// replays to the table and the other holds the same live changes.
	// (Order, duplicates and stale reads are checked on every pass:
	// they do not heal.)
	pg.MustExec(t, "app", `INSERT INTO done VALUES (1)`)
	want := backfilltest.TableItems(t, pg.DSN("app"))
	sdk := s2Client(p.s2URL)
	var reads, lasts int
	var liveKeys []string
	for end := time.Now().Add(time.Minute); ; {
		bf, live := readChanges(t, sdk, "bf"), readChanges(t, sdk, "live")
		var cs []backfilltest.Change
		var bfLive []string
		for _, c := range bf {
			cs = append(cs, c.Change)
			if c.Action != change.Read {
				bfLive = append(bfLive, c.key)
			}
		}
		var state map[string]string
		state, reads, lasts = backfilltest.Replay(t, cs, "initial-bf", "")
		liveKeys = liveKeys[:0]
		for _, c := range live {
			if c.Action == change.Read || c.Backfill != "" {
				t.Fatalf("sink live got a read of backfill %q: %v", c.Backfill, c.Record)
			}
			liveKeys = append(liveKeys, c.key)
		}
		slices.Sort(liveKeys)
		slices.Sort(bfLive)
		diff := backfilltest.Diff(state, want)
		if holds(bf, "done") && holds(live, "done") && len(diff) == 0 && slices.Equal(liveKeys, bfLive) {
			break
		}
		if time.Now().After(end) {
			backfilltest.Compare(t, seed, state, want)
			t.Fatalf("after a minute: sentinel in bf %v, in live %v; live changes %d in live, %d in bf", holds(bf, "done"), holds(live, "done"), len(liveKeys), len(bfLive))
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("%d reads (%d rows read), %d writes, %d live changes; service logs: capture %s | router %s | delivery %s",
		reads, prog.Rows, writes, len(liveKeys), svcs["capture"].logSummary(), svcs["router"].logSummary(), svcs["delivery"].logSummary())
	if lasts != 1 || reads < rows/2 {
		t.Fatalf("%d reads, %d marked last", reads, lasts)
	}
}

// pipeline is one source database (app), a JetStream, s2local over HTTP
// (basin soakBasin) and capture, router and delivery as processes.
type pipeline struct {
	pg    *pgtest.Instance
	js    jetstream.JetStream
	s2URL string
	svcs  map[string]*svc
	all   []*svc
}

// newPipeline creates database app with setupSQL, writes the config that
// config returns and starts the services.
func newPipeline(t *testing.T, setupSQL string, config func(dsn, natsURL, s2URL string) string) *pipeline {
	t.Helper()
	p := &pipeline{pg: pgtest.New(t), svcs: map[string]*svc{}}
	p.pg.MustExec(t, "postgres", "CREATE DATABASE app")
	p.pg.MustExec(t, "app", setupSQL)
	ns := natstest.New(t)
	s2, err := s2local.New(s2local.Options{DataDir: filepath.Join(t.TempDir(), "s2"), Basins: []string{soakBasin}, Logger: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(s2)
	t.Cleanup(func() { hs.Close(); s2.Close() })
	p.s2URL = hs.URL
	cfg := filepath.Join(t.TempDir(), "pgs2.yaml")
	writeFile(t, cfg, config(p.pg.DSN("app"), ns.URL(), hs.URL))
	for _, name := range []string{"capture", "router", "delivery"} {
		p.svcs[name] = &svc{name: name, bin: proctest.Build(t, servicePath(name)), cfg: cfg}
		p.all = append(p.all, p.svcs[name])
	}
	for _, s := range p.all {
		s.start(t)
	}
	nc, err := nats.Connect(ns.URL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	p.js, _ = jetstream.New(nc)
	return p
}

// s2Change is one record of a sink's S2 stream.
type s2Change struct {
	backfilltest.Change
	key      string // idempotency key
	table    string // the table header
	metadata change.Metadata
}

func s2Client(endpoint string) *s2.Client {
	base := endpoint + "/v1"
	return s2.New("local", &s2.ClientOptions{BaseURL: base, MakeBasinBaseURL: func(string) string { return base }, RequestTimeout: 10 * time.Second})
}

// readChanges reads a stream of the soak basin from its start to its tail,
// failing the test on a record that is not a change or is there twice.
func readChanges(t *testing.T, sdk *s2.Client, stream string) []s2Change {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var out []s2Change
	seen := map[string]bool{}
	clamp := true
	for next := uint64(0); ; {
		count := uint64(1000)
		b, err := sdk.Basin(soakBasin).Stream(s2.StreamName(stream)).Read(ctx, &s2.ReadOptions{SeqNum: &next, Count: &count, Clamp: &clamp})
		var se *s2.S2Error
		if errors.As(err, &se) && (se.Status == 416 || se.Status == 404) {
			return out // at the tail, or not yet created
		}
		if err != nil {
			t.Fatalf("read %s: %v", stream, err)
		}
		if len(b.Records) == 0 {
			return out
		}
		for _, r := range b.Records {
			next = r.SeqNum + 1
			if len(r.Headers) == 1 && len(r.Headers[0].Name) == 0 {
				continue // a command record (fence)
			}
			var m change.Message
			if err := json.Unmarshal(r.Body, &m); err != nil {
				t.Fatalf("%s record %d is not a change: %v", stream, r.SeqNum, err)
			}
			c := s2Change{Change: backfilltest.Change{Action: m.Action, Table: m.Metadata.TableName, Record: m.Record, Changes: m.Changes},
				key: m.Metadata.IdempotencyKey, metadata: m.Metadata}
			for _, h := range r.Headers {
				switch string(h.Name) {
				case s2sink.HeaderTable:
					c.table = string(h.Value)
				case s2sink.HeaderBackfill:
					c.Backfill = string(h.Value)
				case s2sink.HeaderBackfillLast:
					c.Last = string(h.Value) == "true"
				}
			}
			if seen[c.key] {
				t.Fatalf("%s: record %d (%s) is there twice", stream, r.SeqNum, c.key)
			}
			seen[c.key] = true
			out = append(out, c)
		}
	}
}

// holds reports whether cs holds a live change of table.
func holds(cs []s2Change, table string) bool {
	for _, c := range cs {
		if c.Table == table && c.Action != change.Read {
			return true
		}
	}
	return false
}

// TestQuotedNamesEndToEnd: a table whose schema, name and columns need
// quotes, named in the config as Postgres writes it (source, sink tables,
// group_columns, initial_backfill) and in pgs2ctl backfill --table, through
// the three services into S2: backfilled, inserted, updated (moving to
// another group), deleted.
func TestQuotedNamesEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("process test: PostgreSQL, JetStream, s2local and three service processes")
	}
	const table = `'"Mixed Case"."Weird.Table"'`
	p := newPipeline(t, `CREATE SCHEMA "Mixed Case";
		CREATE TABLE "Mixed Case"."Weird.Table" ("Item Id" int PRIMARY KEY, "Col Name" text, org int);
		ALTER TABLE "Mixed Case"."Weird.Table" REPLICA IDENTITY FULL;
		INSERT INTO "Mixed Case"."Weird.Table" VALUES (1, 'one', 10), (2, 'two', 20), (3, 'three', 10)`,
		func(dsn, natsURL, s2URL string) string {
			return fmt.Sprintf(`source: {name: app, dsn: %q, tables: [%s]}
nats: {url: %q, partitions: 8}
sinks:
  - name: odd
    tables: [%s]
    basin: %s
    stream: odd
    endpoint: %q
    create_stream: true
    group_columns: {%s: ['"Col Name"']}
    initial_backfill: [%s]
    batch: {linger: 5ms}
`, dsn, table, natsURL, table, soakBasin, s2URL, table, table)
		})
	sdk := s2Client(p.s2URL)
	wait := func(n int) []s2Change {
		t.Helper()
		for end := time.Now().Add(time.Minute); ; {
			cs := readChanges(t, sdk, "odd")
			if len(cs) >= n {
				if len(cs) > n {
					t.Fatalf("%d records in S2, want %d: %+v", len(cs), n, cs)
				}
				return cs
			}
			if time.Now().After(end) {
				t.Fatalf("%d records in S2 after a minute, want %d: %+v", len(cs), n, cs)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	wait(3) // the initial backfill
	p.pg.MustExec(t, "app", `INSERT INTO "Mixed Case"."Weird.Table" VALUES (4, 'four', 30)`)
	p.pg.MustExec(t, "app", `UPDATE "Mixed Case"."Weird.Table" SET "Col Name" = 'uno' WHERE "Item Id" = 1`)
	p.pg.MustExec(t, "app", `DELETE FROM "Mixed Case"."Weird.Table" WHERE "Item Id" = 2`)
	wait(7)
	code, out := pgs2ctl(t, p.svcs["delivery"].proc.Addr, "backfill", "start", "--sink", "odd", "--table", `"Mixed Case"."Weird.Table"`,
		"--where", `"Item Id" > 2`, "--id", "again")
	if code != 0 {
		t.Fatalf("pgs2ctl backfill start: exit %d: %s", code, out)
	}
	cs := wait(9)
	type rec struct{ action, backfill, name string }
	var got []rec
	for _, c := range cs {
		if c.metadata.TableSchema != "Mixed Case" || c.metadata.TableName != "Weird.Table" || c.table != "Mixed Case.Weird.Table" {
			t.Fatalf("record %+v: metadata %+v, table header %q", c.Change, c.metadata, c.table)
		}
		if _, ok := c.Record["Item Id"]; !ok {
			t.Fatalf("record without its \"Item Id\": %v", c.Record)
		}
		got = append(got, rec{string(c.Action), c.Backfill, fmt.Sprint(c.Record["Item Id"], "/", c.Record["Col Name"])})
	}
	// Groups (by "Col Name") interleave freely in S2: compare as sets, then
	// the order of the group "one" (the moved row's old group).
	want := []rec{{"read", "initial-odd", "1/one"}, {"read", "initial-odd", "2/two"}, {"read", "initial-odd", "3/three"},
		{"insert", "", "4/four"}, {"delete", "", "1/one"}, {"insert", "", "1/uno"}, {"delete", "", "2/two"},
		{"read", "again", "3/three"}, {"read", "again", "4/four"}}
	key := func(r rec) string { return r.action + " " + r.backfill + " " + r.name }
	sorted := func(rs []rec) []string {
		var out []string
		for _, r := range rs {
			out = append(out, key(r))
		}
		slices.Sort(out)
		return out
	}
	if !slices.Equal(sorted(got), sorted(want)) {
		t.Fatalf("S2 holds\n%v\nwant\n%v", sorted(got), sorted(want))
	}
	var one []string
	for _, r := range got {
		if strings.HasSuffix(r.name, "/one") {
			one = append(one, r.action)
		}
	}
	if !slices.Equal(one, []string{"read", "delete"}) {
		t.Fatalf("group one: %v, want read then delete", one)
	}
}

// pgs2ctl runs the command line against the admin API at addr.
func pgs2ctl(t *testing.T, addr string, args ...string) (int, string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code := ctl.Run(context.Background(), append([]string{"--admin", addr}, args...), &out, &errOut)
	return code, out.String() + errOut.String()
}
