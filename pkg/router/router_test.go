package router_test

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
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
	e.pub, err = bus.NewPublisher(nc, "", 0, bus.PublisherOptions{})
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
	e.lsn += 10
	pos := change.Position{LSN: e.lsn, Idx: 0}
	schema, tbl := config.SplitTable(table)
	body := fmt.Sprintf(`{"record":%s,"changes":null,"action":"%s","metadata":{"table_schema":"%s","table_name":"%s","commit_timestamp":"2026-11-22T10:00:00.123456Z","commit_lsn":%d,"commit_idx":0,"database_name":"app","idempotency_key":"%s","record_pks":["%d"],"transaction_annotations":null}}`,
		record, action, schema, tbl, pos.LSN, pos.Key(), id)
	group := []byte(fmt.Sprintf(`["%d"]`, id))
	if err := e.pub.Publish(context.Background(), e.sub.Subject(schema, tbl, group), pos.Key(), group, []byte(body), ""); err != nil {
		t.Errorf("publish a change: %v", err) // not Fatal: producers run in goroutines
	}
	e.pub.Mark(pos.LSN)
	return pos
}

func (e *env) run(t *testing.T, sinks []config.Sink) (*router.Router, func()) {
	t.Helper()
	r, err := router.New(router.Config{Source: "app", ChangesStream: "PGS2_CHANGES",
		Delivery: bus.DeliveryStreamConfig{Name: "PGS2_DELIVERY", Replicas: 1, DuplicateWindow: time.Minute},
		Sinks:    sinks}, e.js, router.WithLogger(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))),
		router.WithHealth(health.NewState()))
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

type out struct {
	Subject string
	Header  nats.Header
	Body    map[string]any
	Raw     string
}

// outputs waits until the delivery stream holds n messages and returns them.
func (e *env) outputs(t *testing.T, n int) []out {
	return e.outputsWithin(t, n, 30*time.Second)
}

func (e *env) outputsWithin(t *testing.T, n int, within time.Duration) []out {
	t.Helper()
	ctx := context.Background()
	deadline := time.Now().Add(within)
	for {
		s, err := e.js.Stream(ctx, "PGS2_DELIVERY")
		if err == nil {
			info, _ := s.Info(ctx)
			if info.State.Msgs >= uint64(n) {
				break
			}
		}
		if time.Now().After(deadline) {
			var have uint64
			if err == nil {
				info, _ := s.Info(ctx)
				have = info.State.Msgs
			}
			cs, _ := e.js.Stream(ctx, "PGS2_CHANGES")
			ci, _ := cs.Info(ctx)
			t.Fatalf("delivery stream holds %d messages after %s, want %d (changes stream: %d, publisher err %v)", have, within, n, ci.State.Msgs, e.pub.Err())
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond) // anything extra would show now
	s, _ := e.js.Stream(ctx, "PGS2_DELIVERY")
	info, _ := s.Info(ctx)
	if info.State.Msgs != uint64(n) {
		t.Fatalf("delivery stream holds %d messages, want %d", info.State.Msgs, n)
	}
	var res []out
	for seq := uint64(1); seq <= info.State.LastSeq; seq++ {
		m, err := s.GetMsg(ctx, seq)
		if err != nil {
			t.Fatal(err)
		}
		o := out{Subject: m.Subject, Header: m.Header, Raw: string(m.Data)}
		_ = json.Unmarshal(m.Data, &o.Body)
		res = append(res, o)
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

	type want struct{ subject, id string }
	wants := []want{
		{"pgs2.deliver.plain.my-basin.users.", u.Key() + ":plain"},
		{"pgs2.deliver.filtered.my-basin.all.", u.Key() + ":filtered"},
		{"pgs2.deliver.filtered.my-basin.all.", ""},
		{"pgs2.deliver.routed.logs-public.orders.", ""},
		{"pgs2.deliver.plain.my-basin.users.", ""},
	}
	for i, w := range wants {
		if !strings.HasPrefix(outs[i].Subject, w.subject) {
			t.Errorf("output %d subject %s, want %s*", i, outs[i].Subject, w.subject)
		}
		if w.id != "" && outs[i].Header.Get("Nats-Msg-Id") != w.id {
			t.Errorf("output %d id %q, want %q", i, outs[i].Header.Get("Nats-Msg-Id"), w.id)
		}
		if outs[i].Header.Get(bus.HeaderError) != "" {
			t.Errorf("output %d failed: %s", i, outs[i].Header.Get(bus.HeaderError))
		}
	}
	// Plain sinks get the body with metadata.consumer spliced in.
	md := outs[0].Body["metadata"].(map[string]any)
	if c, _ := md["consumer"].(map[string]any); c["name"] != "plain" || md["table_name"] != "users" {
		t.Errorf("plain body metadata %v", md)
	}
	// The transform replaced the body.
	if outs[3].Raw != `{"action":"insert","id":1}` {
		t.Errorf("transformed body %s", outs[3].Raw)
	}
	h := outs[3].Header
	if h.Get(bus.HeaderAction) != "insert" || h.Get(bus.HeaderTable) != "public.orders" || h.Get(bus.HeaderCommitMs) != "1795341600123" ||
		h.Get(bus.HeaderGroup) != `["1"]` || h.Get(bus.HeaderKey) == "" {
		t.Errorf("headers %v", h)
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
	if msg := outs[0].Header.Get(bus.HeaderError); !strings.Contains(msg, "not a valid S2 basin") ||
		!strings.HasPrefix(outs[0].Subject, "pgs2.deliver.bad.my-basin.users.") {
		t.Errorf("invalid routing result: subject %s error %q", outs[0].Subject, msg)
	}
	if !strings.HasPrefix(outs[1].Subject, "pgs2.deliver.bad.good-basin-2.users.") || outs[1].Header.Get(bus.HeaderError) != "" {
		t.Errorf("valid routing: %s %q", outs[1].Subject, outs[1].Header.Get(bus.HeaderError))
	}
	if msg := outs[2].Header.Get(bus.HeaderError); !strings.Contains(msg, "routing function") {
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
	if !strings.HasPrefix(outs[0].Subject, "pgs2.deliver.s.my-basin.a.") || !strings.HasPrefix(outs[1].Subject, "pgs2.deliver.s.my-basin.b.") {
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
	for i, o := range outs {
		id := o.Header.Get("Nats-Msg-Id")
		if seen[id] {
			t.Fatalf("output %d: %s twice", i, id)
		}
		seen[id] = true
		rec := o.Body["record"].(map[string]any)
		if want := float64(i/2 + 1); rec["v"] != want {
			t.Fatalf("output %d has v=%v, want %v (order)", i, rec["v"], want)
		}
	}
}

func parse(subject string) (sink, basin, stream, partition string, err error) {
	return bus.ParseDeliverySubject(subject)
}
