package service

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

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
