package s2local_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/s2-streamstore/s2-sdk-go/s2"

	"github.com/pgs2/pgs2/pkg/proctest"
	"github.com/pgs2/pgs2/pkg/s2local"
)

// s2localBin is bin/s2local built from this tree in TestMain, for the
// tests that run the server as its own process.
var s2localBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "s2local-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	s2localBin = filepath.Join(dir, "s2local")
	goTool := "go"
	if _, err := exec.LookPath("go"); err != nil {
		goTool = "/usr/local/go/bin/go"
	}
	cmd := exec.Command(goTool, "build", "-o", s2localBin, "github.com/pgs2/pgs2/services/s2local")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build s2local:", err)
		os.Exit(1)
	}
	code := m.Run()
	_ = os.RemoveAll(dir)
	os.Exit(code)
}

const testBasin = "test-basin"

// startServer runs a server in this process on 127.0.0.1:0 and returns it
// with its base URL.
func startServer(t *testing.T, o s2local.Options) (*s2local.Server, string) {
	t.Helper()
	if o.Logger == nil {
		o.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	srv, err := s2local.New(o)
	if err != nil {
		t.Fatal(err)
	}
	return startServerWith(t, srv)
}

var running sync.Map // *s2local.Server → func() (stop)

// startServerWith serves srv on 127.0.0.1:0 until stopServer or the test's
// end.
func startServerWith(t *testing.T, srv *s2local.Server) (*s2local.Server, string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("serve: %v", err)
			}
			if err := srv.Close(); err != nil {
				t.Errorf("close: %v", err)
			}
		})
	}
	running.Store(srv, stop)
	t.Cleanup(stop)
	return srv, "http://" + ln.Addr().String()
}

func stopServer(t *testing.T, srv *s2local.Server) {
	t.Helper()
	if f, ok := running.LoadAndDelete(srv); ok {
		f.(func())()
	}
}

// newSDK is the official SDK pointed at s2local: one endpoint for account
// and basins (the basin goes in the s2-basin header), SDK retries off so
// that every error is seen.
func newSDK(base, token string) *s2.Client {
	if token == "" {
		token = "any-token"
	}
	return s2.New(token, &s2.ClientOptions{
		BaseURL:          base + "/v1",
		MakeBasinBaseURL: func(string) string { return base + "/v1" },
		RetryConfig:      &s2.RetryConfig{MaxAttempts: 1},
		RequestTimeout:   10 * time.Second,
	})
}

// setup starts an in-memory server with basin testBasin and returns the
// SDK's basin client and the base URL.
func setup(t *testing.T, o s2local.Options) (*s2.BasinClient, string) {
	t.Helper()
	_, base := startServer(t, o)
	c := newSDK(base, o.Token)
	if _, err := c.Basins.Create(context.Background(), s2.CreateBasinArgs{Basin: testBasin}); err != nil {
		t.Fatal(err)
	}
	return c.Basin(testBasin), base
}

func mustCreateStream(t *testing.T, b *s2.BasinClient, name string) *s2.StreamClient {
	t.Helper()
	if _, err := b.Streams.Create(context.Background(), s2.CreateStreamArgs{Stream: s2.StreamName(name)}); err != nil {
		t.Fatal(err)
	}
	return b.Stream(s2.StreamName(name))
}

// rawResp is a raw HTTP response.
type rawResp struct {
	status int
	header http.Header
	body   []byte
}

func (r rawResp) json(t *testing.T) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(r.body, &m); err != nil {
		t.Fatalf("response %d %q is not JSON: %v", r.status, r.body, err)
	}
	return m
}

// do sends a raw HTTP request; hdr is "Name: value" lines.
func do(t *testing.T, method, url string, body []byte, hdr ...string) rawResp {
	t.Helper()
	req, err := http.NewRequest(method, url, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range hdr {
		k, v, _ := strings.Cut(h, ":")
		req.Header.Set(strings.TrimSpace(k), strings.TrimSpace(v))
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return rawResp{resp.StatusCode, resp.Header, b}
}

// wantError checks a standard S2 error response.
func wantError(t *testing.T, r rawResp, status int, code string) {
	t.Helper()
	if r.status != status {
		t.Fatalf("status %d, want %d (body %s)", r.status, status, r.body)
	}
	if m := r.json(t); m["code"] != code || m["message"] == "" {
		t.Fatalf("body %s, want code %q and a message", r.body, code)
	}
}

// proc is s2local running as its own process.
type proc struct {
	cmd    *exec.Cmd
	base   string
	log    *proctest.Buffer
	exited chan struct{} // closed when the process has exited
}

// startProc starts bin/s2local with args (plus --addr) and waits for
// /health.
func startProc(t *testing.T, args ...string) *proc {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	p := &proc{base: "http://" + addr, log: &proctest.Buffer{}, exited: make(chan struct{})}
	p.cmd = exec.Command(s2localBin, append([]string{"--addr", addr}, args...)...)
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		_ = p.cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(p.kill)
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := http.Get(p.base + "/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return p
			}
		}
		select {
		case <-p.exited:
			t.Fatalf("s2local exited: %v\n%s", p.cmd.ProcessState, p.log)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("s2local not healthy after 10s\n%s", p.log)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// kill SIGKILLs the process (if running) and waits for it.
func (p *proc) kill() {
	select {
	case <-p.exited:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.exited
}

// stop sends SIGTERM and returns the exit code.
func (p *proc) stop(t *testing.T) int {
	t.Helper()
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(15 * time.Second):
		t.Fatalf("s2local did not stop on SIGTERM\n%s", p.log)
	}
	return p.cmd.ProcessState.ExitCode()
}
