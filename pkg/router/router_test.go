package router_test

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/change"
	"github.com/pgs2/pgs2/pkg/config"
	"github.com/pgs2/pgs2/pkg/health"
	"github.com/pgs2/pgs2/pkg/natstest"
	"github.com/pgs2/pgs2/pkg/router"
	"github.com/pgs2/pgs2/pkg/seed"
	"github.com/pgs2/pgs2/pkg/sinkstate"
)

type env struct {
	ns  *natstest.Server
	nc  *nats.Conn
	js  jetstream.JetStream
	pub *bus.Publisher
	sub *bus.ChangeSubjects
	lsn uint64
}

func newEnv(t *testing.T) *env {
	t.Helper()
	e := &env{ns: natstest.New(t)}
	nc, err := nats.Connect(e.ns.URL(), nats.ReconnectBufSize(-1))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	e.nc = nc
	e.js, _ = jetstream.New(nc)
	ctx := context.Background()
	if _, err := bus.EnsureChangesStream(ctx, e.js, bus.ChangesStreamConfig{Name: "PGS2_CHANGES", Source: "app", Replicas: 1, DuplicateWindow: time.Minute}); err != nil {
		t.Fatal(err)
	}
	e.pub, err = bus.NewPublisher(nc, 0, 0, bus.PublisherOptions{})
	if err != nil {
		t.Fatal(err)
	}
	e.sub = bus.NewChangeSubjects("app", 4)
	e.lsn = 1000
	return e
}

// change publishes one change as capture would, in its own transaction.
func (e *env) change(t *testing.T, table, action string, id int, record string) change.Position {
	t.Helper()
	return e.changeFor(t, table, action, id, record, "", "")
}

// changeFor publishes a change for one sink only (a backfill's read).
func (e *env) changeFor(t *testing.T, table, action string, id int, record, sink, backfill string) change.Position {
	t.Helper()
	e.lsn += 10
	pos := change.Position{LSN: e.lsn, Idx: 0}
	schema, tbl := config.SplitTable(table)
	body := fmt.Sprintf(`{"record":%s,"changes":null,"action":"%s","metadata":{"table_schema":"%s","table_name":"%s","commit_timestamp":"2026-11-22T10:00:00.123456Z","commit_lsn":%d,"commit_idx":0,"database_name":"app","idempotency_key":"%s","record_pks":["%d"],"transaction_annotations":null}}`,
		record, action, schema, tbl, pos.LSN, pos.Key(), id)
	group := []byte(fmt.Sprintf(`["%d"]`, id))
	var b bus.BatchBuilder
	b.Add(&bus.Entry{Key: []byte(pos.Key()), Group: group, Action: []byte(action), Table: []byte(table), Schema: []byte(schema), CommitMs: 1795341600123,
		Sink: []byte(sink), Backfill: []byte(backfill), Body: []byte(body)})
	if err := e.pub.Publish(context.Background(), e.sub.Subject(group), pos.Key(), b.Bytes()); err != nil {
		t.Errorf("publish a change: %v", err) // not Fatal: producers run in goroutines
	}
	e.pub.Mark(pos.LSN)
	return pos
}

func (e *env) run(t *testing.T, sinks []config.Sink, opts ...router.Option) (*router.Router, func()) {
	t.Helper()
	opts = append([]router.Option{router.WithLogger(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))),
		router.WithHealth(health.NewState())}, opts...)
	r, err := router.New(router.Config{Source: "app", ChangesStream: "PGS2_CHANGES",
		Delivery: bus.DeliveryStreamConfig{Name: "PGS2_DELIVERY", Source: "app", Replicas: 1, DuplicateWindow: time.Minute},
		Sinks:    sinks}, e.js, opts...)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	stop := func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("router: %v", err)
		}
	}
	t.Cleanup(func() {
		select {
		case <-ctx.Done():
		default:
			stop()
		}
	})
	return r, stop
}

