// Package proctest runs pgs2's binaries as separate processes in tests:
// built once per test binary, started with a free --http-addr, awaited
// until /readyz answers, killed (SIGKILL) or stopped (SIGTERM) on demand.
package proctest

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

var (
	mu    sync.Mutex
	built = map[string]string{}
)

// Build compiles the main package at pkgPath (e.g. "../../services/router")
// once per test binary and returns the binary's path.
func Build(t testing.TB, pkgPath string) string {
	t.Helper()
	mu.Lock()
	defer mu.Unlock()
	if bin, ok := built[pkgPath]; ok {
		return bin
	}
	dir, err := os.MkdirTemp("", "pgs2-bin-")
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, filepath.Base(pkgPath))
	if out, err := exec.Command("go", "build", "-o", bin, pkgPath).CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkgPath, err, out)
	}
	built[pkgPath] = bin
	return bin
}

// Proc is a running service.
type Proc struct {
	Cmd  *exec.Cmd
	Addr string // its --http-addr
	Log  string // its output
	done chan error
}

// Start runs bin with args plus --http-addr on a free port and waits until
// /readyz answers 200. At cleanup the process is killed; when the test
// failed its log is shown.
func Start(t testing.TB, bin string, args ...string) *Proc {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	logf, err := os.CreateTemp(t.TempDir(), filepath.Base(bin)+"-*.log")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, append(args, "--http-addr", addr)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &Proc{Cmd: cmd, Addr: addr, Log: logf.Name(), done: make(chan error, 1)}
	go func() { p.done <- cmd.Wait(); logf.Close() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		if t.Failed() {
			t.Logf("%s log:\n%s", filepath.Base(bin), p.Output())
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		if resp, err := http.Get("http://" + addr + "/readyz"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return p
			}
		}
		select {
		case err := <-p.done:
			p.done <- err
			t.Fatalf("%s exited before it was ready: %v\n%s", filepath.Base(bin), err, p.Output())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not ready after 30s:\n%s", filepath.Base(bin), p.Output())
		}
	}
}

// Output is what the process wrote so far.
func (p *Proc) Output() string {
	b, _ := os.ReadFile(p.Log)
	return string(b)
}

// Kill SIGKILLs the process and waits for it.
func (p *Proc) Kill() {
	_ = p.Cmd.Process.Signal(syscall.SIGKILL)
	err := <-p.done
	p.done <- err
}

// Term sends SIGTERM and fails the test unless the process exits 0 within 30s.
func (p *Proc) Term(t testing.TB) {
	t.Helper()
	_ = p.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-p.done:
		p.done <- err
		if err != nil {
			t.Fatalf("exit after SIGTERM: %v (want 0)\n%s", err, p.Output())
		}
	case <-time.After(30 * time.Second):
		t.Fatal("did not exit within 30s of SIGTERM")
	}
}

// MustLog fails the test unless the output contains s.
func (p *Proc) MustLog(t testing.TB, s string) {
	t.Helper()
	if out := p.Output(); !strings.Contains(out, s) {
		t.Fatalf("log lacks %q:\n%s", s, out)
	}
}

// PeakRSS is the process's VmHWM in bytes.
func (p *Proc) PeakRSS(t testing.TB) uint64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.Cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			var kb uint64
			fmt.Sscanf(strings.TrimSpace(rest), "%d", &kb)
			return kb << 10
		}
	}
	t.Fatal("no VmHWM")
	return 0
}

// clockTicks is USER_HZ, the unit of utime/stime in /proc/<pid>/stat (100 on Linux).
const clockTicks = 100

// CPU is a process's user+system CPU time so far, from /proc (0 when it is
// gone).
func CPU(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')') // the command name may hold spaces
	if i < 0 {
		return 0
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64) // field 14
	st, _ := strconv.ParseInt(f[12], 10, 64) // field 15
	return time.Duration(ut+st) * time.Second / clockTicks
}
