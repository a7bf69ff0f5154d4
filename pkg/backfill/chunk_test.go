package backfill

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgs2/pgs2/pkg/pgrepl"
	"github.com/pgs2/pgs2/pkg/pgtest"
)

func connect(t *testing.T, pg *pgtest.Instance) *pgx.Conn {
	t.Helper()
	conn, err := pgrepl.Connect(context.Background(), pgrepl.Config{DSN: pg.DSN("app")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

// TestChunksCoverTheTable: keyset chunks over a composite primary key (text
// and integer columns, quoted names) read every row matching the filter
// exactly once, in key order, whatever the chunk size (seeded).
func TestChunksCoverTheTable(t *testing.T) {
	pg := pgtest.New(t)
	pg.MustExec(t, "postgres", "CREATE DATABASE app")
	pg.MustExec(t, "app", `CREATE SCHEMA "Odd"; CREATE TABLE "Odd"."T" ("Org" text, id int, v int, PRIMARY KEY ("Org", id))`)
	conn := connect(t, pg)
	ctx := context.Background()
	var want []string
	for _, org := range []string{"a", "b b", "Z", "é"} {
		for id := range 40 {
			pg.MustExec(t, "app", `INSERT INTO "Odd"."T" VALUES ($1, $2, $3)`, org, id, id%3)
		}
	}
	rows, err := conn.Query(ctx, `SELECT "Org" || '/' || id FROM "Odd"."T" WHERE v <> 1 ORDER BY "Org", id`)
	if err != nil {
		t.Fatal(err)
	}
	want, err = pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil || len(want) < 100 {
		t.Fatalf("%d rows, %v", len(want), err)
	}
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rnd := rand.New(rand.NewPCG(seed, 1))
	for range 5 {
		size := 1 + rnd.IntN(60)
		var got []string
		var cursor, until [][]byte
		expect := want
		if rnd.IntN(2) == 0 { // up to a bound: a job's largest key when it started
			b := rnd.IntN(len(want))
			org, id, _ := strings.Cut(want[b], "/")
			until, expect = [][]byte{[]byte(org), []byte(id)}, want[:b+1]
		}
		for n := 0; ; n++ {
			q := ChunkQuery(`"Odd"."T"`, `"Org", id, v`, []string{"Org", "id"}, "v <> 1", cursor != nil, until != nil, size)
			c, err := ReadChunk(ctx, conn, q, append(slices.Clone(cursor), until...), 5*time.Second)
			if err != nil {
				t.Fatalf("seed %d size %d: %v", seed, size, err)
			}
			if c.Snapshot == "" || !strings.Contains(c.Snapshot, ":") || c.ReadAt <= 0 {
				t.Fatalf("snapshot %q read at %d", c.Snapshot, c.ReadAt)
			}
			for _, r := range c.Rows {
				got = append(got, string(r[0])+"/"+string(r[1]))
			}
			if len(c.Rows) < size {
				break
			}
			last := c.Rows[len(c.Rows)-1]
			cursor = [][]byte{last[0], last[1]}
			if n > len(want) {
				t.Fatalf("seed %d size %d: no end", seed, size)
			}
		}
		if !slices.Equal(got, expect) {
			t.Fatalf("seed %d size %d until %q: read %d rows %v, want %d", seed, size, until, len(got), got, len(expect))
		}
	}
	// The largest key, as a job's bound.
	var org, id string
	if err := conn.QueryRow(ctx, LastKeyQuery(`"Odd"."T"`, []string{"Org", "id"}, "v <> 1")).Scan(&org, &id); err != nil || org+"/"+id != want[len(want)-1] {
		t.Fatalf("last key %s/%s %v, want %s", org, id, err, want[len(want)-1])
	}
}

// TestChunkTimeout: a chunk whose query runs past its statement timeout
// fails with Postgres's query_canceled, not a hang.
func TestChunkTimeout(t *testing.T) {
	pg := pgtest.New(t)
	pg.MustExec(t, "postgres", "CREATE DATABASE app")
	pg.MustExec(t, "app", `CREATE TABLE t (id int PRIMARY KEY)`)
	conn := connect(t, pg)
	_, err := ReadChunk(context.Background(), conn, `SELECT id FROM t WHERE pg_sleep(2) IS NOT NULL UNION ALL SELECT pg_sleep(2)::text::int`, nil, 100*time.Millisecond)
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "57014" {
		t.Fatalf("err %v, want query_canceled (57014)", err)
	}
}

// TestWatermarks: Emit writes parseable markers at increasing LSNs.
func TestWatermarks(t *testing.T) {
	pg := pgtest.New(t)
	pg.MustExec(t, "postgres", "CREATE DATABASE app")
	conn := connect(t, pg)
	var last uint64
	for i, w := range []string{Low, High, Abort} {
		m := Marker{Source: "app", Job: "j1", Table: `public.t`, Chunk: int64(i), W: w}
		lsn, err := Emit(context.Background(), conn, m)
		if err != nil {
			t.Fatal(err)
		}
		if lsn <= last {
			t.Fatalf("watermark %d at %d, after %d", i, lsn, last)
		}
		last = lsn
	}
	if _, err := ParseMarker([]byte(`{"w":"middle"}`)); err == nil {
		t.Fatal("an unknown watermark kind parsed")
	}
	if m, err := ParseMarker([]byte(fmt.Sprintf(`{"source":"app","job":"j","table":"a.b","chunk":7,"w":%q}`, High))); err != nil || m.Chunk != 7 || m.W != High {
		t.Fatalf("%+v %v", m, err)
	}
}
