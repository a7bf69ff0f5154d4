package delivery_test

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/pgs2/pgs2/pkg/config"
	"github.com/pgs2/pgs2/pkg/ctl"
	"github.com/pgs2/pgs2/pkg/delivery"
	"github.com/pgs2/pgs2/pkg/s2local"
	"github.com/pgs2/pgs2/pkg/s2sink"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/s2-streamstore/s2-sdk-go/s2"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/codes"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/pgs2/pgs2/pkg/telemetry"
)

// TestEndToEnd: inserts, updates and deletes of two tables reach the right
// S2 streams in the message format; filter, transform and the seed's
// routing function each change the outcome.
func TestEndToEnd(t *testing.T) {
	p := newPipeline(t, `CREATE TABLE users (id int PRIMARY KEY, name text);
		CREATE TABLE orders (id int PRIMARY KEY, total numeric(10,2), doc jsonb)`,
		[]string{"public.users", "public.orders"}, "app-basin", "logs-public")
	p.sinks = []config.Sink{
		{Name: "users-to-s2", Tables: []string{"public.users"}, Basin: "app-basin", Stream: "users"},
		{Name: "no-deletes", Tables: []string{"public.users", "public.orders"}, Basin: "app-basin", Stream: "changes",
			Filter: `action != "delete"`},
		{Name: "slim", Tables: []string{"public.orders"}, Basin: "app-basin", Stream: "slim",
			Transform: `{"id": record.id, "action": action}`},
		{Name: "routed", Tables: []string{"public.orders"},
			Routing: `{"basin": "logs-" + metadata.table_schema, "stream": metadata.table_name}`},
	}
	p.start(t)
	p.pg.MustExec(t, "app", `INSERT INTO users VALUES (7, 'Ad')`)
	p.pg.MustExec(t, "app", `INSERT INTO orders VALUES (1, 9.50, '{"items": [1, 2]}')`)
	p.pg.MustExec(t, "app", `UPDATE users SET name = 'Ada' WHERE id = 7`)
	p.pg.MustExec(t, "app", `DELETE FROM users WHERE id = 7`)

	users := p.records(t, "app-basin", "users", 3)
	for i, want := range []string{"insert", "update", "delete"} {
		r := users[i]
		if r.Body["action"] != want || r.Headers["action"] != want || r.Headers["table"] != "public.users" {
			t.Errorf("users[%d]: action %v header %v table %v", i, r.Body["action"], r.Headers["action"], r.Headers["table"])
		}
		md := r.Body["metadata"].(map[string]any)
		if md["idempotency_key"] != r.Headers["idempotency-key"] || md["table_name"] != "users" {
			t.Errorf("users[%d]: metadata %v headers %v", i, md, r.Headers)
		}
		if c, _ := md["consumer"].(map[string]any); c["name"] != "users-to-s2" {
			t.Errorf("users[%d]: consumer %v", i, md["consumer"])
		}
		if now := uint64(time.Now().UnixMilli()); r.TS > now || r.TS < now-60_000 {
			t.Errorf("users[%d]: timestamp %d is not the commit time in ms (now %d)", i, r.TS, now)
		}
	}
	if rec := users[1].Body["record"].(map[string]any); rec["name"] != "Ada" {
		t.Errorf("update record %v", rec)
	}

	changes := p.records(t, "app-basin", "changes", 3) // the delete is filtered out
	for _, r := range changes {
		if r.Body["action"] == "delete" {
			t.Errorf("filtered sink got a delete")
		}
	}
	slim := p.records(t, "app-basin", "slim", 1)
	if slim[0].Raw != `{"action":"insert","id":1}` {
		t.Errorf("transformed body %s", slim[0].Raw)
	}
	if got := testutil.ToFloat64(metricVec(t, p.registry, "pgs2_delivery_records_appended_total", "users-to-s2")); got != 3 {
		t.Errorf("records_appended_total{sink=users-to-s2} = %v, want 3", got)
	}
	routed := p.records(t, "logs-public", "orders", 1)
	rec := routed[0].Body["record"].(map[string]any)
	if rec["total"] != 9.5 || !strings.Contains(routed[0].Raw, `"doc":{"items": [1, 2]}`) {
		t.Errorf("routed record %s", routed[0].Raw)
	}
}

