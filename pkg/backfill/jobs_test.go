package backfill

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/pgs2/pgs2/pkg/natstest"
)

func TestJobStore(t *testing.T) {
	_, js := natstest.New(t).Connect(t)
	ctx := context.Background()
	s, err := Ensure(ctx, js, 1)
	if err != nil {
		t.Fatal(err)
	}
	j := Job{ID: "bf-1", Sink: "users-to-s2", Tables: []TableSpec{{Table: `"Mixed Case"."Weird.Table"`, Where: "id > 10"}}}
	if err := s.Create(ctx, j); err != nil {
		t.Fatal(err)
	}
	if err := s.Create(ctx, j); !errors.Is(err, ErrExists) {
		t.Fatalf("second create: %v, want ErrExists", err)
	}
	if err := s.Create(ctx, Job{ID: "a b"}); !errors.Is(err, ErrBadID) {
		t.Fatalf("bad id: %v", err)
	}
	got, _, err := s.Job(ctx, "bf-1")
	if err != nil || got.State != Running || got.Tables[0].Where != "id > 10" {
		t.Fatalf("job %+v %v", got, err)
	}
	if _, _, err := s.Job(ctx, "nope"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("missing job: %v", err)
	}
	if j, err := s.SetState(ctx, "bf-1", Paused); err != nil || j.State != Paused {
		t.Fatalf("pause: %+v %v", j, err)
	}
	if _, err := s.SetState(ctx, "bf-1", Cancelled); err != nil {
		t.Fatal(err)
	}
	if _, err := s.SetState(ctx, "bf-1", Running); err == nil || !strings.Contains(err.Error(), "cancelled") {
		t.Fatalf("resuming a cancelled job: %v", err)
	}

	// Progress is written with compare-and-set: a stale writer fails.
	table := `"Mixed Case"."Weird.Table"`
	if p, rev, err := s.Progress(ctx, "bf-1", "app", table); err != nil || rev != 0 || p.Job != "" {
		t.Fatalf("no progress yet: %+v %d %v", p, rev, err)
	}
	p := Progress{Job: "bf-1", Source: "app", Table: table, State: Running, Cursor: []string{"7"}, Rows: 7}
	rev, err := s.PutProgress(ctx, p, 0)
	if err != nil {
		t.Fatal(err)
	}
	p.Rows = 14
	if _, err := s.PutProgress(ctx, p, 0); err == nil {
		t.Fatal("a second first write succeeded")
	}
	rev2, err := s.PutProgress(ctx, p, rev)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.PutProgress(ctx, p, rev); err == nil {
		t.Fatal("a write at a stale revision succeeded")
	}
	back, r, err := s.Progress(ctx, "bf-1", "app", table)
	if err != nil || r != rev2 || back.Rows != 14 || back.Cursor[0] != "7" || back.Updated.IsZero() {
		t.Fatalf("progress %+v rev %d (want %d) %v", back, r, rev2, err)
	}
}
