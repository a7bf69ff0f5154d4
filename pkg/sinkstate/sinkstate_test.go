package sinkstate_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/pgs2/pgs2/pkg/config"
	"github.com/pgs2/pgs2/pkg/natstest"
	"github.com/pgs2/pgs2/pkg/seed"
	"github.com/pgs2/pgs2/pkg/sinkstate"
)

func sinks(status string) []config.Sink { return []config.Sink{{Name: "docs", Status: status}} }

// TestApplyAndSet: the latest of the config's status and the operator's
// commands wins; a config whose status did not change leaves an operator's
// command in place (a restart does not undo a pause).
func TestApplyAndSet(t *testing.T) {
	_, js := natstest.New(t).Connect(t)
	ctx := context.Background()
	kv, err := sinkstate.Ensure(ctx, js, 1)
	if err != nil {
		t.Fatal(err)
	}
	tab := sinkstate.NewTable(nil)
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go tab.Watch(wctx, kv)
	if err := tab.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	state := func() sinkstate.State {
		e, _, ok, err := sinkstate.Get(ctx, kv, "docs")
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			return sinkstate.Active
		}
		return e.State
	}
	steps := []struct {
		config string // applied, unless op is set
		op     sinkstate.State
		want   sinkstate.State
	}{
		{config: "", want: sinkstate.Active},
		{op: sinkstate.Paused, want: sinkstate.Paused},
		{config: "", want: sinkstate.Paused},       // a restart with the same config: the pause stays
		{config: "active", want: sinkstate.Paused}, // "" and active are one status
		{config: "disabled", want: sinkstate.Disabled},
		{op: sinkstate.Active, want: sinkstate.Active},
		{config: "disabled", want: sinkstate.Active}, // unchanged config: the enable stays
		{config: "paused", want: sinkstate.Paused},
		{config: "", want: sinkstate.Active},
	}
	for i, s := range steps {
		if s.op != "" {
			if _, err := sinkstate.Set(ctx, kv, "docs", s.op, "ada", "step"); err != nil {
				t.Fatal(err)
			}
		} else if err := sinkstate.Apply(ctx, kv, sinks(s.config)); err != nil {
			t.Fatal(err)
		}
		if got := state(); got != s.want {
			t.Fatalf("step %d (%+v): state %s, want %s", i, s, got, s.want)
		}
		deadline := time.Now().Add(2 * time.Second)
		for tab.Of("docs") != s.want {
			if time.Now().After(deadline) {
				t.Fatalf("step %d: the watched table says %s, want %s", i, tab.Of("docs"), s.want)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	if err := sinkstate.Apply(ctx, kv, sinks("stopped")); err == nil {
		t.Error("Apply took the status \"stopped\"")
	}
}

// TestSetRaces: operators and config applies racing on one sink lose no
// write (compare-and-set), and the table ends at the last one written.
func TestSetRaces(t *testing.T) {
	r, _ := seed.Rand(t)
	_, js := natstest.New(t).Connect(t)
	ctx := context.Background()
	kv, err := sinkstate.Ensure(ctx, js, 1)
	if err != nil {
		t.Fatal(err)
	}
	states := []sinkstate.State{sinkstate.Active, sinkstate.Paused, sinkstate.Disabled}
	var wg sync.WaitGroup
	for w := range 4 {
		picks := make([]sinkstate.State, 20)
		for i := range picks {
			picks[i] = states[r.IntN(len(states))]
		}
		wg.Go(func() {
			for i, s := range picks {
				if _, err := sinkstate.Set(ctx, kv, "docs", s, fmt.Sprintf("op%d", w), fmt.Sprint(i)); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	if _, err := sinkstate.Set(ctx, kv, "docs", sinkstate.Paused, "last", ""); err != nil {
		t.Fatal(err)
	}
	e, rev, ok, err := sinkstate.Get(ctx, kv, "docs")
	if err != nil || !ok || e.State != sinkstate.Paused || e.By != "last" {
		t.Fatalf("after the races: %+v ok=%v err=%v", e, ok, err)
	}
	if rev != 81 {
		t.Errorf("revision %d after 81 writes: a write was lost", rev)
	}
}
