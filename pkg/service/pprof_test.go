package service

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pgs2/pgs2/pkg/pgtest"
)

// TestPprofOnlyWhenAsked: /debug/pprof/ answers on --http-addr with
// --pprof, and is not there without it.
func TestPprofOnlyWhenAsked(t *testing.T) {
	path := filepath.Join(t.TempDir(), "pgs2.yaml")
	if err := os.WriteFile(path, []byte(strings.ReplaceAll(reloadConfig, "%STREAM%", "a")), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, on := range []bool{false, true} {
		port, err := pgtest.FreePort()
		if err != nil {
			t.Fatal(err)
		}
		addr := fmt.Sprintf("127.0.0.1:%d", port)
		args := []string{"--config", path, "--http-addr", addr, "--log-level", "error"}
		if on {
			args = append(args, "--pprof")
		}
		var status int
		code := Main("test", "", args, io.Discard, func(ctx context.Context, env Env) error {
			// The server starts next to run: ask it until it answers.
			for {
				resp, err := http.Get("http://" + addr + "/debug/pprof/goroutine?debug=1")
				if err == nil {
					resp.Body.Close()
					status = resp.StatusCode
					return nil
				}
				select {
				case <-ctx.Done():
					return ctx.Err()
				case <-time.After(5 * time.Millisecond):
				}
			}
		})
		if code != 0 {
			t.Fatalf("--pprof=%v: exit %d", on, code)
		}
		if want := map[bool]int{false: http.StatusNotFound, true: http.StatusOK}[on]; status != want {
			t.Errorf("--pprof=%v: /debug/pprof/goroutine answered %d, want %d", on, status, want)
		}
	}
}
