package restart

import (
	"context"
	"errors"
	"testing"
	"time"
)

func TestBackoffGrowsWithJitterAndResets(t *testing.T) {
	b := NewBackoff(Policy{Min: 100 * time.Millisecond, Max: 800 * time.Millisecond, ResetAfter: time.Minute})
	for i, step := range []time.Duration{100, 200, 400, 800, 800} {
		step *= time.Millisecond
		if d := b.Next(0); d < step/2 || d > step {
			t.Fatalf("wait %d = %v, want within [%v, %v]", i, d, step/2, step)
		}
	}
	if d := b.Next(time.Minute); d > 100*time.Millisecond {
		t.Fatalf("after a long session the wait is %v, want it back at the minimum", d)
	}
}

func TestLoopStopsWhenTold(t *testing.T) {
	var runs int
	boom := errors.New("boom")
	Loop(context.Background(), Policy{Min: time.Millisecond, Max: time.Millisecond}, func(context.Context) error {
		runs++
		return boom
	}, func(err error, _ time.Duration) bool {
		if !errors.Is(err, boom) {
			t.Fatalf("ended got %v", err)
		}
		return runs < 3
	})
	if runs != 3 {
		t.Fatalf("%d sessions, want 3", runs)
	}
	ctx, cancel := context.WithCancel(context.Background())
	Loop(ctx, Policy{Min: time.Hour, Max: time.Hour}, func(context.Context) error { cancel(); return boom },
		func(error, time.Duration) bool { t.Fatal("ended called after ctx ended"); return true })
}
