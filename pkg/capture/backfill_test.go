package capture_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgs2/pgs2/pkg/backfill"
	"github.com/pgs2/pgs2/pkg/backfill/backfilltest"
	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/capture"
	"github.com/pgs2/pgs2/pkg/change"
	"github.com/pgs2/pgs2/pkg/seed"
)

// backfills is the backfill store of the test's JetStream.
func (e *env) backfills(t *testing.T) *backfill.Store {
	t.Helper()
	store, err := backfill.Ensure(context.Background(), e.js, 1)
	if err != nil {
		t.Fatal(err)
	}
	return store
}

// startBackfill creates job j.
func (e *env) startBackfill(t *testing.T, store *backfill.Store, j backfill.Job) {
	t.Helper()
	if err := store.Create(context.Background(), j); err != nil {
		t.Fatal(err)
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

// replayItems replays the stream's changes of items (backfilltest.Replay)
// with reads of job for sink s.
func replayItems(t *testing.T, changes []got, job string) (state map[string]string, reads, lasts int) {
	t.Helper()
	cs := make([]backfilltest.Change, len(changes))
	for i, g := range changes {
		cs[i] = backfilltest.Change{Action: g.Msg.Action, Table: g.Msg.Metadata.TableName, Record: g.Msg.Record, Changes: g.Msg.Changes,
			Backfill: string(g.Entry.Backfill), Sink: string(g.Entry.Sink), Last: g.Entry.BackfillLast}
	}
	return backfilltest.Replay(t, cs, job, "s")
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
	e := newEnv(t, fmt.Sprintf(backfilltest.ItemsSQL, rows), "public.items", "public.done")
	chunk := 200 + rnd.IntN(3000)
	t.Logf("%d rows, chunks of %d", rows, chunk)
	e.cfg.Backfill = capture.BackfillConfig{ChunkSize: chunk, SinkTables: map[string][]string{"s": {"public.items"}}}
	e.run(t)
	store := e.backfills(t)
	stop := make(chan struct{})
	wait := backfilltest.Workload(t, e.pg.DSN("app"), rows, rand.New(rand.NewPCG(s, 7)), stop)
	time.Sleep(50 * time.Millisecond) // the workload runs before, during and after the backfill
	e.startBackfill(t, store, backfill.Job{ID: "bf", Sink: "s"})
	p := waitProgress(t, store, "bf", "public.items", backfill.Done)
	close(stop)
	writes := wait()
	changes := e.allWritten(t)
	state, reads, lasts := replayItems(t, changes, "bf")
	backfilltest.Compare(t, s, state, backfilltest.TableItems(t, e.pg.DSN("app")))
	t.Logf("%d reads of %d rows read, %d writes during the backfill, %d changes in all", reads, p.Rows, writes, len(changes))
	if lasts != 1 || !changes[lastRead(changes)].Entry.BackfillLast {
		t.Fatalf("seed %d: %d reads marked last, want 1: the last read", s, lasts)
	}
	if p.Rows < int64(reads) || reads < rows/2 {
		t.Fatalf("seed %d: %d reads of %d rows read", s, reads, p.Rows)
	}
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
	e := newEnv(t, fmt.Sprintf(backfilltest.ItemsSQL, rows), "public.items", "public.done")
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
	store := e.backfills(t)
	stop := make(chan struct{})
	wait := backfilltest.Workload(t, e.pg.DSN("app"), rows, rand.New(rand.NewPCG(s, 7)), stop)
	e.startBackfill(t, store, backfill.Job{ID: "bf", Sink: "s"})
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
	backfilltest.Compare(t, s, state, backfilltest.TableItems(t, e.pg.DSN("app")))
	t.Logf("%d reads of %d rows read, %d changes in all", reads, p.Rows, len(changes))
	if lasts != 1 {
		t.Fatalf("seed %d: %d reads marked last, want 1", s, lasts)
	}
}

// TestBackfillLetsPostgresStop: PostgreSQL shut down (fast) in the middle
// of a chunk. A logical walsender exits only once its client confirmed
// all it sent, and capture confirms no further than a chunk it has not
// recorded; a chunk cut off before its high watermark is abandoned at
// once, but one cut off while writing it may be in the WAL (the reader
// places its rows there) and is recorded only by a runner that reaches
// the server, which refuses connections while it shuts down: the server
// never stopped (found by TestBackfillEndToEnd, once). The backfill
// finishes after the restart, consistent with the stream.
func TestBackfillLetsPostgresStop(t *testing.T) {
	ctx := context.Background()
	t.Run("before its high watermark", func(t *testing.T) {
		backfillThroughRestart(t, nil, func(e *env) {
			store := e.backfills(t)
			for {
				p, _, err := store.Progress(ctx, "bf", "app", "public.items")
				if err != nil {
					t.Fatal(err)
				}
				if p.Rows >= 1000 {
					break
				}
				if p.State == backfill.Done {
					t.Fatal("the backfill ended before the restart")
				}
				time.Sleep(5 * time.Millisecond)
			}
			// The next chunk emits its low watermark and waits for the table.
			lock, err := pgx.Connect(ctx, e.pg.DSN("app"))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { lock.Close(ctx) })
			if _, err := lock.Exec(ctx, `BEGIN; LOCK TABLE items IN ACCESS EXCLUSIVE MODE`); err != nil {
				t.Fatal(err)
			}
			for deadline := time.Now().Add(time.Minute); ; time.Sleep(10 * time.Millisecond) {
				var waiting int
				if err := lock.QueryRow(ctx, `SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'items'::regclass`).Scan(&waiting); err != nil {
					t.Fatal(err)
				}
				if waiting > 0 {
					return
				}
				if time.Now().After(deadline) {
					t.Fatal("no chunk waited for the locked table within a minute")
				}
			}
		})
	})
	t.Run("writing its high watermark", func(t *testing.T) {
		written, proceed := make(chan struct{}), make(chan struct{})
		var once sync.Once
		var high uint64
		// The third chunk's high watermark is written, and its runner sees
		// the connection fail once the server is shutting down.
		opt := capture.WithEmit(func(emit capture.EmitFunc) capture.EmitFunc {
			return func(ctx context.Context, conn *pgx.Conn, m backfill.Marker) (uint64, error) {
				lsn, err := emit(ctx, conn, m)
				if err != nil || m.W != backfill.High || m.Chunk < 3 {
					return lsn, err
				}
				first := false
				once.Do(func() { first = true })
				if !first {
					return lsn, err
				}
				high = lsn
				close(written)
				<-proceed
				return 0, errors.New("unexpected EOF (injected: the shutdown ended the connection)")
			}
		})
		backfillThroughRestart(t, []capture.Option{opt}, func(e *env) {
			<-written
			// The reader placed the chunk's rows: its window is held until
			// the runner records the chunk.
			for deadline := time.Now().Add(time.Minute); ; time.Sleep(5 * time.Millisecond) {
				r, err := bus.ResumeChanges(ctx, e.js, "PGS2_CHANGES", "app")
				if err != nil {
					t.Fatal(err)
				}
				if r.Through.LSN >= high-1 {
					return
				}
				if time.Now().After(deadline) {
					t.Fatal("the chunk's rows did not reach the stream within a minute")
				}
			}
		}, func(e *env) {
			for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
				c, err := pgx.Connect(ctx, e.pg.DSN("app"))
				if err == nil {
					c.Close(ctx)
					continue
				}
				if pe := (*pgconn.PgError)(nil); errors.As(err, &pe) && pe.Code == "57P03" {
					break // shutting down
				}
			}
			close(proceed)
		})
	})
}

