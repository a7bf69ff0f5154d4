package capture_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"

	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/change"
)

// TestIdleTablesBusyDatabase: while the captured tables are idle and the
// database is busy elsewhere, the slot follows the WAL (no pile-up).
func TestIdleTablesBusyDatabase(t *testing.T) {
	e := newEnv(t, `CREATE TABLE users (id int PRIMARY KEY); CREATE TABLE other (id serial PRIMARY KEY, pad text)`, "public.users")
	e.run(t)
	e.pg.MustExec(t, "app", `INSERT INTO users VALUES (1)`)
	e.waitMessages(t, 1)
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, e.pg.DSN("app"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var before string
	if err := conn.QueryRow(ctx, `SELECT pg_current_wal_lsn()::text`).Scan(&before); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 20; i++ {
		if _, err := conn.Exec(ctx, `INSERT INTO other (pad) SELECT repeat('x', 1000) FROM generate_series(1, 2000)`); err != nil {
			t.Fatal(err)
		}
	}
	var current string
	if err := conn.QueryRow(ctx, `SELECT pg_current_wal_lsn()::text`).Scan(&current); err != nil {
		t.Fatal(err)
	}
	cur, _ := pglogrepl.ParseLSN(current)
	beforeLSN, _ := pglogrepl.ParseLSN(before)
	deadline := time.Now().Add(30 * time.Second)
	for {
		var flushed string
		if err := conn.QueryRow(ctx, `SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'pgs2'`).Scan(&flushed); err != nil {
			t.Fatal(err)
		}
		f, _ := pglogrepl.ParseLSN(flushed)
		if f >= cur {
			t.Logf("slot confirmed %s ≥ WAL %s after %d MB of unrelated WAL", f, cur, (cur-beforeLSN)>>20)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("slot stuck at %s while the WAL is at %s: idle tables pin WAL", f, cur)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestLargeTransaction: one transaction of 1M rows passes with bounded
// memory, and a SIGKILL in the middle of it neither loses nor repeats a row.
func TestLargeTransaction(t *testing.T) {
	const n = 1_000_000
	e := newEnv(t, `CREATE TABLE big (id int PRIMARY KEY, pad text)`, "public.big")
	cfg := e.configFile(t)
	p := e.startProc(t, cfg, 0)
	e.pg.MustExec(t, "app", fmt.Sprintf(`INSERT INTO big SELECT g, 'row ' || g FROM generate_series(1, %d) g`, n))

	ctx := context.Background()
	// Progress: the rows up to the end of the last complete round (one
	// transaction, so a change's index counts the rows before it).
	count := func() uint64 {
		r, err := bus.ResumeChanges(ctx, e.js, "PGS2_CHANGES", "app")
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case r.Partial:
			return uint64(r.First.Idx)
		case r.LastID == "":
			return 0
		}
		return uint64(r.Through.Idx) + 1
	}
	deadline := time.Now().Add(3 * time.Minute)
	for count() < n/3 {
		if time.Now().After(deadline) {
			t.Fatalf("only %d of %d rows after 3 minutes", count(), n)
		}
		time.Sleep(20 * time.Millisecond)
	}
	killedAt := count()
	rss := p.PeakRSS(t)
	p.Kill()
	p = e.startProc(t, cfg, 1)
	for count() < n {
		if time.Now().After(deadline) {
			t.Fatalf("only %d of %d rows after 3 minutes", count(), n)
		}
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond)
	rss = max(rss, p.PeakRSS(t))
	p.Term(t)
	// Each row exactly once (readAll fails on a change stored twice), from
	// index 0 to n-1 of one transaction.
	all := e.readAll(t)
	if len(all) != n {
		t.Fatalf("stream holds %d changes, want exactly %d", len(all), n)
	}
	fp, _ := change.ParseKey(string(all[0].Entry.Key))
	last, _ := change.ParseKey(string(all[n-1].Entry.Key))
	if last.Idx != n-1 || fp.Idx != 0 || fp.LSN != last.LSN {
		t.Fatalf("first %s, last %s: want one transaction from index 0 to %d", fp, last, n-1)
	}
	t.Logf("killed at %d of %d; peak RSS %d MiB", killedAt, n, rss>>20)
	if rss > 200<<20 {
		t.Fatalf("capture peak RSS %d MiB for a 1M-row transaction, want < 200 MiB", rss>>20)
	}
}
