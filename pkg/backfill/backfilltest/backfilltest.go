// Package backfilltest is what backfill tests share, wherever they read the
// changes from (the changes stream, S2): a table whose rows carry a version
// from one sequence, a workload of inserts, updates, key changes and
// deletes on it, and a replay of the changes that checks them against the
// table's final content.
package backfilltest

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgs2/pgs2/pkg/change"
)

// ItemsSQL creates items with %d rows, and done (a sentinel's table): every
// write takes a new version from one sequence, so a row's versions are
// ordered across keys and transactions, and deletes carry the old row
// (REPLICA IDENTITY FULL).
const ItemsSQL = `CREATE SEQUENCE vers;
	CREATE TABLE items (id int PRIMARY KEY, ver bigint NOT NULL, note text);
	ALTER TABLE items REPLICA IDENTITY FULL;
	CREATE TABLE done (id int PRIMARY KEY);
	INSERT INTO items SELECT g, nextval('vers'), md5(g::text) FROM generate_series(1, %d) g`

// Workload inserts, updates (some of them changing the key) and deletes
// random rows of items, in transactions of one to three statements, until
// stop is closed. It reconnects after a failure (a Postgres restart); more
// than 100 failures in a row fail the test. wait returns the statements
// committed.
func Workload(t testing.TB, dsn string, rows int, rnd *rand.Rand, stop <-chan struct{}) (wait func() int) {
	t.Helper()
	ctx := context.Background()
	var wg sync.WaitGroup
	var n int
	var failure error
	wg.Go(func() {
		var conn *pgx.Conn
		defer func() {
			if conn != nil {
				conn.Close(ctx)
			}
		}()
		next := 10 * rows // new keys, apart from the random ones
		failed := 0
		for {
			select {
			case <-stop:
				return
			default:
			}
			err := func() (err error) {
				if conn == nil {
					if conn, err = pgx.Connect(ctx, dsn); err != nil {
						return err
					}
				}
				tx, err := conn.Begin(ctx)
				if err != nil {
					return err
				}
				defer func() { _ = tx.Rollback(ctx) }()
				k := 0
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
						return err
					}
					k++
				}
				if err := tx.Commit(ctx); err != nil {
					return err
				}
				n += k
				return nil
			}()
			if err == nil {
				failed = 0
				continue
			}
			if failed++; failed > 100 {
				failure = err
				return
			}
			if conn != nil {
				conn.Close(ctx)
				conn = nil
			}
			time.Sleep(50 * time.Millisecond)
		}
	})
	return func() int {
		wg.Wait()
		if failure != nil {
			t.Fatalf("workload: 100 failures in a row, the last: %v", failure)
		}
		return n
	}
}

// Change is one change of the stream, as the replay needs it.
type Change struct {
	Action   change.Action
	Table    string
	Record   map[string]any
	Changes  map[string]any
	Backfill string // of a read
	Sink     string // of a read, "" when the stream does not say
	Last     bool   // the read is marked its table's last
}

// Replay replays the changes of items per row (read, insert and update set
// it, delete and a key change remove it) and fails the test when a read
// lands after a newer change of its row (its version is older) or after
// the row's delete (a resurrection), when a row is read twice, or when a
// read is not of job (and, if sink is set, of sink). It returns each row's
// "ver/note", the reads and the reads marked last.
func Replay(t testing.TB, changes []Change, job, sink string) (state map[string]string, reads, lasts int) {
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
		if _, err := fmt.Sscan(Text(v), &n); err != nil {
			t.Fatalf("version %v: %v", v, err)
		}
		return n
	}
	for i, c := range changes {
		if c.Table != "items" {
			continue
		}
		key := Text(c.Record["id"])
		switch c.Action {
		case change.Read:
			reads++
			if readOf[key]++; readOf[key] > 1 {
				t.Fatalf("row %s read twice", key)
			}
			if c.Backfill != job || sink != "" && c.Sink != sink {
				t.Fatalf("read %d of %s: backfill %q sink %q, want %q and %q", i, key, c.Backfill, c.Sink, job, sink)
			}
			if c.Last {
				lasts++
			}
			v := ver(c.Record["ver"])
			if l, ok := lastOf[key]; ok && (v < l.ver || (l.deleted && v == l.ver)) {
				t.Fatalf("row %s: a read of version %d after a %s of version %d (deleted %v)", key, v, l.action, l.ver, l.deleted)
			}
			state[key] = Text(c.Record["ver"]) + "/" + Text(c.Record["note"])
			lastOf[key] = last{ver: v, action: c.Action}
		case change.Insert, change.Update:
			if old, ok := c.Changes["id"]; ok && Text(old) != key {
				oldKey := Text(old)
				delete(state, oldKey)
				lastOf[oldKey] = last{ver: ver(c.Changes["ver"]), deleted: true, action: "key change"}
			}
			state[key] = Text(c.Record["ver"]) + "/" + Text(c.Record["note"])
			lastOf[key] = last{ver: ver(c.Record["ver"]), action: c.Action}
		case change.Delete:
			delete(state, key)
			lastOf[key] = last{ver: ver(c.Record["ver"]), deleted: true, action: c.Action}
		}
	}
	return state, reads, lasts
}

// TableItems is items' content, as Replay keys it.
func TableItems(t testing.TB, dsn string) map[string]string {
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

// Compare fails the test when the replayed rows differ from the table's.
func Compare(t testing.TB, seed uint64, got, want map[string]string) {
	t.Helper()
	diff := Diff(got, want)
	for i, d := range diff {
		if i == 5 {
			break
		}
		t.Errorf("seed %d: %s", seed, d)
	}
	if len(diff) > 0 {
		t.Fatalf("seed %d: %d rows differ between the stream and the table (%d rows)", seed, len(diff), len(want))
	}
}

// Diff describes the rows that differ between the replay and the table.
func Diff(got, want map[string]string) []string {
	var out []string
	for k, v := range want {
		if got[k] != v {
			out = append(out, fmt.Sprintf("row %s is %q in the stream, %q in the table", k, got[k], v))
		}
	}
	for k, v := range got {
		if _, ok := want[k]; !ok {
			out = append(out, fmt.Sprintf("row %s (%q) is in the stream, not in the table", k, v))
		}
	}
	return out
}

// Text renders a JSON value as Postgres's text output would.
func Text(v any) string {
	if f, ok := v.(float64); ok {
		return strconv.FormatFloat(f, 'f', -1, 64)
	}
	return fmt.Sprint(v)
}
