package capture_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgs2/pgs2/pkg/backfill"
	"github.com/pgs2/pgs2/pkg/capture"
	"github.com/pgs2/pgs2/pkg/change"
	"github.com/pgs2/pgs2/pkg/seed"
)

// items is the backfill tests' table: every write takes a new version
// from one sequence, so a row's versions are ordered across keys and
// transactions, and deletes carry the old row (REPLICA IDENTITY FULL).
const itemsSQL = `CREATE SEQUENCE vers;
	CREATE TABLE items (id int PRIMARY KEY, ver bigint NOT NULL, note text);
	ALTER TABLE items REPLICA IDENTITY FULL;
	CREATE TABLE done (id int PRIMARY KEY);
	INSERT INTO items SELECT g, nextval('vers'), md5(g::text) FROM generate_series(1, %d) g`

// itemsWorkload inserts, updates (some of them changing the key) and deletes
// random rows of items, in transactions of one to three statements, until
// stop is closed.
func itemsWorkload(t *testing.T, dsn string, rows int, rnd *rand.Rand, stop <-chan struct{}) (wait func() int) {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var n int
	var failure error
	wg.Go(func() {
		defer conn.Close(ctx)
		next := 10 * rows // new keys, apart from the random ones
		for {
			select {
			case <-stop:
				return
			default:
			}
			tx, err := conn.Begin(ctx)
			if err != nil {
				failure = err
				return
			}
			for range 1 + rnd.IntN(3) {
				id := 1 + rnd.IntN(rows+rows/10)
				var q string
				var args []any
				switch op := rnd.IntN(10); {
				case op < 4:
					q, args = `UPDATE items SET ver = nextval('vers'), note = $2 WHERE id = $1`, []any{id, fmt.Sprint("u", rnd.IntN(1000))}
				case op < 6:
					q, args = `INSERT INTO items VALUES ($1, nextval('vers'), 'i') ON CONFLICT DO NOTHING`, []any{next}
					next++
				case op < 8:
					q, args = `DELETE FROM items WHERE id = $1`, []any{id}
				case op < 9:
					q, args = `UPDATE items SET id = $2, ver = nextval('vers') WHERE id = $1`, []any{id, next}
					next++
				default:
					q, args = `INSERT INTO items VALUES ($1, nextval('vers'), 'back') ON CONFLICT DO NOTHING`, []any{id}
				}
				if _, err := tx.Exec(ctx, q, args...); err != nil {
					failure = err
					_ = tx.Rollback(ctx)
					return
				}
				n++
			}
			if err := tx.Commit(ctx); err != nil {
				failure = err
				return
			}
		}
	})
	return func() int {
		wg.Wait()
		if failure != nil {
			t.Fatalf("workload: %v", failure)
		}
		return n
	}
}

