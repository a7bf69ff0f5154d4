package capture_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/pgs2/pgs2/pkg/backfill"
	"github.com/pgs2/pgs2/pkg/capture"
	"github.com/pgs2/pgs2/pkg/change"
	"github.com/pgs2/pgs2/pkg/pgrepl"
	"github.com/pgs2/pgs2/pkg/proctest"
	"github.com/pgs2/pgs2/pkg/seed"
	"github.com/pgs2/pgs2/pkg/telemetry"
)

func TestActionsAndMetadata(t *testing.T) {
	e := newEnv(t, `CREATE TABLE users (id int PRIMARY KEY, name text, org int)`, "public.users")
	stop := e.run(t)
	e.pg.MustExec(t, "app", `INSERT INTO users VALUES (7, 'Ad', 1)`)
	e.pg.MustExec(t, "app", `BEGIN; UPDATE users SET name = 'Ada' WHERE id = 7; DELETE FROM users WHERE id = 7; COMMIT`)
	msgs := e.waitMessages(t, 3)
	if err := stop(); err != nil {
		t.Fatalf("clean stop: %v", err)
	}

	ins, upd, del := msgs[0].Msg, msgs[1].Msg, msgs[2].Msg
	if ins.Action != change.Insert || upd.Action != change.Update || del.Action != change.Delete {
		t.Fatalf("actions %s %s %s", ins.Action, upd.Action, del.Action)
	}
	if got := string(mustJSON(t, ins.Record)); got != `{"id":7,"name":"Ad","org":1}` {
		t.Errorf("insert record %s", got)
	}
	if ins.Changes != nil || !strings.Contains(string(msgs[0].Raw), `"changes":null`) {
		t.Errorf("insert changes should be null: %s", msgs[0].Raw)
	}
	if got := string(mustJSON(t, upd.Record)); got != `{"id":7,"name":"Ada","org":1}` {
		t.Errorf("update record %s", got)
	}
	if !strings.Contains(string(msgs[1].Raw), `"changes":{}`) {
		t.Errorf("update without old row should have changes {}: %s", msgs[1].Raw)
	}
	if got := string(mustJSON(t, del.Record)); got != `{"id":7}` {
		t.Errorf("delete record (default identity: the key) %s", got)
	}
	m := upd.Metadata
	if m.TableSchema != "public" || m.TableName != "users" || m.DatabaseName != "app" || m.CommitIdx != 0 ||
		len(m.RecordPKs) != 1 || m.RecordPKs[0] != "7" || string(m.TransactionAnnotations) != "null" {
		t.Errorf("update metadata %+v", m)
	}
	if del.Metadata.CommitLSN != m.CommitLSN || del.Metadata.CommitIdx != 1 {
		t.Errorf("delete in the same tx: lsn %d idx %d, update lsn %d", del.Metadata.CommitLSN, del.Metadata.CommitIdx, m.CommitLSN)
	}
	for _, g := range msgs {
		want := change.Position{LSN: g.Msg.Metadata.CommitLSN, Idx: g.Msg.Metadata.CommitIdx}.Key()
		if g.Msg.Metadata.IdempotencyKey != want || g.Header.Get("Pgs2-Msg-Id") != want {
			t.Errorf("idempotency key %q header %q, want %q", g.Msg.Metadata.IdempotencyKey, g.Header.Get("Pgs2-Msg-Id"), want)
		}
		if g.Header.Get("Pgs2-Group") != `["7"]` {
			t.Errorf("group header %q", g.Header.Get("Pgs2-Group"))
		}
		if !strings.HasPrefix(g.Subject, "pgs2.changes.app.") || strings.Count(g.Subject, ".") != 3 {
			t.Errorf("subject %q, want pgs2.changes.app.<partition>", g.Subject)
		}
		if string(g.Entry.Table) != "public.users" || string(g.Entry.Schema) != "public" {
			t.Errorf("entry of table %q, schema %q, want public.users, public", g.Entry.Table, g.Entry.Schema)
		}
		if len(g.Msg.Metadata.CommitTimestamp) != len("2026-11-22T10:00:00.123456Z") || !strings.HasSuffix(g.Msg.Metadata.CommitTimestamp, "Z") {
			t.Errorf("commit_timestamp %q", g.Msg.Metadata.CommitTimestamp)
		}
	}
	if msgs[0].Subject != msgs[1].Subject {
		t.Errorf("one group, two subjects: %s %s", msgs[0].Subject, msgs[1].Subject)
	}
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestTraceContext: each change carries the traceparent of its
// transaction's span, so router and delivery continue one trace.
func TestTraceContext(t *testing.T) {
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	e := newEnv(t, `CREATE TABLE users (id int PRIMARY KEY)`, "public.users")
	e.opts = append(e.opts, capture.WithTracer(tp.Tracer("test")))
	e.run(t)
	e.pg.MustExec(t, "app", `INSERT INTO users VALUES (1), (2)`)
	e.pg.MustExec(t, "app", `INSERT INTO users VALUES (3)`)
	msgs := e.waitMessages(t, 3)
	spans := rec.Ended()
	if len(spans) != 2 {
		t.Fatalf("%d transaction spans ended, want 2", len(spans))
	}
	want := []string{telemetry.TraceParent(spans[0].SpanContext()), telemetry.TraceParent(spans[0].SpanContext()), telemetry.TraceParent(spans[1].SpanContext())}
	for i, m := range msgs {
		if got := m.Header.Get("traceparent"); got != want[i] || got == "" {
			t.Errorf("message %d traceparent %q, want %q", i, got, want[i])
		}
	}
}

// TestInterruptedRound: capture dies after publishing 3 of a round's
// messages; the next session publishes the rest of the round's changes,
// none twice.
func TestInterruptedRound(t *testing.T) {
	e := newEnv(t, `CREATE TABLE users (id int PRIMARY KEY, v int)`, "public.users")
	e.opts = append(e.opts, capture.WithCrashAfter(3))
	e.run(t)
	e.pg.MustExec(t, "app", `INSERT INTO users SELECT g, 0 FROM generate_series(1, 40) g`) // one round over 8 partitions
	msgs := e.waitMessages(t, 40)                                                          // fails on a change stored twice
	for i, m := range msgs {
		if m.Msg.Metadata.CommitIdx != i {
			t.Fatalf("change %d has commit_idx %d", i, m.Msg.Metadata.CommitIdx)
		}
	}
	bySeq := map[uint64]string{}
	for _, m := range msgs {
		bySeq[m.Seq] = m.Header.Get("Pgs2-Round")
	}
	if !strings.HasSuffix(bySeq[3], "/8") || bySeq[3][0] != '3' || bySeq[4][0] != '1' {
		t.Fatalf("rounds by message: %v; want the interrupted round's 3 messages, then a new round", bySeq)
	}
}

// TestInterruptedRoundsInARow: the round that completes an interrupted
// one is cut short too; the third session still stores every change once
// (d7607e1 stored the first round's changes again).
func TestInterruptedRoundsInARow(t *testing.T) {
	e := newEnv(t, `CREATE TABLE users (id int PRIMARY KEY, v int)`, "public.users")
	e.opts = append(e.opts, capture.WithCrashAfter(3, 2))
	e.run(t)
	e.pg.MustExec(t, "app", `INSERT INTO users SELECT g, 0 FROM generate_series(1, 40) g`)
	msgs := e.waitMessages(t, 40) // fails on a change stored twice
	seen := map[int]bool{}
	for _, m := range msgs {
		if seen[m.Msg.Metadata.CommitIdx] {
			t.Fatalf("change %d stored twice", m.Msg.Metadata.CommitIdx)
		}
		seen[m.Msg.Metadata.CommitIdx] = true
	}
}

// TestInterruptedRoundsAcrossTransactions: rounds of several transactions
// are cut short, one session after another, and the sessions after a cut
// end their rounds at other commits than the cut one did: every change is
// stored once and in order. The first run is the case that lost and
// duplicated changes (the round completing a cut one ended before the cut
// one's last change, and the next was named as itself); the others are
// seeded.
func TestInterruptedRoundsAcrossTransactions(t *testing.T) {
	e := newEnv(t, "")
	e.cfg.Linger = 100 * time.Millisecond // rounds end at the commits the test chooses
	rng, _ := seed.Rand(t)
	type plan struct {
		txs, rows      int   // transactions, and rows of each (at most)
		perRound, cuts []int // per session
	}
	plans := []plan{{txs: 20, rows: 4, perRound: []int{20, 1}, cuts: []int{3, 2}}}
	for range 7 {
		p := plan{txs: 5 + rng.IntN(30), rows: 1 + rng.IntN(5)}
		for range 1 + rng.IntN(3) {
			p.perRound = append(p.perRound, 1+rng.IntN(p.txs))
			p.cuts = append(p.cuts, rng.IntN(10))
		}
		plans = append(plans, p)
	}
	for i, p := range plans {
		table := fmt.Sprintf("t%d", i)
		e.pg.MustExec(t, "app", fmt.Sprintf(`CREATE TABLE %s (id int PRIMARY KEY)`, table))
		e.cfg.Source, e.cfg.Stream.Source = fmt.Sprintf("s%d", i), fmt.Sprintf("s%d", i)
		e.cfg.Stream.Name = fmt.Sprintf("CHANGES_%d", i)
		e.cfg.Repl.Slot, e.cfg.Repl.Publication, e.cfg.Repl.Tables = fmt.Sprintf("pgs2_%d", i), fmt.Sprintf("pgs2_%d", i), []string{"public." + table}
		e.opts = []capture.Option{capture.WithRoundCommits(p.perRound...), capture.WithCrashAfter(p.cuts...)}
		t.Logf("run %d: %+v", i, p)
		stop := e.run(t)
		var sql strings.Builder
		id := 0
		for range p.txs {
			sql.WriteString("BEGIN;")
			for range 1 + rng.IntN(p.rows) {
				id++
				fmt.Fprintf(&sql, "INSERT INTO %s VALUES (%d);", table, id)
			}
			sql.WriteString("COMMIT;")
		}
		e.pg.MustExec(t, "app", sql.String())
		e.waitMessages(t, id) // fails on a change stored twice or out of order, or missing
		if err := stop(); err != nil {
			t.Fatal(err)
		}
		if t.Failed() {
			t.Fatalf("run %d (%+v): changes stored twice or out of order", i, p)
		}
	}
}

// TestGroupChanges: an update that moves a row to another group (a new
// primary key; new group columns, when the old row shows them) is a delete
// of the old row in its old group, then an insert of the new row in its new
// group, at consecutive commit_idx: each group's changes stay in order. An
// update that keeps the group is one update, with the old key in changes.
// (Group columns must be in the replica identity, so the old group shows.)
func TestGroupChanges(t *testing.T) {
	e := newEnv(t, `CREATE TABLE users (id int PRIMARY KEY, name text);
		CREATE TABLE full_users (id int PRIMARY KEY, name text); ALTER TABLE full_users REPLICA IDENTITY FULL;
		CREATE TABLE members (id int PRIMARY KEY, org int, name text); ALTER TABLE members REPLICA IDENTITY FULL;
		INSERT INTO users VALUES (1, 'ada'); INSERT INTO full_users VALUES (1, 'ada');
		INSERT INTO members VALUES (1, 10, 'ada');`,
		"public.users", "public.full_users", "public.members")
	e.cfg.Repl.GroupColumns = map[string][]string{"public.members": {"org"}}
	e.run(t)
	e.pg.MustExec(t, "app", `BEGIN; UPDATE users SET id = 2 WHERE id = 1; UPDATE users SET name = 'bo' WHERE id = 2; COMMIT`)
	e.pg.MustExec(t, "app", `UPDATE full_users SET id = 2, name = 'bo' WHERE id = 1`)
	e.pg.MustExec(t, "app", `UPDATE members SET org = 20 WHERE id = 1`)            // moves: org is the group
	e.pg.MustExec(t, "app", `UPDATE members SET id = 2, name = 'bo' WHERE id = 1`) // stays in org 20
	msgs := e.waitMessages(t, 8)
	type want struct {
		table, action, group, record, changes string
		idx                                   int
	}
	wants := []want{
		{"users", "delete", `["1"]`, `{"id":1}`, `null`, 0},
		{"users", "insert", `["2"]`, `{"id":2,"name":"ada"}`, `null`, 1},
		{"users", "update", `["2"]`, `{"id":2,"name":"bo"}`, `{}`, 2},
		{"full_users", "delete", `["1"]`, `{"id":1,"name":"ada"}`, `null`, 0},
		{"full_users", "insert", `["2"]`, `{"id":2,"name":"bo"}`, `null`, 1},
		{"members", "delete", `["10"]`, `{"id":1,"name":"ada","org":10}`, `null`, 0},
		{"members", "insert", `["20"]`, `{"id":1,"name":"ada","org":20}`, `null`, 1},
		{"members", "update", `["20"]`, `{"id":2,"name":"bo","org":20}`, `{"id":1,"name":"ada"}`, 0},
	}
	for i, w := range wants {
		m := msgs[i]
		got := want{m.Msg.Metadata.TableName, string(m.Msg.Action), string(m.Entry.Group), string(mustJSON(t, m.Msg.Record)), "", m.Msg.Metadata.CommitIdx}
		if m.Msg.Changes == nil {
			got.changes = "null"
		} else {
			got.changes = string(mustJSON(t, m.Msg.Changes))
		}
		if got != w {
			t.Errorf("change %d: %+v\n want %+v", i, got, w)
		}
	}
	if msgs[0].Msg.Metadata.CommitLSN != msgs[1].Msg.Metadata.CommitLSN {
		t.Errorf("a move's two halves in two transactions: lsn %d and %d", msgs[0].Msg.Metadata.CommitLSN, msgs[1].Msg.Metadata.CommitLSN)
	}
}

// TestTruncate: a TRUNCATE is not a change: capture warns, naming the
// table, counts it, and the changes before and after it flow as usual.
func TestTruncate(t *testing.T) {
	e := newEnv(t, `CREATE TABLE users (id int PRIMARY KEY); CREATE TABLE other (id int PRIMARY KEY)`, "public.users", "public.other")
	logs := &proctest.Buffer{}
	reg := prometheus.NewRegistry()
	e.opts = append(e.opts, capture.WithLogger(slog.New(slog.NewTextHandler(logs, nil))), capture.WithMetrics(reg))
	e.run(t)
	e.pg.MustExec(t, "app", `INSERT INTO users VALUES (1), (2)`)
	e.pg.MustExec(t, "app", `TRUNCATE users`)
	e.pg.MustExec(t, "app", `INSERT INTO users VALUES (1); INSERT INTO other VALUES (5)`)
	msgs := e.waitMessages(t, 4)
	for i, want := range []string{"users insert", "users insert", "users insert", "other insert"} {
		if got := msgs[i].Msg.Metadata.TableName + " " + string(msgs[i].Msg.Action); got != want {
			t.Errorf("change %d: %s, want %s", i, got, want)
		}
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	n := -1.0
	for _, mf := range mfs {
		if mf.GetName() == "pgs2_capture_truncates_ignored_total" {
			n = mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	if n != 1 {
		t.Errorf("pgs2_capture_truncates_ignored_total = %v, want 1", n)
	}
	if out := logs.String(); !strings.Contains(out, "level=WARN") || !strings.Contains(out, "TRUNCATE") || !strings.Contains(out, "public.users") {
		t.Errorf("no warning naming the table:\n%s", out)
	}
}

// TestTransactionAnnotations: a transactional message with pgs2's (or
// Sequin's) prefix sets metadata.transaction_annotations of the
// transaction's later changes, until cleared or the transaction ends;
// content that is not a JSON object is ignored with a warning.
func TestTransactionAnnotations(t *testing.T) {
	e := newEnv(t, `CREATE TABLE users (id int PRIMARY KEY)`, "public.users")
	logs := &proctest.Buffer{}
	e.opts = append(e.opts, capture.WithLogger(slog.New(slog.NewTextHandler(logs, nil))))
	e.run(t)
	e.pg.MustExec(t, "app", `BEGIN;
		INSERT INTO users VALUES (1);
		SELECT pg_logical_emit_message(true, 'pgs2:transaction_annotations.set', '{"user": "ada",
			"request": 7}');
		INSERT INTO users VALUES (2);
		SELECT pg_logical_emit_message(true, 'sequin:transaction_annotations.set', '{"user": "bob"}');
		INSERT INTO users VALUES (3);
		SELECT pg_logical_emit_message(true, 'sequin:transaction_annotations.clear', '');
		INSERT INTO users VALUES (4);
		SELECT pg_logical_emit_message(true, 'pgs2:transaction_annotations.set', '{"user": "cy"}');
		INSERT INTO users VALUES (5);
		COMMIT`)
	e.pg.MustExec(t, "app", `INSERT INTO users VALUES (6)`) // a new transaction starts without
	e.pg.MustExec(t, "app", `BEGIN; SELECT pg_logical_emit_message(true, 'pgs2:transaction_annotations.set', 'not json');
		INSERT INTO users VALUES (7); COMMIT`)
	msgs := e.waitMessages(t, 7)
	want := []string{"null", `{"user":"ada","request":7}`, `{"user":"bob"}`, "null", `{"user":"cy"}`, "null", "null"}
	for i, m := range msgs {
		if got := string(m.Msg.Metadata.TransactionAnnotations); got != want[i] {
			t.Errorf("change %d (id %v): transaction_annotations %s, want %s", i, m.Msg.Record["id"], got, want[i])
		}
	}
	if out := logs.String(); !strings.Contains(out, "ignored a transaction annotation") || !strings.Contains(out, "not a JSON object") {
		t.Errorf("no warning for the invalid annotation:\n%s", out)
	}
}

// TestPartitionedTable: changes to any partition of a partitioned table,
// one added later too, are the table's own; a backfill reads the table
// (the publication, made before, is set to publish via the root).
func TestPartitionedTable(t *testing.T) {
	e := newEnv(t, `CREATE TABLE events (id int, at date, v text, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
		CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
		CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
		INSERT INTO events VALUES (1, '2025-05-01', 'old'), (2, '2026-05-01', 'new');
		CREATE TABLE done (id int PRIMARY KEY);
		CREATE PUBLICATION pgs2 FOR TABLE events -- without publish_via_partition_root: capture sets it`, "public.events", "public.done")
	e.cfg.Backfill = capture.BackfillConfig{SinkTables: map[string][]string{"s": {"public.events"}}}
	e.run(t)
	e.pg.MustExec(t, "app", `INSERT INTO events VALUES (3, '2025-06-01', 'a'), (4, '2026-06-01', 'b')`)
	e.pg.MustExec(t, "app", `UPDATE events SET v = 'b2' WHERE id = 4`)
	e.pg.MustExec(t, "app", `DELETE FROM events WHERE id = 3`)
	e.pg.MustExec(t, "app", `CREATE TABLE events_2027 PARTITION OF events FOR VALUES FROM ('2027-01-01') TO ('2028-01-01');
		INSERT INTO events VALUES (5, '2027-01-02', 'later')`)
	store := e.backfills(t)
	e.startBackfill(t, store, backfill.Job{ID: "bf", Sink: "s"})
	waitProgress(t, store, "bf", "public.events", backfill.Done)
	changes := e.allWritten(t)
	var got []string
	for _, g := range changes {
		m := g.Msg
		if m.Metadata.TableName == "done" {
			continue
		}
		got = append(got, fmt.Sprintf("%s %s %v", m.Metadata.TableName, m.Action, m.Record["id"]))
	}
	want := []string{"events insert 3", "events insert 4", "events update 4", "events delete 3", "events insert 5",
		"events read 1", "events read 2", "events read 4", "events read 5"}
	if strings.Join(got, "; ") != strings.Join(want, "; ") {
		t.Fatalf("changes:\n%s\nwant\n%s", strings.Join(got, "; "), strings.Join(want, "; "))
	}

	// REPLICA IDENTITY FULL on the table does not reach its partitions:
	// capture refuses it until each partition has it.
	e.pg.MustExec(t, "app", `CREATE TABLE full_events (id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
		CREATE TABLE full_events_a PARTITION OF full_events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
		ALTER TABLE full_events REPLICA IDENTITY FULL`)
	cfg := e.cfg.Repl
	cfg.Tables = []string{"public.full_events"}
	_, err := pgrepl.Prepare(context.Background(), cfg)
	if !errors.Is(err, pgrepl.ErrSetup) || !strings.Contains(err.Error(), "ALTER TABLE full_events_a REPLICA IDENTITY FULL") {
		t.Fatalf("a partition without the table's REPLICA IDENTITY FULL: %v", err)
	}
}
