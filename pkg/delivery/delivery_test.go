package delivery_test

import (
	"strings"
	"testing"
	"time"

	"github.com/pgs2/pgs2/pkg/config"
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
	routed := p.records(t, "logs-public", "orders", 1)
	rec := routed[0].Body["record"].(map[string]any)
	if rec["total"] != 9.5 || !strings.Contains(routed[0].Raw, `"doc":{"items": [1, 2]}`) {
		t.Errorf("routed record %s", routed[0].Raw)
	}
}
