package capture_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/pgs2/pgs2/pkg/backfill"
	"github.com/pgs2/pgs2/pkg/backfill/backfilltest"
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