// TestOrderUnderFaults: with 30 % of appends failing with 503 (some after
// taking effect as 504s) and jittered latency, every group's changes reach
// S2 in commit order, none missing; duplicates are counted (want 0).
func TestOrderUnderFaults(t *testing.T) {
	const groups, rounds = 200, 40
	p := newPipeline(t, `CREATE TABLE counters (id int PRIMARY KEY, v int NOT NULL)`, []string{"public.counters"}, "app-basin")
	p.sinks = []config.Sink{{Name: "counters", Tables: []string{"public.counters"}, Basin: "app-basin", Stream: "counters"}}
	if err := p.s2.SetFaults(s2local.FaultConfig{Rules: []s2local.FaultRule{{Stream: "counters", AppendsOnly: true,
		ErrorRate: 0.3, Statuses: []int{503, 503, 504}, LatencyMS: 2, JitterMS: 8}}}); err != nil {
		t.Fatal(err)
	}
	p.start(t)
	p.pg.MustExec(t, "app", fmt.Sprintf(`INSERT INTO counters SELECT g, 0 FROM generate_series(1, %d) g`, groups))
	for r := 1; r <= rounds; r++ {
		// Half the groups per transaction, in varying order.
		p.pg.MustExec(t, "app", `UPDATE counters SET v = v + 1 WHERE id % 2 = 0`)
		p.pg.MustExec(t, "app", `UPDATE counters SET v = v + 1 WHERE id % 2 = 1`)
	}
	recs := p.records(t, "app-basin", "counters", groups*(rounds+1))
	last := map[float64]float64{}
	keys := map[string]int{}
	dups := 0
	for _, r := range recs {
		if keys[r.Headers["idempotency-key"]]++; keys[r.Headers["idempotency-key"]] > 1 {
			dups++
		}
		rec := r.Body["record"].(map[string]any)
		id, v := rec["id"].(float64), rec["v"].(float64)
		if prev, ok := last[id]; (ok && v != prev+1) || (!ok && v != 0) {
			t.Fatalf("group %v: v=%v after %v (record %d)", id, v, prev, r.Seq)
		}
		last[id] = v
	}
	t.Logf("%d records, %d duplicates", len(recs), dups)
	if dups != 0 {
		t.Errorf("%d duplicates in S2", dups)
	}
	for id, v := range last {
		if v != rounds {
			t.Errorf("group %v ends at %v, want %d", id, v, rounds)
		}
	}
}

