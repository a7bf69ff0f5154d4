package capture_test

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/pgs2/pgs2/pkg/capture"
	"github.com/pgs2/pgs2/pkg/pgrepl"
	"github.com/pgs2/pgs2/pkg/pgtest"
	"github.com/pgs2/pgs2/pkg/proctest"
)

// TestSlotRecreatedOrAnotherDatabase: what the changes stream holds is
// checked against the database at every start.
//   - The slot dropped (or lost in a failover) and created again: capture
//     goes on, and warns that the changes committed in between are not
//     captured, naming the backfill that brings them.
//   - The same source name and stream pointed at another database, whose
//     WAL is behind the stream's last change (a new cluster, a restore):
//     capture refuses, naming the fix. Before, it skipped that database's
//     changes up to the stream's position as already stored: silent loss.
func TestSlotRecreatedOrAnotherDatabase(t *testing.T) {
	e := newEnv(t, "CREATE TABLE t (id int PRIMARY KEY)", "public.t")
	stop := e.run(t)
	// Push the WAL on, so that a new cluster's is behind it.
	for i := 1; i <= 3; i++ {
		e.pg.MustExec(t, "app", "INSERT INTO t VALUES ($1)", i)
		e.pg.MustExec(t, "app", "SELECT pg_switch_wal()")
	}
	e.waitMessages(t, 3)
	if err := stop(); err != nil {
		t.Fatal(err)
	}

	// The slot dropped; a change meanwhile is lost to it.
	e.pg.MustExec(t, "app", "SELECT pg_drop_replication_slot('pgs2')")
	e.pg.MustExec(t, "app", "INSERT INTO t VALUES (4)")
	var logs proctest.Buffer
	e.opts = []capture.Option{capture.WithLogger(slog.New(slog.NewTextHandler(&logs, nil)))}
	stop = e.run(t)
	e.pg.MustExec(t, "app", "INSERT INTO t VALUES (5)")
	msgs := e.waitMessages(t, 4)
	if id := msgs[3].Msg.Record["id"].(float64); id != 5 {
		t.Fatalf("after the new slot: change of id %v, want 5", id)
	}
	if !strings.Contains(logs.String(), "the replication slot was created, but the changes stream already holds changes of this source") ||
		!strings.Contains(logs.String(), "pgs2ctl backfill start") {
		t.Errorf("no warning about the changes before the new slot:\n%s", logs.String())
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}

	// Another database under the same source and stream.
	other := pgtest.New(t)
	other.MustExec(t, "postgres", "CREATE DATABASE app")
	other.MustExec(t, "app", "CREATE TABLE t (id int PRIMARY KEY)")
	cfg := e.cfg
	cfg.Repl.DSN = other.DSN("app")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	err := capture.New(cfg, e.js, capture.WithLogger(slog.New(slog.NewTextHandler(&logs, nil)))).Run(ctx)
	if !errors.Is(err, pgrepl.ErrSetup) || !strings.Contains(err.Error(), "captured from another database") ||
		!strings.Contains(err.Error(), "source.name") {
		t.Fatalf("capture of another database into the stream: %v, want a setup error naming it and the fix", err)
	}
}
