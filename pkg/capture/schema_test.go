package capture_test

import (
	"context"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/pgs2/pgs2/pkg/backfill"
	"github.com/pgs2/pgs2/pkg/backfill/backfilltest"
	"github.com/pgs2/pgs2/pkg/capture"
	"github.com/pgs2/pgs2/pkg/change"
	"github.com/pgs2/pgs2/pkg/seed"
)

// TestSchemaChangesUnderLoad: while a workload inserts, updates and
// deletes rows and a backfill reads the table, a column is added, renamed,
// retyped and dropped, one after another (at seeded shares of the rows
// read). Without a restart, every change from the next one on has the new
// columns (reads too), nothing is lost or doubled, and the stream replays
// to the table.
func TestSchemaChangesUnderLoad(t *testing.T) {
	const rows = 3000
	rnd, s := seed.Rand(t)
	e := newEnv(t, fmt.Sprintf(`CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL, a int, b text);
		INSERT INTO t SELECT g, 0, g, 'b' || g FROM generate_series(1, %d) g;
		CREATE TABLE done (id int PRIMARY KEY)`, rows), "public.t", "public.done")
	e.cfg.Backfill = capture.BackfillConfig{ChunkSize: 50, MaxRowsPerSecond: 2500, SinkTables: map[string][]string{"s": {"public.t"}}}
	e.run(t)
	ctx := context.Background()
	store := e.backfills(t)

	// The workload touches only id and n, which every shape has.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var failure error
	wrnd := rand.New(rand.NewPCG(s, 3))
	wg.Go(func() {
		conn, err := pgx.Connect(ctx, e.pg.DSN("app"))
		if err != nil {
			failure = err
			return
		}
		defer conn.Close(ctx)
		next := rows + 1
		for {
			select {
			case <-stop:
				return
			default:
			}
			var q string
			var args []any
			switch op := wrnd.IntN(4); {
			case op == 0:
				q, args = `INSERT INTO t (id, n) VALUES ($1, 0)`, []any{next}
				next++
			case op == 1:
				q, args = `DELETE FROM t WHERE id = $1`, []any{1 + wrnd.IntN(next)}
			default:
				q, args = `UPDATE t SET n = n + 1 WHERE id = $1`, []any{1 + wrnd.IntN(next)}
			}
			if _, err := conn.Exec(ctx, q, args...); err != nil {
				failure = err
				return
			}
		}
	})

	ddl := []string{
		`ALTER TABLE t ADD COLUMN c int DEFAULT 7`,
		`ALTER TABLE t RENAME COLUMN b TO b2`,
		`ALTER TABLE t ALTER COLUMN a TYPE text USING 'a' || a`,
		`ALTER TABLE t DROP COLUMN b2`,
	}
	var at []int64
	for range ddl {
		at = append(at, int64(rnd.IntN(rows)))
	}
	slices.Sort(at)
	t.Logf("schema changes at %v rows read", at)
	e.startBackfill(t, store, backfill.Job{ID: "bf", Sink: "s"})
	for i := range ddl {
		for {
			p, _, err := store.Progress(ctx, "bf", "app", "public.t")
			if err != nil {
				t.Fatal(err)
			}
			if p.Rows >= at[i] || p.State == backfill.Done {
				break
			}
		}
		e.pg.MustExec(t, "app", ddl[i])
		e.pg.MustExec(t, "app", fmt.Sprintf(`INSERT INTO t (id, n) VALUES (%d, 0)`, -1-i)) // a marker of the new shape
	}
	waitProgress(t, store, "bf", "public.t", backfill.Done)
	close(stop)
	wg.Wait()
	if failure != nil {
		t.Fatalf("workload: %v", failure)
	}

	// Columns, in the order of the stream: a schema change takes effect at
	// its commit (changes committed after it, before its marker, have the
	// new columns), never goes back, and its marker has it.
	shapes := []string{"a b id n", "a b c id n", "a b2 c id n", "a c id n"}
	after := []int{1, 2, 2, 3} // the shape after each schema change (the third retypes a)
	cur, markers := 0, 0
	aText := false // a was retyped: a non-null a is text from then on
	state := map[string]string{}
	reads := 0
	for _, g := range e.allWritten(t) {
		m := g.Msg
		if m.Metadata.TableName != "t" {
			continue
		}
		id := backfilltest.Text(m.Record["id"])
		if m.Action != change.Delete {
			got := strings.Join(slices.Sorted(maps.Keys(m.Record)), " ")
			if got != shapes[cur] {
				if cur+1 < len(shapes) && got == shapes[cur+1] {
					cur++
				} else {
					t.Fatalf("seed %d: a %s of row %s has columns %q, after %q", s, m.Action, id, got, shapes[cur])
				}
			}
			switch a := m.Record["a"].(type) {
			case string:
				aText = true
				if !strings.HasPrefix(a, "a") {
					t.Fatalf("seed %d: column a of row %s after its retype: %q", s, id, a)
				}
			case nil:
			default:
				if aText {
					t.Fatalf("seed %d: column a of row %s is %v after the retype", s, id, a)
				}
			}
		}
		if strings.HasPrefix(id, "-") {
			if cur != after[markers] {
				t.Fatalf("seed %d: the marker of schema change %d has columns %q", s, markers, shapes[cur])
			}
			if markers++; markers == 3 {
				aText = true
			}
		}
		switch m.Action {
		case change.Read, change.Insert, change.Update:
			if m.Action == change.Read {
				reads++
			}
			state[id] = backfilltest.Text(m.Record["n"])
		case change.Delete:
			delete(state, id)
		}
	}
	if markers != len(ddl) {
		t.Fatalf("seed %d: %d markers in the stream, want %d", s, markers, len(ddl))
	}
	for i := range ddl { // the markers: not the workload's
		delete(state, fmt.Sprint(-1-i))
	}
	want := map[string]string{}
	conn, err := pgx.Connect(ctx, e.pg.DSN("app"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	rs, err := conn.Query(ctx, `SELECT id::text, n::text FROM t WHERE id > 0`)
	if err != nil {
		t.Fatal(err)
	}
	for rs.Next() {
		var id, n string
		if err := rs.Scan(&id, &n); err != nil {
			t.Fatal(err)
		}
		want[id] = n
	}
	backfilltest.Compare(t, s, state, want)
	t.Logf("%d reads, %d rows now", reads, len(want))
}