// backfillThroughRestart backfills 20,000 rows with capture's options
// opts, restarts PostgreSQL once the first step returned (with the job
// started) (the second, if
// any, runs while it stops), and checks the backfill finishes consistent
// with the stream.
func backfillThroughRestart(t *testing.T, opts []capture.Option, steps ...func(*env)) {
	rows := 20_000
	e := newEnv(t, fmt.Sprintf(backfilltest.ItemsSQL, rows), "public.items", "public.done")
	e.cfg.Backfill = capture.BackfillConfig{ChunkSize: 500, StatementTimeout: 5 * time.Minute,
		SinkTables: map[string][]string{"s": {"public.items"}}}
	e.opts = opts
	e.run(t)
	ctx := context.Background()
	store := e.backfills(t)
	e.startBackfill(t, store, backfill.Job{ID: "bf", Sink: "s"})
	steps[0](e)
	began := time.Now()
	restarted := make(chan error, 1)
	go func() { restarted <- e.pg.Restart(ctx) }()
	if len(steps) > 1 {
		steps[1](e)
	}
	if err := <-restarted; err != nil {
		t.Fatalf("restart PostgreSQL in the middle of a chunk: %v", err)
	}
	t.Logf("PostgreSQL stopped and started again in %s", time.Since(began).Round(time.Millisecond))
	p := waitProgress(t, store, "bf", "public.items", backfill.Done)
	changes := e.allWritten(t)
	state, reads, lasts := replayItems(t, changes, "bf")
	backfilltest.Compare(t, 0, state, backfilltest.TableItems(t, e.pg.DSN("app")))
	if lasts != 1 || reads < rows {
		t.Fatalf("%d reads (%d rows read), %d marked last; want %d reads, 1 last", reads, p.Rows, lasts, rows)
	}
}