// waitProgress waits until the job's progress in table is in state.
func waitProgress(t *testing.T, store *backfill.Store, job, table, state string) backfill.Progress {
	t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		p, _, err := store.Progress(context.Background(), job, "app", table)
		if err != nil {
			t.Fatal(err)
		}
		if p.State == state {
			return p
		}
		if p.State == backfill.Failed {
			t.Fatalf("backfill %s of %s failed: %s", job, table, p.Error)
		}
		if time.Now().After(deadline) {
			t.Fatalf("backfill %s of %s is %q after 3 minutes (%d rows), want %s", job, table, p.State, p.Rows, state)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// replayItems replays the stream's changes of items per row (read, insert
// and update set it, delete and a key change remove it) and checks that
// no read lands after a newer change of its row (its version is older) or
// after the row's delete (a resurrection).
func replayItems(t *testing.T, changes []got, job string) (state map[string]string, reads, lasts int) {
	t.Helper()
	type last struct {
		ver     int64
		deleted bool
		action  change.Action
	}
	state = map[string]string{}
	lastOf := map[string]last{}
	readOf := map[string]int{} // chunks cover each key once: a second read is a duplicate
	ver := func(v any) int64 {
		var n int64
		if _, err := fmt.Sscan(text(v), &n); err != nil {
			t.Fatalf("version %v: %v", v, err)
		}
		return n
	}
	for i, g := range changes {
		m := g.Msg
		if m.Metadata.TableName != "items" {
			continue
		}
		key := text(m.Record["id"])
		switch m.Action {
		case change.Read:
			reads++
			if readOf[key]++; readOf[key] > 1 {
				t.Fatalf("row %s read twice", key)
			}
			if string(g.Entry.Backfill) != job || string(g.Entry.Sink) != "s" {
				t.Fatalf("read %d of %s: backfill %q sink %q, want %q and s", i, key, g.Entry.Backfill, g.Entry.Sink, job)
			}
			if g.Entry.BackfillLast {
				lasts++
			}
			v := ver(m.Record["ver"])
			if l, ok := lastOf[key]; ok && (v < l.ver || (l.deleted && v == l.ver)) {
				t.Fatalf("row %s: a read of version %d after a %s of version %d (deleted %v)", key, v, l.action, l.ver, l.deleted)
			}
			state[key] = text(m.Record["ver"]) + "/" + text(m.Record["note"])
			lastOf[key] = last{ver: v, action: m.Action}
		case change.Insert, change.Update:
			if old, ok := m.Changes["id"]; ok && text(old) != key {
				oldKey := text(old)
				delete(state, oldKey)
				lastOf[oldKey] = last{ver: ver(m.Changes["ver"]), deleted: true, action: "key change"}
			}
			state[key] = text(m.Record["ver"]) + "/" + text(m.Record["note"])
			lastOf[key] = last{ver: ver(m.Record["ver"]), action: m.Action}
		case change.Delete:
			delete(state, key)
			lastOf[key] = last{ver: ver(m.Record["ver"]), deleted: true, action: m.Action}
		}
	}
	return state, reads, lasts
}

// tableItems is items' content, as replayItems keys it.
func tableItems(t *testing.T, dsn string) map[string]string {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	rows, err := conn.Query(ctx, `SELECT id::text, ver::text || '/' || coalesce(note, '<nil>') FROM items`)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for rows.Next() {
		var k, v string
		if err := rows.Scan(&k, &v); err != nil {
			t.Fatal(err)
		}
		out[k] = v
	}
	if rows.Err() != nil {
		t.Fatal(rows.Err())
	}
	return out
}

func compareItems(t *testing.T, s uint64, got, want map[string]string) {
	t.Helper()
	bad := 0
	for k, v := range want {
		if got[k] != v {
			if bad++; bad <= 5 {
				t.Errorf("seed %d: row %s is %q in the stream, %q in the table", s, k, got[k], v)
			}
		}
	}
	for k, v := range got {
		if _, ok := want[k]; !ok {
			if bad++; bad <= 5 {
				t.Errorf("seed %d: row %s (%q) is in the stream, not in the table", s, k, v)
			}
		}
	}
	if bad > 0 {
		t.Fatalf("seed %d: %d rows differ between the stream and the table (%d rows)", s, bad, len(want))
	}
}

// TestBackfillIsConsistentWithTheStream: a backfill of a table while a
// workload inserts, updates (keys too) and deletes random rows of it:
// replaying the changes stream per row gives exactly the table's final
// content, no read follows a newer change of its row or its delete, every
// read is marked with its backfill and sink, the table's last read is
// marked last, and every key is unique (seeded: chunk size and workload).
func TestBackfillIsConsistentWithTheStream(t *testing.T) {
	rows := 200_000
	if testing.Short() {
		rows = 20_000
	}
	rnd, s := seed.Rand(t)
	e := newEnv(t, fmt.Sprintf(itemsSQL, rows), "public.items", "public.done")
	chunk := 200 + rnd.IntN(3000)
	t.Logf("%d rows, chunks of %d", rows, chunk)
	e.cfg.Backfill = capture.BackfillConfig{ChunkSize: chunk, SinkTables: map[string][]string{"s": {"public.items"}}}
	e.run(t)
	ctx := context.Background()
	store, err := backfill.Ensure(ctx, e.js, 1)
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	wait := itemsWorkload(t, e.pg.DSN("app"), rows, rand.New(rand.NewPCG(s, 7)), stop)
	time.Sleep(50 * time.Millisecond) // the workload runs before, during and after the backfill
	if err := store.Create(ctx, backfill.Job{ID: "bf", Sink: "s"}); err != nil {
		t.Fatal(err)
	}
	p := waitProgress(t, store, "bf", "public.items", backfill.Done)
	close(stop)
	writes := wait()
	changes := e.allWritten(t)
	state, reads, lasts := replayItems(t, changes, "bf")
	compareItems(t, s, state, tableItems(t, e.pg.DSN("app")))
	t.Logf("%d reads of %d rows read, %d writes during the backfill, %d changes in all", reads, p.Rows, writes, len(changes))
	if lasts != 1 || !changes[lastRead(changes)].Entry.BackfillLast {
		t.Fatalf("seed %d: %d reads marked last, want 1: the last read", s, lasts)
	}
	if p.Rows < int64(reads) || reads < rows/2 {
		t.Fatalf("seed %d: %d reads of %d rows read", s, reads, p.Rows)
	}
}

// text renders a JSON value as Postgres's text output would.
func text(v any) string {
	if f, ok := v.(float64); ok {
		return strconv.FormatFloat(f, 'f', -1, 64)
	}
	return fmt.Sprint(v)
}

// allWritten writes a sentinel row and returns the stream's changes once
// it is there: every change written before it is too.
func (e *env) allWritten(t *testing.T) []got {
	t.Helper()
	e.pg.MustExec(t, "app", `INSERT INTO done VALUES (1)`)
	for deadline := time.Now().Add(time.Minute); ; {
		changes := e.readAll(t)
		if n := len(changes); n > 0 && changes[n-1].Msg.Metadata.TableName == "done" {
			return changes
		}
		if time.Now().After(deadline) {
			t.Fatal("the sentinel change did not reach the stream within a minute")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func lastRead(changes []got) int {
	for i := len(changes) - 1; i >= 0; i-- {
		if changes[i].Msg.Action == change.Read {
			return i
		}
	}
	return -1
}

// TestBackfillRidesThroughCrashes: the same backfill under a workload while
// capture's sessions crash in the middle of rounds (after a seeded number
// of publishes: the reader loses the rows handed to it and replays the
// held window from the staged chunks), and capture itself is replaced by a
// new one mid-way (its runner resumes from the progress in JetStream):
// the stream still replays to the table's content with no duplicate and
// no read after a newer change (seeded).
func TestBackfillRidesThroughCrashes(t *testing.T) {
	rows := 60_000
	if testing.Short() {
		rows = 20_000
	}
	rnd, s := seed.Rand(t)
	e := newEnv(t, fmt.Sprintf(itemsSQL, rows), "public.items", "public.done")
	chunk := 200 + rnd.IntN(1500)
	var crashes []int
	for range 4 {
		crashes = append(crashes, 1+rnd.IntN(40))
	}
	t.Logf("%d rows, chunks of %d, sessions crash after %v publishes", rows, chunk, crashes)
	e.cfg.Backfill = capture.BackfillConfig{ChunkSize: chunk, SinkTables: map[string][]string{"s": {"public.items"}}}
	e.opts = []capture.Option{capture.WithCrashAfter(crashes...)}
	stopCapture := e.run(t)
	ctx := context.Background()
	store, err := backfill.Ensure(ctx, e.js, 1)
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	wait := itemsWorkload(t, e.pg.DSN("app"), rows, rand.New(rand.NewPCG(s, 7)), stop)
	if err := store.Create(ctx, backfill.Job{ID: "bf", Sink: "s"}); err != nil {
		t.Fatal(err)
	}
	// Replace capture once a seeded share of the rows is read.
	at := int64(rows/10 + rnd.IntN(rows/2))
	for {
		p, _, err := store.Progress(ctx, "bf", "app", "public.items")
		if err != nil {
			t.Fatal(err)
		}
		if p.Rows >= at || p.State == backfill.Done {
			t.Logf("capture replaced at %d rows read (chunk %d)", p.Rows, p.ChunkDone)
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := stopCapture(); err != nil {
		t.Fatal(err)
	}
	e.opts = []capture.Option{capture.WithCrashAfter(1 + rnd.IntN(40))}
	e.run(t)
	p := waitProgress(t, store, "bf", "public.items", backfill.Done)
	close(stop)
	wait()
	changes := e.allWritten(t)
	state, reads, lasts := replayItems(t, changes, "bf")
	compareItems(t, s, state, tableItems(t, e.pg.DSN("app")))
	t.Logf("%d reads of %d rows read, %d changes in all", reads, p.Rows, len(changes))
	if lasts != 1 {
		t.Fatalf("seed %d: %d reads marked last, want 1", s, lasts)
	}
}
