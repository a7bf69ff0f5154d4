package capture_test

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/pgs2/pgs2/pkg/capture"
)

// TestLogicalMessages: capture reads logical decoding messages (the
// watermarks backfills write into the WAL) without taking them for changes,
// transactional or not, and the changes around them arrive as they are.
func TestLogicalMessages(t *testing.T) {
	e := newEnv(t, `CREATE TABLE users (id int PRIMARY KEY, name text)`, "public.users")
	reg := prometheus.NewRegistry()
	e.opts = append(e.opts, capture.WithMetrics(reg))
	stop := e.run(t)
	e.pg.MustExec(t, "app", `INSERT INTO users VALUES (1, 'a')`)
	e.pg.MustExec(t, "app", `SELECT pg_logical_emit_message(false, 'pgs2', 'low')`)
	e.pg.MustExec(t, "app", `BEGIN; INSERT INTO users VALUES (2, 'b'); SELECT pg_logical_emit_message(true, 'other-app', 'x'); COMMIT`)
	e.pg.MustExec(t, "app", `SELECT pg_logical_emit_message(false, 'pgs2', 'high')`)
	e.pg.MustExec(t, "app", `INSERT INTO users VALUES (3, 'c')`)
	msgs := e.waitMessages(t, 3)
	for i, m := range msgs {
		if id, ok := m.Msg.Record["id"].(float64); !ok || int(id) != i+1 {
			t.Fatalf("change %d is %s, want the insert of id %d", i, m.Raw, i+1)
		}
	}
	counter := func() float64 {
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			if mf.GetName() == "pgs2_capture_logical_messages_total" {
				return mf.GetMetric()[0].GetCounter().GetValue()
			}
		}
		return 0
	}
	deadline := time.Now().Add(10 * time.Second)
	for counter() < 3 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if n := counter(); n != 3 {
		t.Fatalf("capture read %v logical messages, want 3", n)
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
}