// out is one routed change: an entry of a delivery message.
type out struct {
	Subject                          string
	Header                           nats.Header // the delivery message's
	Key, Group, Action, Table, Error string
	Sink, Backfill                   string
	CommitMs                         int64
	Body                             map[string]any
	Raw                              string
}

// outputs waits until the delivery stream holds n routed changes and
// returns them.
func (e *env) outputs(t *testing.T, n int) []out {
	return e.outputsWithin(t, n, 30*time.Second)
}

// readOutputs returns every routed change the delivery stream holds.
func (e *env) readOutputs(t *testing.T) []out {
	t.Helper()
	ctx := context.Background()
	s, err := e.js.Stream(ctx, "PGS2_DELIVERY")
	if err != nil {
		return nil
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var res []out
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq && info.State.Msgs > 0; seq++ {
		m, err := s.GetMsg(ctx, seq)
		if err != nil {
			t.Fatal(err)
		}
		r := bus.NewBatchReader(m.Data)
		var en bus.Entry
		k := 0
		for r.Next(&en) {
			o := out{Subject: m.Subject, Header: m.Header, Key: string(en.Key), Group: string(en.Group), Action: string(en.Action),
				Table: string(en.Table), Error: string(en.Error), Sink: string(en.Sink), Backfill: string(en.Backfill),
				CommitMs: en.CommitMs, Raw: string(en.Body)}
			_ = json.Unmarshal(en.Body, &o.Body)
			res = append(res, o)
			k++
		}
		if r.Err() != nil {
			t.Fatalf("delivery message %d: %v", seq, r.Err())
		}
		if m.Header.Get(bus.HeaderEntries) != strconv.Itoa(k) {
			t.Fatalf("delivery message %d has %d entries, its header says %s", seq, k, m.Header.Get(bus.HeaderEntries))
		}
	}
	return res
}

func (e *env) outputsWithin(t *testing.T, n int, within time.Duration) []out {
	t.Helper()
	ctx := context.Background()
	deadline := time.Now().Add(within)
	for len(e.readOutputs(t)) < n {
		if time.Now().After(deadline) {
			cs, _ := e.js.Stream(ctx, "PGS2_CHANGES")
			ci, _ := cs.Info(ctx)
			t.Fatalf("delivery stream holds %d changes after %s, want %d (changes stream: %d, publisher err %v)", len(e.readOutputs(t)), within, n, ci.State.Msgs, e.pub.Err())
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond) // anything extra would show now
	res := e.readOutputs(t)
	if len(res) != n {
		t.Fatalf("delivery stream holds %d changes, want %d", len(res), n)
	}
	return res
}

func TestRouting(t *testing.T) {
	e := newEnv(t)
	e.run(t, []config.Sink{
		{Name: "plain", Tables: []string{"public.users"}, Basin: "my-basin", Stream: "users"},
		{Name: "filtered", Tables: []string{"public.users", "public.orders"}, Basin: "my-basin", Stream: "all",
			Filter: `action != "delete"`},
		{Name: "routed", Tables: []string{"public.orders"}, Basin: "my-basin", Stream: "x",
			Routing:   `{"basin": "logs-" + metadata.table_schema, "stream": metadata.table_name}`,
			Transform: `{"id": record.id, "action": action}`},
	})
	u := e.change(t, "public.users", "insert", 7, `{"id":7,"name":"Ada"}`)
	e.change(t, "public.orders", "insert", 1, `{"id":1,"total":"9.50"}`)
	e.change(t, "public.users", "delete", 7, `{"id":7}`)
	outs := e.outputs(t, 5)

	// Order holds per subject (a group's subject); rounds batch each
	// subject's changes, so look them up.
	find := func(prefix, table, action string) out {
		t.Helper()
		var found []out
		for _, o := range outs {
			if strings.HasPrefix(o.Subject, prefix) && o.Table == table && o.Action == action {
				found = append(found, o)
			}
		}
		if len(found) != 1 {
			t.Fatalf("%d outputs on %s* for %s %s, want 1 (all: %+v)", len(found), prefix, action, table, outs)
		}
		if found[0].Error != "" {
			t.Errorf("output on %s failed: %s", found[0].Subject, found[0].Error)
		}
		return found[0]
	}
	plain := find("pgs2.deliver.app.plain.my-basin.users.", "public.users", "insert")
	if plain.Key != u.Key() {
		t.Errorf("plain key %q, want %q", plain.Key, u.Key())
	}
	find("pgs2.deliver.app.plain.my-basin.users.", "public.users", "delete")
	if f := find("pgs2.deliver.app.filtered.my-basin.all.", "public.users", "insert"); f.Key != u.Key() {
		t.Errorf("filtered key %q, want %q", f.Key, u.Key())
	}
	find("pgs2.deliver.app.filtered.my-basin.all.", "public.orders", "insert")
	routed := find("pgs2.deliver.app.routed.logs-public.orders.", "public.orders", "insert")
	// Plain sinks get the body with metadata.consumer spliced in.
	md := plain.Body["metadata"].(map[string]any)
	if c, _ := md["consumer"].(map[string]any); c["name"] != "plain" || md["table_name"] != "users" {
		t.Errorf("plain body metadata %v", md)
	}
	// The transform replaced the body.
	if routed.Raw != `{"action":"insert","id":1}` {
		t.Errorf("transformed body %s", routed.Raw)
	}
	if o := routed; o.CommitMs != 1795341600123 || o.Group != `["1"]` || o.Key == "" {
		t.Errorf("entry %+v", o)
	}
}

// TestReadsReachTheirSinkOnly: a backfill's read for one sink goes to that
// sink alone, through its functions, and keeps its backfill id; a change
// from the WAL goes to every sink of its table.
func TestReadsReachTheirSinkOnly(t *testing.T) {
	e := newEnv(t)
	e.run(t, []config.Sink{
		{Name: "a", Tables: []string{"public.users"}, Basin: "my-basin", Stream: "a"},
		{Name: "b", Tables: []string{"public.users"}, Basin: "my-basin", Stream: "b", Transform: `{"id": record.id, "action": action}`},
	})
	e.changeFor(t, "public.users", "read", 1, `{"id":1}`, "b", "bf-1")
	e.changeFor(t, "public.users", "read", 2, `{"id":2}`, "a", "bf-2")
	e.changeFor(t, "public.users", "read", 3, `{"id":3}`, "gone", "bf-3") // a sink no longer configured
	e.change(t, "public.users", "insert", 4, `{"id":4}`)
	outs := e.outputs(t, 4)
	got := map[string]bool{}
	for _, o := range outs {
		got[fmt.Sprintf("%s %s %s %s", strings.Split(o.Subject, ".")[3], o.Action, o.Group, o.Backfill)] = true
		if o.Action == "read" && o.Sink == "b" && o.Raw != `{"action":"read","id":1}` {
			t.Errorf("sink b's transform did not apply to its read: %s", o.Raw)
		}
	}
	for _, w := range []string{`b read ["1"] bf-1`, `a read ["2"] bf-2`, `a insert ["4"] `, `b insert ["4"] `} {
		if !got[w] {
			t.Errorf("no output %q; got %v", w, got)
		}
	}
}

func TestFunctionFailuresAreMarked(t *testing.T) {
	e := newEnv(t)
	e.run(t, []config.Sink{
		{Name: "bad", Tables: []string{"public.users"}, Basin: "my-basin", Stream: "users",
			Routing: `{"basin": record.name}`},
	})
	e.change(t, "public.users", "insert", 1, `{"id":1,"name":"Not A Basin"}`)
	e.change(t, "public.users", "insert", 2, `{"id":2,"name":"good-basin-2"}`)
	e.change(t, "public.users", "insert", 3, `{"id":3}`)
	outs := e.outputs(t, 3)
	sort.SliceStable(outs, func(i, j int) bool {
		return outs[i].Body["record"].(map[string]any)["id"].(float64) < outs[j].Body["record"].(map[string]any)["id"].(float64)
	})
	if msg := outs[0].Error; !strings.Contains(msg, "not a valid S2 basin") ||
		!strings.HasPrefix(outs[0].Subject, "pgs2.deliver.app.bad.my-basin.users.") {
		t.Errorf("invalid routing result: subject %s error %q", outs[0].Subject, msg)
	}
	if !strings.HasPrefix(outs[1].Subject, "pgs2.deliver.app.bad.good-basin-2.users.") || outs[1].Error != "" {
		t.Errorf("valid routing: %s %q", outs[1].Subject, outs[1].Error)
	}
	if msg := outs[2].Error; !strings.Contains(msg, "routing function") {
		t.Errorf("runtime error (no such key): %q", msg)
	}
}

func TestCompileErrorStopsStartup(t *testing.T) {
	e := newEnv(t)
	_, err := router.New(router.Config{Source: "app", ChangesStream: "PGS2_CHANGES",
		Sinks: []config.Sink{{Name: "s1", Tables: []string{"public.users"}, Basin: "my-basin", Stream: "u", Filter: `action ==`}}}, e.js)
	if err == nil || !strings.Contains(err.Error(), `sink "s1"`) || !strings.Contains(err.Error(), "action ==") || !strings.Contains(err.Error(), ":1:") {
		t.Fatalf("New = %v, want an error naming the sink, the expression and the position", err)
	}
}

func TestReload(t *testing.T) {
	e := newEnv(t)
	r, _ := e.run(t, []config.Sink{{Name: "s", Tables: []string{"public.users"}, Basin: "my-basin", Stream: "a"}})
	e.change(t, "public.users", "insert", 1, `{"id":1}`)
	e.outputs(t, 1)
	if err := r.Reload([]config.Sink{{Name: "s", Tables: []string{"public.users"}, Basin: "my-basin", Stream: "a", Filter: `nonsense +`}}); err == nil {
		t.Fatal("Reload accepted a function that does not compile")
	}
	if err := r.Reload([]config.Sink{{Name: "s", Tables: []string{"public.users"}, Basin: "my-basin", Stream: "b"}}); err != nil {
		t.Fatal(err)
	}
	e.change(t, "public.users", "insert", 2, `{"id":2}`)
	outs := e.outputs(t, 2)
	if !strings.HasPrefix(outs[0].Subject, "pgs2.deliver.app.s.my-basin.a.") || !strings.HasPrefix(outs[1].Subject, "pgs2.deliver.app.s.my-basin.b.") {
		t.Fatalf("subjects %s %s: reload should apply from the next change", outs[0].Subject, outs[1].Subject)
	}
}

// TestRestartResumes: a router restarted after its outputs were stored
// publishes nothing twice and continues in order.
func TestRestartResumes(t *testing.T) {
	e := newEnv(t)
	sinks := []config.Sink{
		{Name: "a", Tables: []string{"public.users"}, Basin: "my-basin", Stream: "a"},
		{Name: "b", Tables: []string{"public.users"}, Basin: "my-basin", Stream: "b"},
	}
	_, stop := e.run(t, sinks)
	for i := 1; i <= 50; i++ {
		e.change(t, "public.users", "update", i%5, fmt.Sprintf(`{"id":%d,"v":%d}`, i%5, i))
	}
	e.outputs(t, 100)
	stop()
	e.run(t, sinks)
	for i := 51; i <= 60; i++ {
		e.change(t, "public.users", "update", i%5, fmt.Sprintf(`{"id":%d,"v":%d}`, i%5, i))
	}
	outs := e.outputs(t, 120)
	seen := map[string]bool{}
	last := map[string]float64{}
	for i, o := range outs {
		id := o.Key + " " + o.Subject
		if seen[id] {
			t.Fatalf("output %d: %s twice", i, id)
		}
		seen[id] = true
		rec := o.Body["record"].(map[string]any)
		sink, _, _, _, _ := parse(o.Subject)
		g := fmt.Sprintf("%s/%v", sink, rec["id"])
		if rec["v"].(float64) <= last[g] {
			t.Fatalf("output %d: group %s has v=%v after %v (order)", i, g, rec["v"], last[g])
		}
		last[g] = rec["v"].(float64)
	}
}

// TestInterruptedRoundIsCompleted: a router that dies after publishing part
// of a round publishes the rest of it, and nothing twice, when it resumes.
func TestInterruptedRoundIsCompleted(t *testing.T) {
	e := newEnv(t)
	sinks := []config.Sink{
		{Name: "a", Tables: []string{"public.users"}, Basin: "my-basin", Stream: "a"},
		{Name: "b", Tables: []string{"public.users"}, Basin: "my-basin", Stream: "b"},
	}
	for v := 1; v <= 40; v++ { // all stored before the router starts: one round
		e.change(t, "public.users", "update", v%8, fmt.Sprintf(`{"id":%d,"v":%d}`, v%8, v))
	}
	e.run(t, sinks, router.WithCrashAfter(3))
	outs := e.outputs(t, 80)
	last := map[string]float64{}
	for i, o := range outs {
		rec := o.Body["record"].(map[string]any)
		sink, _, _, _, _ := parse(o.Subject)
		g := fmt.Sprintf("%s/%v", sink, rec["id"])
		if v := rec["v"].(float64); v != last[g]+8 && !(last[g] == 0 && v <= 8) {
			t.Fatalf("output %d: group %s has v=%v after %v (lost, duplicated or reordered)", i, g, v, last[g])
		}
		last[g] = rec["v"].(float64)
	}
	s, _ := e.js.Stream(context.Background(), "PGS2_DELIVERY")
	info, _ := s.Info(context.Background())
	if info.State.Msgs < 4 {
		t.Fatalf("%d delivery messages: the round was not cut after 3", info.State.Msgs)
	}
	m, _ := s.GetMsg(context.Background(), 4)
	if r := m.Header.Get(bus.HeaderRound); !strings.HasPrefix(r, "4/") {
		t.Fatalf("the 4th message is %s of its round, want the rest of the interrupted round", r)
	}
}

func parse(subject string) (sink, basin, stream, partition string, err error) {
	_, sink, basin, stream, partition, err = bus.ParseDeliverySubject(subject)
	return
}

// TestReplayedRoundKeepsItsDisabledSinks: a round cut short is routed
// again as it was first routed, with the sinks disabled then (recorded in
// its messages), even when a sink was enabled in between: otherwise the
// rest of the round would reach a sink its start did not, a partial
// transaction. Later rounds see the change.
func TestReplayedRoundKeepsItsDisabledSinks(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	kv, err := sinkstate.Ensure(ctx, e.js, 1)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sinkstate.Set(ctx, kv, "b", sinkstate.Disabled, "test", ""); err != nil {
		t.Fatal(err)
	}
	sinks := []config.Sink{
		{Name: "a", Tables: []string{"public.users"}, Basin: "my-basin", Stream: "a"},
		{Name: "b", Tables: []string{"public.users"}, Basin: "my-basin", Stream: "b"},
	}
	for v := 1; v <= 40; v++ { // all stored before the router starts: one round
		e.change(t, "public.users", "update", v%8, fmt.Sprintf(`{"id":%d,"v":%d}`, v%8, v))
	}
	e.run(t, sinks, router.WithCrashAfterDo(1, func() {
		if _, err := sinkstate.Set(ctx, kv, "b", sinkstate.Active, "test", ""); err != nil {
			t.Error(err)
		}
	}))
	outs := e.outputs(t, 40)
	for i, o := range outs {
		if sink, _, _, _, _ := parse(o.Subject); sink != "a" {
			t.Fatalf("output %d went to sink %s, disabled when the round began", i, sink)
		}
	}
	for deadline := time.Now().Add(5 * time.Second); ; { // until the router sees b enabled
		raw, _ := bus.GatherStatus(ctx, e.nc, bus.StatusSubject("router"), time.Second, 50*time.Millisecond)
		var st bus.RouterStatus
		if len(raw) == 1 && json.Unmarshal(raw[0], &st) == nil && st.Role == "active" && len(st.Disabled) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the router's status never showed b enabled: %s", raw)
		}
		time.Sleep(20 * time.Millisecond)
	}
	e.change(t, "public.users", "update", 1, `{"id":1,"v":41}`)
	outs = e.outputs(t, 42)
	var late []string
	for _, o := range outs[40:] {
		sink, _, _, _, _ := parse(o.Subject)
		late = append(late, sink)
	}
	slices.Sort(late)
	if !slices.Equal(late, []string{"a", "b"}) {
		t.Fatalf("the change after the enable went to %v, want a and b", late)
	}
}

// TestFunctionsDecidedByTable: functions that read only a change's table
// and action are decided once per table and action, yet every change
// keeps its own body, and a failure marks every change it applies to.
func TestFunctionsDecidedByTable(t *testing.T) {
	r, _ := seed.Rand(t)
	e := newEnv(t)
	e.run(t, []config.Sink{
		{Name: "bytable", Tables: []string{"public.users", "public.orders"}, Basin: "my-basin", Stream: "x",
			Filter: `action != "delete"`, Routing: `{"stream": metadata.table_name + "-" + action}`},
		{Name: "badbasin", Tables: []string{"public.orders"}, Basin: "my-basin", Stream: "x",
			Routing: `{"basin": "Not " + metadata["table_name"]}`},
	})
	tables, actions := []string{"public.users", "public.orders"}, []string{"insert", "update", "delete"}
	type sent struct{ table, action string }
	var changes []sent
	want := 0
	for id := 1; id <= 60; id++ {
		c := sent{tables[r.IntN(2)], actions[r.IntN(3)]}
		changes = append(changes, c)
		e.change(t, c.table, c.action, id, fmt.Sprintf(`{"id":%d}`, id))
		if c.action != "delete" {
			want++
		}
		if c.table == "public.orders" {
			want++ // badbasin's, marked failed
		}
	}
	outs := e.outputs(t, want)
	for _, o := range outs {
		id := int(o.Body["record"].(map[string]any)["id"].(float64))
		c := changes[id-1]
		if o.Table != c.table || o.Action != c.action || o.Group != fmt.Sprintf(`["%d"]`, id) {
			t.Fatalf("output %+v carries change %d (%s %s)", o, id, c.table, c.action)
		}
		switch sink := strings.Split(o.Subject, ".")[3]; sink {
		case "bytable":
			_, table, _ := strings.Cut(c.table, ".")
			if prefix := "pgs2.deliver.app.bytable.my-basin." + table + "-" + c.action + "."; !strings.HasPrefix(o.Subject, prefix) || o.Error != "" {
				t.Errorf("change %d (%s %s) routed to %s (%q), want %s*", id, c.table, c.action, o.Subject, o.Error, prefix)
			}
			if c.action == "delete" {
				t.Errorf("change %d: a delete passed the filter", id)
			}
		case "badbasin":
			if !strings.Contains(o.Error, "not a valid S2 basin") || !strings.HasPrefix(o.Subject, "pgs2.deliver.app.badbasin.my-basin.x.") {
				t.Errorf("change %d on %s: error %q, want the invalid basin on the sink's own stream", id, o.Subject, o.Error)
			}
		default:
			t.Errorf("output for sink %q", sink)
		}
	}
}

// TestMessagesOfManyTables: a change message holds the changes of every
// table in its partition (each entry names its table); a message from a
// capture before batch version 4 (a subject per table, entries without
// their schema) is routed by its subject's table. Each change goes to its
// table's sinks only, through functions decided per table.
func TestMessagesOfManyTables(t *testing.T) {
	r, _ := seed.Rand(t)
	e := newEnv(t)
	e.run(t, []config.Sink{
		{Name: "bytable", Tables: []string{"public.users", "public.orders"}, Basin: "my-basin", Stream: "x",
			Routing: `{"stream": metadata.table_name}`},
		{Name: "users", Tables: []string{"public.users"}, Basin: "my-basin", Stream: "u"},
	})
	tables := []string{"public.users", "public.orders", "public.other"} // other: no sink
	entry := func(table string, id int, withSchema bool) *bus.Entry {
		e.lsn += 10
		pos := change.Position{LSN: e.lsn}
		schema, tbl := config.SplitTable(table)
		body := fmt.Sprintf(`{"record":{"id":%d},"changes":null,"action":"insert","metadata":{"table_schema":"%s","table_name":"%s","commit_timestamp":"2026-11-22T10:00:00.123456Z","commit_lsn":%d,"commit_idx":0,"database_name":"app","idempotency_key":"%s","record_pks":["%d"],"transaction_annotations":null}}`,
			id, schema, tbl, pos.LSN, pos.Key(), id)
		en := &bus.Entry{Key: []byte(pos.Key()), Group: fmt.Appendf(nil, `["%d"]`, id), Action: []byte("insert"), Table: []byte(table), CommitMs: 1, Body: []byte(body)}
		if withSchema {
			en.Schema = []byte(schema)
		}
		return en
	}
	want := map[string]string{} // record id → the sinks' streams it must reach
	id := 0
	publish := func(subject string, entries []*bus.Entry) {
		var b bus.BatchBuilder
		for _, en := range entries {
			b.Add(en)
		}
		if err := e.pub.Publish(context.Background(), subject, string(entries[len(entries)-1].Key), b.Bytes()); err != nil {
			t.Fatal(err)
		}
		e.pub.Mark(e.lsn)
	}
	note := func(table string) {
		switch table {
		case "public.users":
			want[strconv.Itoa(id)] = "bytable/users users/u"
		case "public.orders":
			want[strconv.Itoa(id)] = "bytable/orders"
		}
	}
	for m := 0; m < 20; m++ {
		var entries []*bus.Entry
		if m%5 == 4 { // a capture before version 4: one table, named by the subject
			table := tables[r.IntN(len(tables))]
			schema, tbl := config.SplitTable(table)
			for range 1 + r.IntN(5) {
				id++
				entries = append(entries, entry(table, id, false))
				note(table)
			}
			publish("pgs2.changes.app."+schema+"."+tbl+".0", entries)
			continue
		}
		for range 1 + r.IntN(8) {
			id++
			table := tables[r.IntN(len(tables))]
			entries = append(entries, entry(table, id, true))
			note(table)
		}
		publish("pgs2.changes.app.0", entries)
	}
	n := 0
	for _, w := range want {
		n += len(strings.Fields(w))
	}
	got := map[string][]string{}
	for _, o := range e.outputs(t, n) {
		sink, _, stream, _, _ := parse(o.Subject)
		rid := strconv.Itoa(int(o.Body["record"].(map[string]any)["id"].(float64)))
		got[rid] = append(got[rid], sink+"/"+stream)
		if o.Error != "" {
			t.Errorf("record %s: %s", rid, o.Error)
		}
	}
	for rid, w := range want {
		slices.Sort(got[rid])
		if strings.Join(got[rid], " ") != w {
			t.Errorf("record %s reached %v, want %s", rid, got[rid], w)
		}
	}
	if len(got) != len(want) {
		t.Errorf("%d records routed, want %d (a change of a table without sinks was routed?)", len(got), len(want))
	}
}
