package service

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/pgs2/pgs2/pkg/config"
)

const reloadConfig = `
source:
  name: app
  dsn: postgres://replicator@localhost:5432/app
  tables: [public.users]
nats:
  url: nats://127.0.0.1:4222
sinks:
  - name: s
    tables: [public.users]
    basin: my-basin
    stream: %STREAM%
`

// TestOnReload: SIGHUP reloads the file; a file that does not load is
// refused and the running config stays.
func TestOnReload(t *testing.T) {
	path := filepath.Join(t.TempDir(), "pgs2.yaml")
	write := func(s string) {
		if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(strings.ReplaceAll(reloadConfig, "%STREAM%", "a"))
	got := make(chan string, 4)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	OnReload(ctx, Env{ConfigPath: path, Log: slog.New(slog.NewTextHandler(os.Stderr, nil))}, func(c *config.Config) error {
		got <- c.Sinks[0].Stream
		return nil
	})
	hup := func() {
		if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
	}
	write(strings.ReplaceAll(reloadConfig, "%STREAM%", "b"))
	hup()
	select {
	case s := <-got:
		if s != "b" {
			t.Fatalf("reloaded stream %q, want b", s)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("SIGHUP did not reload")
	}
	write("sinks: [oops")
	hup()
	select {
	case s := <-got:
		t.Fatalf("a file that does not load was applied (%q)", s)
	case <-time.After(300 * time.Millisecond):
	}
}

// TestReloadRetriesUntilItApplies: a reload that fails for a moment (NATS
// restarting: the soak's fix of a routing function came during a NATS
// restart, was refused for good, and its parked changes never drained) is
// tried again, with the file as it was at the SIGHUP, until it applies; a refusal
// (functions that do not compile) is not.
func TestReloadRetriesUntilItApplies(t *testing.T) {
	was := reloadRetries
	reloadRetries.Min, reloadRetries.Max = time.Millisecond, 5*time.Millisecond
	defer func() { reloadRetries = was }()
	path := filepath.Join(t.TempDir(), "pgs2.yaml")
	write := func(stream string) {
		if err := os.WriteFile(path, []byte(strings.ReplaceAll(reloadConfig, "%STREAM%", stream)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("a")
	type call struct {
		stream string
		n      int
	}
	calls := make(chan call, 64)
	var n int
	gate := make(chan struct{}) // the first attempt returns once the file changed again
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	OnReload(ctx, Env{ConfigPath: path, Log: slog.New(slog.NewTextHandler(os.Stderr, nil))}, func(c *config.Config) error {
		n++
		calls <- call{c.Sinks[0].Stream, n}
		switch {
		case c.Sinks[0].Stream == "refused":
			return Refuse(errors.New("sink s: filter function does not compile"))
		case n < 3:
			if n == 1 {
				<-gate
			}
			return fmt.Errorf("read the state of sink s: %w", nats.ErrReconnectBufExceeded)
		}
		return nil
	})
	hup := func() {
		if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
	}
	next := func() call {
		select {
		case c := <-calls:
			return c
		case <-time.After(5 * time.Second):
			t.Fatal("no reload within 5s")
		}
		return call{}
	}
	write("b")
	hup()
	if c := next(); c.stream != "b" || c.n != 1 {
		t.Fatalf("first attempt %+v", c)
	}
	write("c") // changed before the retry: it waits for its own SIGHUP
	close(gate)
	if c := next(); c.stream != "b" || c.n != 2 {
		t.Fatalf("second attempt %+v, want the file as it was at the SIGHUP (b)", c)
	}
	if c := next(); c.n != 3 {
		t.Fatalf("third attempt %+v", c)
	}
	select {
	case c := <-calls:
		t.Fatalf("a reload that applied was tried again: %+v", c)
	case <-time.After(100 * time.Millisecond):
	}
	write("refused")
	hup()
	if c := next(); c.stream != "refused" {
		t.Fatalf("attempt %+v", c)
	}
	select {
	case c := <-calls:
		t.Fatalf("a refused reload was tried again: %+v", c)
	case <-time.After(100 * time.Millisecond):
	}
}
