package pgtest

import (
	"context"
	"errors"
	"os"
	"testing"
	"time"
)

// New starts a server for a test and stops it at cleanup. The test is skipped
// only when no server binaries are installed and CI is unset; under CI a
// missing server fails the test.
func New(t testing.TB, opts ...func(*Options)) *Instance {
	t.Helper()
	var o Options
	for _, f := range opts {
		f(&o)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	in, err := Start(ctx, o)
	if errors.Is(err, ErrNoBinaries) && os.Getenv("CI") == "" {
		t.Skipf("skipping: %v", err)
	}
	if err != nil {
		t.Fatalf("start postgres: %v", err)
	}
	t.Cleanup(func() {
		if err := in.Close(); err != nil {
			t.Logf("stop postgres: %v", err)
		}
	})
	return in
}

// WithSettings adds server settings (`-c name=value`).
func WithSettings(kv map[string]string) func(*Options) {
	return func(o *Options) { o.Settings = kv }
}

// MustExec runs SQL on database db and fails the test on error.
func (in *Instance) MustExec(t testing.TB, db, sql string, args ...any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := in.Exec(ctx, db, sql, args...); err != nil {
		t.Fatalf("exec %q: %v", sql, err)
	}
}