// TestOversizedRowParksItsGroup: a 2 MiB row can never be appended: it is
// parked with its reason, its group's later changes join it, and other
// groups keep flowing.
func TestOversizedRowParksItsGroup(t *testing.T) {
	p := newPipeline(t, `CREATE TABLE docs (id int PRIMARY KEY, body text)`, []string{"public.docs"}, "app-basin")
	p.sinks = []config.Sink{{Name: "docs", Tables: []string{"public.docs"}, Basin: "app-basin", Stream: "docs"}}
	p.start(t)
	p.pg.MustExec(t, "app", `INSERT INTO docs VALUES (1, repeat('x', 2*1024*1024))`)
	p.pg.MustExec(t, "app", `INSERT INTO docs VALUES (2, 'small')`)
	p.pg.MustExec(t, "app", `UPDATE docs SET body = 'now small' WHERE id = 1`)
	p.pg.MustExec(t, "app", `INSERT INTO docs VALUES (3, 'small too')`)
	recs := p.records(t, "app-basin", "docs", 2)
	for _, r := range recs {
		if id := r.Body["record"].(map[string]any)["id"]; id == float64(1) {
			t.Fatalf("a change of the parked group reached S2: %.100s", r.Raw)
		}
	}
	ctx := context.Background()
	ps, err := p.js.Stream(ctx, delivery.ParkedStream)
	if err != nil {
		t.Fatal(err)
	}
	if n := waitParked(t, ps, 2); n != 2 {
		t.Fatalf("park holds %d messages, want the oversized insert and the update after it", n)
	}
	parked := parkedMessages(t, ps)
	first := parked[0]
	if reason := first.Header.Get(delivery.HeaderParkReason); !strings.Contains(reason, "larger than S2's 1 MiB limit") {
		t.Errorf("park reason %q", reason)
	}
	second := parked[1]
	if reason := second.Header.Get(delivery.HeaderParkReason); !strings.Contains(reason, "earlier change of this group") {
		t.Errorf("second park reason %q", reason)
	}

	// The operator sees both, inspects the first, and acknowledges it.
	api := p.adminAPI(t)
	var list struct {
		Messages []struct {
			ID        string `json:"id"`
			Table     string `json:"table"`
			Group     string `json:"group"`
			BlockedBy string `json:"blocked_by"`
			LastError struct {
				Message string `json:"message"`
			} `json:"last_error"`
		} `json:"messages"`
	}
	getJSON(t, api.URL+"/v1/sinks/docs/messages", &list)
	if len(list.Messages) != 2 || list.Messages[0].Group != `["1"]` || list.Messages[0].Table != "public.docs" ||
		!strings.Contains(list.Messages[0].LastError.Message, "1 MiB") || list.Messages[1].BlockedBy != "group" {
		t.Fatalf("failed messages: %+v", list)
	}
	var shown struct {
		Payload string `json:"payload"`
	}
	getJSON(t, api.URL+"/v1/sinks/docs/messages/"+list.Messages[0].ID, &shown)
	if len(shown.Payload) < 2<<20 {
		t.Errorf("shown payload has %d bytes (base64), want the whole 2 MiB row", len(shown.Payload))
	}
	var status struct {
		Sinks []struct {
			Sink           string `json:"sink"`
			ParkedMessages string `json:"parked_messages"`
			ParkedGroups   string `json:"parked_groups"`
		} `json:"sinks"`
	}
	getJSON(t, api.URL+"/v1/status", &status)
	if len(status.Sinks) != 1 || status.Sinks[0].Sink != "docs" || status.Sinks[0].ParkedMessages != "2" || status.Sinks[0].ParkedGroups != "1" {
		t.Errorf("status %+v", status)
	}
	if resp, err := http.Post(api.URL+"/v1/sinks/docs/messages/retry", "application/json", nil); err != nil || resp.StatusCode != http.StatusAccepted {
		t.Errorf("retry all: %v %v", resp, err)
	} else {
		resp.Body.Close()
	}

	// The same through pgs2ctl, then the acknowledgement.
	addr := strings.TrimPrefix(api.URL, "http://")
	var out, errOut strings.Builder
	if code := ctl.Run(ctx, []string{"--admin", addr, "messages", "list", "--sink", "docs"}, &out, &errOut); code != 0 ||
		!strings.Contains(out.String(), "1 MiB") || !strings.Contains(out.String(), `["1"]`) {
		t.Fatalf("pgs2ctl messages list: %d %s %s", code, out.String(), errOut.String())
	}
	out.Reset()
	if code := ctl.Run(ctx, []string{"--admin", addr, "messages", "show", list.Messages[1].ID}, &out, &errOut); code != 0 ||
		!strings.Contains(out.String(), `"body": "now small"`) {
		t.Fatalf("pgs2ctl messages show: %d %s %s", code, out.String(), errOut.String())
	}
	if code := ctl.Run(ctx, []string{"--admin", addr, "messages", "ack", list.Messages[0].ID}, &out, &errOut); code == 0 {
		t.Fatal("pgs2ctl messages ack without --reason succeeded")
	}
	out.Reset()
	if code := ctl.Run(ctx, []string{"--admin", addr, "messages", "ack", list.Messages[0].ID, "--reason", "row too large; fixed at the source", "--operator", "ada"}, &out, &errOut); code != 0 {
		t.Fatalf("pgs2ctl messages ack: %d %s %s", code, out.String(), errOut.String())
	}
	// The group continues: the update behind the dropped insert is
	// delivered, then new changes flow directly.
	p.pg.MustExec(t, "app", `UPDATE docs SET body = 'later' WHERE id = 1`)
	recs = p.records(t, "app-basin", "docs", 4)
	if b := recs[2].Body["record"].(map[string]any)["body"]; b != "now small" {
		t.Errorf("record 2 body %v, want the parked update", b)
	}
	if b := recs[3].Body["record"].(map[string]any)["body"]; b != "later" {
		t.Errorf("record 3 body %v, want the later update", b)
	}
	var audit struct {
		Records []struct {
			Action   string `json:"action"`
			Operator string `json:"operator"`
			Reason   string `json:"reason"`
			Message  struct {
				Group string `json:"group"`
			} `json:"message"`
		} `json:"records"`
	}
	getJSON(t, api.URL+"/v1/sinks/docs/audit", &audit)
	// The retry of the whole sink, then the acknowledgement.
	if len(audit.Records) != 2 || audit.Records[0].Action != "retry" || !strings.Contains(audit.Records[0].Reason, "1 groups, 2 messages") ||
		audit.Records[1].Action != "ack" || audit.Records[1].Operator != "ada" || !strings.Contains(audit.Records[1].Reason, "too large") ||
		audit.Records[1].Message.Group != `["1"]` {
		t.Errorf("audit records %+v", audit)
	}
}

func getJSON(t *testing.T, url string, v any) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("GET %s: %d %s", url, resp.StatusCode, b)
	}
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		t.Fatal(err)
	}
}

