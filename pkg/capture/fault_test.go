package capture_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgs2/pgs2/pkg/change"
	"github.com/pgs2/pgs2/pkg/pgtest"
	"github.com/pgs2/pgs2/pkg/proctest"
)

// startProc runs bin/capture as its own process with config cfgPath.
func (e *env) startProc(t *testing.T, cfgPath string, _ int) *proctest.Proc {
	t.Helper()
	return proctest.Start(t, proctest.Build(t, "../../services/capture"), "--config", cfgPath)
}

// configFile writes the env's capture config.
func (e *env) configFile(t *testing.T) string {
	t.Helper()
	tables := ""
	for _, tb := range e.cfg.Repl.Tables {
		tables += tb + ", "
	}
	cfg := fmt.Sprintf(`source:
  name: %s
  dsn: %s
  slot: %s
  publication: %s
  tables: [%s]
nats:
  url: %s
  partitions: %d
  duplicate_window: 2m
`, e.cfg.Source, e.pg.DSN("app"), e.cfg.Repl.Slot, e.cfg.Repl.Publication, tables[:len(tables)-2], e.ns.URL(), e.cfg.Partitions)
	p := filepath.Join(t.TempDir(), "cdc.yaml")
	if err := os.WriteFile(p, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

const faultSchema = `
	CREATE TABLE acct (id serial PRIMARY KEY, v int NOT NULL, pad text);
	CREATE TABLE tomb (id int PRIMARY KEY, v int NOT NULL);`

// workload changes acct until ctx ends: inserts, single and multi-row
// updates (each v = v + 1), and deletes recorded in tomb with their last v.
// Failed transactions (the database restarting under it) are retried with
// a new connection; the database's final state says what was committed.
func workload(ctx context.Context, t *testing.T, dsn string, workers int) func() {
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(seed uint64) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, 7))
			var conn *pgx.Conn
			defer func() {
				if conn != nil {
					conn.Close(context.Background())
				}
			}()
			for ctx.Err() == nil {
				if conn == nil {
					c, err := pgx.Connect(ctx, dsn)
					if err != nil {
						time.Sleep(50 * time.Millisecond)
						continue
					}
					conn = c
				}
				// A step is not cut by ctx: a COMMIT cancelled in flight
				// may still commit after the workload returned, behind
				// the check's read of the table.
				sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
				err := step(sctx, conn, rng)
				cancel()
				if err != nil && ctx.Err() == nil {
					conn.Close(context.Background())
					conn = nil
				}
			}
		}(uint64(w))
	}
	return wg.Wait
}

func step(ctx context.Context, conn *pgx.Conn, rng *rand.Rand) error {
	tx, err := conn.Begin(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback(context.Background())
	var max int
	if err := tx.QueryRow(ctx, `SELECT COALESCE(max(id), 0) FROM acct`).Scan(&max); err != nil {
		return err
	}
	switch r := rng.IntN(100); {
	case r < 35 || max < 20:
		for i := 0; i < 1+rng.IntN(5); i++ {
			if _, err := tx.Exec(ctx, `INSERT INTO acct (v, pad) VALUES (0, repeat('p', $1))`, rng.IntN(200)); err != nil {
				return err
			}
		}
	case r < 85:
		for i := 0; i < 1+rng.IntN(10); i++ {
			if _, err := tx.Exec(ctx, `UPDATE acct SET v = v + 1 WHERE id = $1`, 1+rng.IntN(max)); err != nil {
				return err
			}
		}
	case r < 95:
		if _, err := tx.Exec(ctx, `UPDATE acct SET v = v + 1 WHERE id % 13 = $1`, rng.IntN(13)); err != nil {
			return err
		}
	default:
		var id, v int
		err := tx.QueryRow(ctx, `DELETE FROM acct WHERE id = $1 RETURNING id, v`, 1+rng.IntN(max)).Scan(&id, &v)
		if errors.Is(err, pgx.ErrNoRows) {
			return tx.Commit(ctx)
		}
		if err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `INSERT INTO tomb VALUES ($1, $2)`, id, v); err != nil {
			return err
		}
	}
	return tx.Commit(ctx)
}

