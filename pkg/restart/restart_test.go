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

func TestUntilRetriesTransientErrors(t *testing.T) {
	p := Policy{Min: time.Millisecond, Max: 4 * time.Millisecond}
	transient, fatal := errors.New("no responders"), errors.New("bad config")
	calls, told := 0, 0
	err := Until(context.Background(), p, func(context.Context) error {
		calls++
		if calls < 4 {
			return transient
		}
		return nil
	}, func(err error) bool { return err == fatal }, func(err error, wait time.Duration) {
		if err != transient || wait > 4*time.Millisecond {
			t.Errorf("told %v, wait %s", err, wait)
		}
		told++
	})
	if err != nil || calls != 4 || told != 3 {
		t.Fatalf("Until = %v after %d calls (%d told), want nil after 4 (3)", err, calls, told)
	}
	calls = 0
	err = Until(context.Background(), p, func(context.Context) error { calls++; return fatal }, func(err error) bool { return err == fatal }, nil)
	if err != fatal || calls != 1 {
		t.Fatalf("Until = %v after %d calls, want the permanent error after 1", err, calls)
	}
	ctx, cancel := context.WithCancel(context.Background())
	calls = 0
	err = Until(ctx, p, func(context.Context) error {
		calls++
		if calls == 3 {
			cancel()
		}
		return transient
	}, nil, nil)
	if !errors.Is(err, context.Canceled) || calls != 3 {
		t.Fatalf("Until = %v after %d calls, want context.Canceled after 3", err, calls)
	}
}