// TestStreamFailuresAreVisible: a bad token (401) and a missing stream
// (404) block their own sink's stream, visible with S2's error through the
// admin API, while another sink flows; fixing the cause lets them continue.
func TestStreamFailuresAreVisible(t *testing.T) {
	t.Setenv("S2_GOOD", "good-token")
	t.Setenv("S2_BAD", "bad-token")
	p := newPipeline(t, `CREATE TABLE users (id int PRIMARY KEY)`, []string{"public.users"}, "app-basin")
	p.manualStreams = true
	p.s2.Close()
	// s2local with a token: rebuild on a new server.
	srv, err := s2local.New(s2local.Options{Token: "good-token"})
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(srv)
	defer hs.Close()
	p.s2, p.s2url = srv, hs.URL
	p.client, _ = s2sink.New(s2sink.Config{Endpoint: hs.URL, Token: "good-token"})
	ctx := context.Background()
	if _, err := p.client.SDK().Basins.Create(ctx, s2.CreateBasinArgs{Basin: "app-basin"}); err != nil {
		t.Fatal(err)
	}
	_ = p.client.CreateStream(ctx, "app-basin", "ok")
	_ = p.client.CreateStream(ctx, "app-basin", "badtoken")
	p.sinks = []config.Sink{
		{Name: "ok", Tables: []string{"public.users"}, Basin: "app-basin", Stream: "ok", AccessTokenEnv: "S2_GOOD"},
		{Name: "badtoken", Tables: []string{"public.users"}, Basin: "app-basin", Stream: "badtoken", AccessTokenEnv: "S2_BAD"},
		{Name: "nostream", Tables: []string{"public.users"}, Basin: "app-basin", Stream: "missing", AccessTokenEnv: "S2_GOOD"},
	}
	p.start(t)
	p.pg.MustExec(t, "app", `INSERT INTO users SELECT g FROM generate_series(1, 5) g`)
	p.records(t, "app-basin", "ok", 5)

	api := p.adminAPI(t)
	type failedList struct {
		Messages []struct {
			ID        string `json:"id"`
			BlockedBy string `json:"blocked_by"`
			LastError struct {
				HTTPStatus int    `json:"http_status"`
				Code       string `json:"code"`
			} `json:"last_error"`
		} `json:"messages"`
	}
	wait := func(sink string, status int, code string) string {
		deadline := time.Now().Add(20 * time.Second)
		for {
			var l failedList
			getJSON(t, api.URL+"/v1/sinks/"+sink+"/messages", &l)
			if len(l.Messages) == 1 && l.Messages[0].LastError.HTTPStatus == status && l.Messages[0].LastError.Code == code && l.Messages[0].BlockedBy == "stream" {
				return l.Messages[0].ID
			}
			if time.Now().After(deadline) {
				t.Fatalf("sink %s: failed messages %+v, want one blocked stream with %d %s", sink, l, status, code)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	bad := wait("badtoken", 401, "authn")
	missing := wait("nostream", 404, "stream_not_found")

	// Every id the list prints works with show; ack of a blocked stream
	// (its head is not parked) says why not (before, both were refused as
	// unknown ids).
	addr := strings.TrimPrefix(api.URL, "http://")
	var out, errOut strings.Builder
	if code := ctl.Run(ctx, []string{"--admin", addr, "messages", "show", bad}, &out, &errOut); code != 0 ||
		!strings.Contains(out.String(), "authn") || !strings.Contains(out.String(), "401") {
		t.Errorf("pgs2ctl messages show %s: %d %s %s", bad, code, out.String(), errOut.String())
	}
	out.Reset()
	var shown struct {
		ID        string `json:"id"`
		BlockedBy string `json:"blocked_by"`
	}
	if code := ctl.Run(ctx, []string{"--admin", addr, "messages", "show", bad, "--json"}, &out, &errOut); code != 0 ||
		json.Unmarshal([]byte(out.String()), &shown) != nil || shown.ID != bad || shown.BlockedBy != "stream" {
		t.Errorf("pgs2ctl messages show %s --json: %d %s %s", bad, code, out.String(), errOut.String())
	}
	out.Reset()
	errOut.Reset()
	if code := ctl.Run(ctx, []string{"--admin", addr, "messages", "ack", bad, "--reason", "x"}, &out, &errOut); code == 0 ||
		!strings.Contains(errOut.String(), "cannot be acknowledged") {
		t.Errorf("pgs2ctl messages ack %s: %d %s %s", bad, code, out.String(), errOut.String())
	}

	// Fix the stream and ask for a retry now.
	if err := p.client.CreateStream(ctx, "app-basin", "missing"); err != nil {
		t.Fatal(err)
	}
	resp, err := http.Post(api.URL+"/v1/sinks/nostream/messages/"+missing+"/retry", "application/json", nil)
	if err != nil || resp.StatusCode != http.StatusAccepted {
		t.Fatalf("retry: %v %v", resp, err)
	}
	resp.Body.Close()
	p.records(t, "app-basin", "missing", 5)

	// Fix the token: restart delivery with the right one.
	t.Setenv("S2_BAD", "good-token")
	p.stopDelivery()
	p.stopDelivery = p.startDelivery(t, p.sinks)
	p.records(t, "app-basin", "badtoken", 5)
	var l failedList
	deadline := time.Now().Add(10 * time.Second)
	for getJSON(t, api.URL+"/v1/sinks/-/messages", &l); len(l.Messages) > 0 && time.Now().Before(deadline); getJSON(t, api.URL+"/v1/sinks/-/messages", &l) {
		time.Sleep(50 * time.Millisecond)
		l = failedList{}
	}
	if len(l.Messages) != 0 {
		t.Fatalf("failures left after the fixes: %+v", l)
	}
}

// TestMaxAttemptsDeadLetters: with retry.max_attempts, a batch S2 keeps
// refusing, and a parked record, go to the dead-letter stream with their
// last error instead of blocking forever; nothing is dropped silently.
func TestMaxAttemptsDeadLetters(t *testing.T) {
	p := newPipeline(t, `CREATE TABLE users (id int PRIMARY KEY, body text)`, []string{"public.users"}, "app-basin")
	p.manualStreams = true
	p.sinks = []config.Sink{
		{Name: "gone", Tables: []string{"public.users"}, Basin: "app-basin", Stream: "gone",
			Retry: config.Retry{Initial: config.Duration(10 * time.Millisecond), Max: config.Duration(20 * time.Millisecond), MaxAttempts: 2}},
		{Name: "big", Tables: []string{"public.users"}, Basin: "app-basin", Stream: "big", CreateStream: true,
			Retry: config.Retry{Initial: config.Duration(10 * time.Millisecond), Max: config.Duration(20 * time.Millisecond), MaxAttempts: 2}},
	}
	p.start(t)
	p.pg.MustExec(t, "app", `INSERT INTO users VALUES (1, repeat('x', 2*1024*1024))`)
	p.pg.MustExec(t, "app", `UPDATE users SET body = 'small' WHERE id = 1`)
	// The parked oversized insert is dead-lettered, its group continues.
	recs := p.records(t, "app-basin", "big", 1)
	if recs[0].Body["record"].(map[string]any)["body"] != "small" {
		t.Fatalf("record %.100s", recs[0].Raw)
	}
	ctx := context.Background()
	dead, err := p.js.Stream(ctx, delivery.DeadStream)
	if err != nil {
		t.Fatal(err)
	}
	var gone, big int
	deadline := time.Now().Add(30 * time.Second)
	for (gone < 1 || big < 1) && time.Now().Before(deadline) {
		gone, big = 0, 0
		for seq := uint64(1); ; seq++ {
			m, err := dead.GetMsg(ctx, seq)
			if err != nil {
				break
			}
			switch {
			case strings.HasPrefix(m.Subject, "pgs2.dead.gone.") && strings.Contains(m.Header.Get(delivery.HeaderParkReason), "404"):
				gone++
			case strings.HasPrefix(m.Subject, "pgs2.dead.big.") && strings.Contains(m.Header.Get(delivery.HeaderParkReason), "1 MiB"):
				big++
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	if gone < 1 || big != 1 {
		t.Fatalf("dead letters: %d for the missing stream (want ≥ 1, with its 404), %d oversized (want 1)", gone, big)
	}
}

// TestOneTracePerChange: capture's transaction span, the router's span and
// delivery's append span belong to one trace.
func TestOneTracePerChange(t *testing.T) {
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	otel.SetTracerProvider(tp)
	telemetry.SetEnabled(true)
	defer func() { telemetry.SetEnabled(false); otel.SetTracerProvider(noop.NewTracerProvider()) }()

	p := newPipeline(t, `CREATE TABLE users (id int PRIMARY KEY)`, []string{"public.users"}, "app-basin")
	p.sinks = []config.Sink{
		{Name: "users", Tables: []string{"public.users"}, Basin: "app-basin", Stream: "users"},
		{Name: "flaky", Tables: []string{"public.users"}, Basin: "app-basin", Stream: "flaky", Retry: config.Retry{Initial: config.Duration(20 * time.Millisecond), Max: config.Duration(50 * time.Millisecond)}},
		{Name: "bad", Tables: []string{"public.users"}, Basin: "app-basin", Stream: "bad", Routing: `{"stream": record.no_such_column}`},
	}
	p.start(t)
	p.pg.MustExec(t, "app", `INSERT INTO users VALUES (1)`)
	p.records(t, "app-basin", "users", 1)
	p.records(t, "app-basin", "flaky", 1)
	// S2 refuses flaky's appends from now on: its next batch's sends fail.
	if err := p.s2.SetFaults(s2local.FaultConfig{Rules: []s2local.FaultRule{{Stream: "flaky", AppendsOnly: true, ErrorRate: 1, Statuses: []int{503}}}}); err != nil {
		t.Fatal(err)
	}
	p.pg.MustExec(t, "app", `INSERT INTO users VALUES (2)`)

	attrs := func(s sdktrace.ReadOnlySpan) map[string]string {
		m := map[string]string{}
		for _, kv := range s.Attributes() {
			m[string(kv.Key)] = kv.Value.Emit()
		}
		return m
	}
	want := func(s sdktrace.ReadOnlySpan, kv map[string]string) {
		t.Helper()
		got := attrs(s)
		for k, v := range kv {
			if got[k] != v {
				t.Errorf("span %q: %s = %q, want %q (attributes %v)", s.Name(), k, got[k], v, got)
			}
		}
	}
	var publish, process, send, failedSend sdktrace.ReadOnlySpan
	deadline := time.Now().Add(10 * time.Second)
	for publish == nil || process == nil || send == nil || failedSend == nil {
		if time.Now().After(deadline) {
			var names []string
			for _, s := range rec.Ended() {
				names = append(names, s.Name())
			}
			for _, s := range rec.Started() {
				names = append(names, "started:"+s.Name())
			}
			t.Fatalf("spans %v: want publish PGS2_CHANGES, process PGS2_CHANGES, send users, a failed send flaky", names)
		}
		time.Sleep(50 * time.Millisecond)
		for _, s := range rec.Ended() {
			switch s.Name() {
			case "publish PGS2_CHANGES":
				publish = cmp.Or(publish, s) // the first change's
			case "process PGS2_CHANGES":
				process = cmp.Or(process, s)
			case "send users":
				send = cmp.Or(send, s)
			case "send flaky":
				if s.Status().Code == codes.Error {
					failedSend = s
				}
			}
		}
	}
	// One trace across the three services, each consumer linked to its
	// producer.
	id := publish.SpanContext().TraceID()
	for _, s := range []sdktrace.ReadOnlySpan{process, send} {
		if s.SpanContext().TraceID() != id {
			t.Errorf("span %q is in trace %s, not the change's %s", s.Name(), s.SpanContext().TraceID(), id)
		}
	}
	linked := func(s, to sdktrace.ReadOnlySpan) bool {
		for _, l := range s.Links() {
			if l.SpanContext.SpanID() == to.SpanContext().SpanID() {
				return true
			}
		}
		return false
	}
	if !linked(process, publish) || process.Parent().SpanID() != publish.SpanContext().SpanID() {
		t.Errorf("process span: parent %s, links %v; want the publish span %s", process.Parent().SpanID(), process.Links(), publish.SpanContext().SpanID())
	}
	if !linked(send, process) {
		t.Errorf("send span links %v, want the process span %s", send.Links(), process.SpanContext().SpanID())
	}
	for s, kind := range map[sdktrace.ReadOnlySpan]trace.SpanKind{publish: trace.SpanKindProducer, process: trace.SpanKindConsumer, send: trace.SpanKindProducer} {
		if s.SpanKind() != kind {
			t.Errorf("span %q is a %s span, want %s", s.Name(), s.SpanKind(), kind)
		}
	}
	want(publish, map[string]string{"messaging.system": "nats", "messaging.operation.name": "publish", "messaging.operation.type": "send",
		"messaging.destination.name": "PGS2_CHANGES", "messaging.batch.message_count": "1", "pgs2.source": "app"})
	want(process, map[string]string{"messaging.system": "nats", "messaging.operation.name": "process", "messaging.operation.type": "process",
		"messaging.destination.name": "PGS2_CHANGES", "pgs2.table": "public.users", "error.type": "function"})
	if process.Status().Code != codes.Error || !strings.Contains(process.Status().Description, "sink bad") {
		t.Errorf("process span status %v: want an error naming sink bad (its routing function fails)", process.Status())
	}
	want(send, map[string]string{"messaging.system": "s2", "messaging.operation.name": "send", "messaging.operation.type": "send",
		"messaging.destination.name": "users", "messaging.batch.message_count": "1", "pgs2.basin": "app-basin", "pgs2.sink": "users"})
	if send.Status().Code == codes.Error {
		t.Errorf("send users failed: %v", send.Status())
	}
	want(failedSend, map[string]string{"messaging.destination.name": "flaky", "error.type": "unavailable"})
}

// TestChangeOverNATSMaxPayload: a change larger than the NATS server takes
// does not stall capture: a marked stub goes through and delivery parks it
// visibly, while other changes flow.
func TestChangeOverNATSMaxPayload(t *testing.T) {
	p := newPipeline(t, `CREATE TABLE docs (id int PRIMARY KEY, body text)`, []string{"public.docs"}, "app-basin")
	p.sinks = []config.Sink{{Name: "docs", Tables: []string{"public.docs"}, Basin: "app-basin", Stream: "docs"}}
	p.start(t)
	p.pg.MustExec(t, "app", `INSERT INTO docs VALUES (1, repeat('x', 9*1024*1024))`) // the test server allows 8 MB
	p.pg.MustExec(t, "app", `INSERT INTO docs VALUES (2, 'small')`)
	recs := p.records(t, "app-basin", "docs", 1)
	if recs[0].Body["record"].(map[string]any)["id"] != float64(2) {
		t.Fatalf("record %.200s", recs[0].Raw)
	}
	ctx := context.Background()
	ps, err := p.js.Stream(ctx, delivery.ParkedStream)
	if err != nil {
		t.Fatal(err)
	}
	waitParked(t, ps, 1)
	m := parkedMessages(t, ps)[0]
	if reason := m.Header.Get(delivery.HeaderParkReason); !strings.Contains(reason, "max_payload") {
		t.Fatalf("park reason %q", reason)
	}
}

// metricVec returns the counter of a family for one sink label.
func metricVec(t *testing.T, r *prometheus.Registry, name, sink string) prometheus.Collector {
	t.Helper()
	families, err := r.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "sink" && l.GetValue() == sink {
					return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "x"}, func() float64 { return m.GetCounter().GetValue() })
				}
			}
		}
	}
	t.Fatalf("no %s{sink=%q}", name, sink)
	return nil
}

// adminAPI serves the delivery admin API for the test.
func (p *pipeline) adminAPI(t *testing.T) *httptest.Server {
	t.Helper()
	admin, err := delivery.NewAdmin(context.Background(), p.js, 1)
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	admin.Register(mux)
	api := httptest.NewServer(mux)
	t.Cleanup(api.Close)
	return api
}

// waitParked waits (up to 10s) until the parks hold n messages and returns
// how many they hold.
func waitParked(t *testing.T, ps jetstream.Stream, n uint64) uint64 {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := uint64(len(parkedMessages(t, ps)))
		if got >= n || time.Now().After(deadline) {
			return got
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// parkedMessages returns the parked messages (not the owners' markers),
// oldest first.
func parkedMessages(t *testing.T, ps jetstream.Stream) []*jetstream.RawStreamMsg {
	t.Helper()
	ctx := context.Background()
	var out []*jetstream.RawStreamMsg
	for seq := uint64(1); ; {
		m, err := ps.GetMsg(ctx, seq, jetstream.WithGetMsgSubject(delivery.ParkRoot+".>"))
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		seq = m.Sequence + 1
		if !strings.HasSuffix(m.Subject, ".owner") {
			out = append(out, m)
		}
	}
}

// TestFixedFunctionDeliversParkedChange: a transform that fails on one row
// parks that row's group; once the function is fixed (a delivery restarted
// with the new config, or the running one reloaded on SIGHUP), the retried
// change goes through, in order, and the group flows again.
func TestFixedFunctionDeliversParkedChange(t *testing.T) {
	for _, how := range []string{"restart", "reload"} {
		t.Run(how, func(t *testing.T) {
			p := newPipeline(t, `CREATE TABLE ratios (id int PRIMARY KEY, d int)`, []string{"public.ratios"}, "app-basin")
			p.sinks = []config.Sink{{Name: "ratios", Tables: []string{"public.ratios"}, Basin: "app-basin", Stream: "ratios",
				Transform: `{"id": record.id, "inv": 100 / record.d}`}}
			p.start(t)
			p.pg.MustExec(t, "app", `INSERT INTO ratios VALUES (1, 0)`) // division by zero
			p.pg.MustExec(t, "app", `INSERT INTO ratios VALUES (2, 5)`)
			p.pg.MustExec(t, "app", `UPDATE ratios SET d = 4 WHERE id = 1`) // joins the park
			recs := p.records(t, "app-basin", "ratios", 1)
			if recs[0].Raw != `{"id":2,"inv":20}` {
				t.Fatalf("record %s", recs[0].Raw)
			}
			ps, err := p.js.Stream(context.Background(), delivery.ParkedStream)
			if err != nil {
				t.Fatal(err)
			}
			if n := waitParked(t, ps, 2); n != 2 {
				t.Fatalf("park holds %d, want the failed insert and the update behind it", n)
			}
			fixed := append([]config.Sink(nil), p.sinks...)
			fixed[0].Transform = `{"id": record.id, "inv": record.d == 0 ? 0 : 100 / record.d}`
			if how == "restart" {
				p.stopDelivery()
				p.stopDelivery = p.startDelivery(t, fixed)
			} else {
				bad := append([]config.Sink(nil), fixed...)
				bad[0].Transform = `{"id": `
				if _, err := p.delivery.Reload(bad); err == nil || !strings.Contains(err.Error(), `sink "ratios"`) {
					t.Fatalf("Reload of a function that does not compile = %v, want an error naming the sink", err)
				}
				moved := append([]config.Sink(nil), fixed...)
				moved[0].Stream = "elsewhere"
				moved = append(moved, config.Sink{Name: "new", Tables: []string{"public.ratios"}, Basin: "app-basin", Stream: "n"})
				if restart, err := p.delivery.Reload(moved); err != nil || strings.Join(restart, ",") != "new,ratios" {
					t.Fatalf("Reload with a new sink and a moved stream = %v, %v; want both named for a restart", restart, err)
				}
				if restart, err := p.delivery.Reload(fixed); err != nil || len(restart) != 0 {
					t.Fatalf("Reload of fixed functions = %v, %v", restart, err)
				}
			}
			recs = p.records(t, "app-basin", "ratios", 3)
			if recs[1].Raw != `{"id":1,"inv":0}` || recs[2].Raw != `{"id":1,"inv":25}` {
				t.Fatalf("records after the fix: %s, %s", recs[1].Raw, recs[2].Raw)
			}
		})
	}
}

// TestListPagesThroughEveryFailedMessage: pgs2ctl messages list shows
// every parked message, following the API's pages (100 a page); before,
// it showed the first page only.
func TestListPagesThroughEveryFailedMessage(t *testing.T) {
	p := newPipeline(t, `CREATE TABLE docs (id int PRIMARY KEY, body text)`, []string{"public.docs"}, "app-basin")
	p.sinks = []config.Sink{{Name: "docs", Tables: []string{"public.docs"}, Basin: "app-basin", Stream: "docs"}}
	p.start(t)
	p.pg.MustExec(t, "app", `INSERT INTO docs VALUES (1, repeat('x', 2*1024*1024))`)
	const n = 250
	p.pg.MustExec(t, "app", `DO $$ BEGIN FOR i IN 1..249 LOOP UPDATE docs SET body = 'v' || i WHERE id = 1; COMMIT; END LOOP; END $$`)
	ps, err := p.js.Stream(context.Background(), delivery.ParkedStream)
	if err != nil {
		t.Fatal(err)
	}
	if got := waitParked(t, ps, n); got != n {
		t.Fatalf("park holds %d messages, want %d", got, n)
	}
	addr := strings.TrimPrefix(p.adminAPI(t).URL, "http://")
	var out, errOut strings.Builder
	if code := ctl.Run(context.Background(), []string{"--admin", addr, "messages", "list", "--json"}, &out, &errOut); code != 0 {
		t.Fatalf("pgs2ctl messages list: %d %s", code, errOut.String())
	}
	ids := map[string]bool{}
	for _, line := range strings.Split(strings.TrimSpace(out.String()), "\n") {
		var m struct{ ID string }
		if err := json.Unmarshal([]byte(line), &m); err != nil || m.ID == "" {
			t.Fatalf("line %q: %v", line, err)
		}
		ids[m.ID] = true
	}
	if len(ids) != n {
		t.Fatalf("pgs2ctl messages list printed %d distinct messages, want %d", len(ids), n)
	}
}

// TestNewStreamDeliversAtOnce: the first change routed to an S2 stream
// no process writes yet reaches it without waiting for delivery's
// periodic look for new units (Discover: a minute here; it was one second
// by default, which the first change of every new stream waited).
func TestNewStreamDeliversAtOnce(t *testing.T) {
	p := newPipeline(t, `CREATE TABLE items (id int PRIMARY KEY)`, []string{"public.items"}, "app-basin")
	p.sinks = []config.Sink{{Name: "routed", Tables: []string{"public.items"}, Basin: "app-basin",
		Routing: `{"stream": "s-" + string(record.id)}`}}
	p.discover = time.Minute
	p.start(t)
	for id := 1; id <= 3; id++ {
		start := time.Now()
		p.pg.MustExec(t, "app", `INSERT INTO items VALUES ($1)`, id)
		p.recordsWithin(t, "app-basin", fmt.Sprintf("s-%d", id), 1, 10*time.Second)
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("the first change to new stream s-%d took %s", id, d.Round(time.Millisecond))
		}
	}
}