// verifyExactlyOnce checks that the changes stream holds every committed
// change of acct exactly once, in commit order: per row an insert with v=0,
// then updates v=1..final, then the delete if it was deleted; and stream
// order is commit order.
func (e *env) verifyExactlyOnce(t *testing.T) {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, e.pg.DSN("app"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	final := map[int]int{}   // live rows: id → v
	deleted := map[int]int{} // id → v at delete
	var want int
	for _, q := range []struct {
		sql string
		m   map[int]int
		del int
	}{{`SELECT id, v FROM acct`, final, 0}, {`SELECT id, v FROM tomb`, deleted, 1}} {
		rows, err := conn.Query(ctx, q.sql)
		if err != nil {
			t.Fatal(err)
		}
		for rows.Next() {
			var id, v int
			if err := rows.Scan(&id, &v); err != nil {
				t.Fatal(err)
			}
			q.m[id] = v
			want += 1 + v + q.del
		}
		rows.Close()
	}

	var msgs []got
	deadline := time.Now().Add(90 * time.Second)
	for {
		msgs = e.readAll(t)
		if len(msgs) >= want || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("committed changes: %d, stored: %d, rows: %d live, %d deleted", want, len(msgs), len(final), len(deleted))

	type state struct {
		v       int
		deleted bool
	}
	seen := map[int]*state{}
	keys := map[string]bool{}
	var prev change.Position
	errs := 0
	fail := func(format string, a ...any) {
		errs++
		if errs <= 20 {
			t.Errorf(format, a...)
		}
	}
	for _, m := range msgs {
		md := m.Msg.Metadata
		pos := change.Position{LSN: md.CommitLSN, Idx: md.CommitIdx}
		if !prev.Less(pos) {
			fail("seq %d: position %s does not follow %s (duplicate or out of commit order)", m.Seq, pos, prev)
		}
		prev = pos
		if keys[md.IdempotencyKey] {
			fail("seq %d: duplicate idempotency key %s", m.Seq, md.IdempotencyKey)
		}
		keys[md.IdempotencyKey] = true
		id := int(m.Msg.Record["id"].(float64))
		s := seen[id]
		switch m.Msg.Action {
		case change.Insert:
			if s != nil {
				fail("id %d: second insert at seq %d", id, m.Seq)
			}
			seen[id] = &state{}
			if v := m.Msg.Record["v"].(float64); v != 0 {
				fail("id %d: insert with v=%v", id, v)
			}
		case change.Update:
			if s == nil || s.deleted {
				fail("id %d: update at seq %d without a live insert before it", id, m.Seq)
				continue
			}
			v := int(m.Msg.Record["v"].(float64))
			if v != s.v+1 {
				fail("id %d: update to v=%d after v=%d (lost, duplicated or reordered)", id, v, s.v)
			}
			s.v = v
		case change.Delete:
			if s == nil || s.deleted {
				fail("id %d: delete at seq %d without a live insert", id, m.Seq)
				continue
			}
			s.deleted = true
		}
	}
	for id, v := range final {
		if s := seen[id]; s == nil || s.deleted || s.v != v {
			fail("id %d: committed v=%d, stream has %+v", id, v, s)
		}
	}
	for id, v := range deleted {
		if s := seen[id]; s == nil || !s.deleted || s.v != v {
			fail("id %d: deleted at v=%d, stream has %+v", id, v, s)
		}
	}
	if len(msgs) != want {
		fail("stream holds %d changes, %d were committed", len(msgs), want)
	}
	if errs > 20 {
		t.Errorf("... %d problems in all", errs)
	}
}

// underLoad runs capture as a process under a workload, disrupts it
// `times` times (pause() apart; disrupt returns the capture process to go
// on with), then checks that JetStream holds every committed change exactly
// once, in commit order, and that capture stops cleanly.
func underLoad(t *testing.T, times int, pause func() time.Duration, disrupt func(e *env, p *proctest.Proc, cfg string, i int) *proctest.Proc) *proctest.Proc {
	t.Helper()
	e := newEnv(t, faultSchema, "public.acct")
	cfg := e.configFile(t)
	ctx, cancel := context.WithCancel(context.Background())
	p := e.startProc(t, cfg, 0)
	wait := workload(ctx, t, e.pg.DSN("app"), 2)
	for i := 1; i <= times; i++ {
		time.Sleep(pause())
		p = disrupt(e, p, cfg, i)
	}
	time.Sleep(time.Second)
	cancel()
	wait()
	e.verifyExactlyOnce(t)
	p.Term(t)
	return p
}

// TestCrashSIGKILL kills capture five times under a running workload.
func TestCrashSIGKILL(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	underLoad(t, 5, func() time.Duration { return time.Duration(300+rng.IntN(900)) * time.Millisecond },
		func(e *env, p *proctest.Proc, cfg string, i int) *proctest.Proc {
			p.Kill()
			return e.startProc(t, cfg, i)
		})
}

// TestPostgresRestart restarts Postgres twice under a running capture.
func TestPostgresRestart(t *testing.T) {
	p := underLoad(t, 2, func() time.Duration { return time.Second },
		func(e *env, p *proctest.Proc, _ string, _ int) *proctest.Proc {
			if err := e.pg.Restart(context.Background()); err != nil {
				t.Fatal(err)
			}
			return p
		})
	p.MustLog(t, "capture session ended; restarting")
}

// TestNATSRestart restarts the JetStream server twice under a running capture.
func TestNATSRestart(t *testing.T) {
	p := underLoad(t, 2, func() time.Duration { return time.Second },
		func(e *env, p *proctest.Proc, _ string, _ int) *proctest.Proc {
			e.ns.Restart(t)
			return p
		})
	p.MustLog(t, "capture session ended; restarting")
}

// TestEmbeddedNATS: with nats.embedded the capture process hosts JetStream
// itself, on nats.url's port, with its store under nats.store_dir; a
// restart finds its changes there.
func TestEmbeddedNATS(t *testing.T) {
	pg := pgtest.New(t)
	pg.MustExec(t, "postgres", "CREATE DATABASE app")
	pg.MustExec(t, "app", "CREATE TABLE users (id int PRIMARY KEY)")
	port, err := pgtest.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	store, err := os.MkdirTemp("", "pgs2-embedded-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(store) })
	cfg := filepath.Join(t.TempDir(), "cdc.yaml")
	url := fmt.Sprintf("nats://127.0.0.1:%d", port)
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf(`source: {name: app, dsn: %q, tables: [users]}
nats: {embedded: true, store_dir: %q, url: %q}
`, pg.DSN("app"), store, url)), 0o644); err != nil {
		t.Fatal(err)
	}
	e := &env{pg: pg}
	for i := 1; i <= 2; i++ { // the second run restarts on the same store
		p := e.startProc(t, cfg, i)
		pg.MustExec(t, "app", "INSERT INTO users VALUES ($1)", i)
		waitEmbedded(t, url, uint64(i))
		p.Term(t)
	}
}

// waitEmbedded waits until the changes stream behind url holds n messages.
func waitEmbedded(t *testing.T, url string, n uint64) {
	t.Helper()
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	deadline := time.Now().Add(30 * time.Second)
	for {
		s, err := js.Stream(context.Background(), "PGS2_CHANGES")
		if err == nil && s.CachedInfo().State.Msgs == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("embedded JetStream should hold %d changes: %v", n, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
