package devrun

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// proc is a child process of the runner: one of the services or s2local.
type proc struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	logFrom int64 // where this start's output begins in logPath
	done    chan struct{}
	err     error // valid once done is closed
}

// startProc runs bin with args, its output appended to logPath. The child
// gets its own process group, so a Ctrl-C in the terminal reaches only the
// runner, which then stops the children in order; if the runner dies, the
// kernel sends the child SIGTERM.
func startProc(name, bin string, args []string, logPath string, env []string) (*proc, error) {
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open %s log: %w", name, err)
	}
	from, _ := logf.Seek(0, io.SeekEnd)
	fmt.Fprintf(logf, "=== pgs2 run: %s started at %s ===\n", name, time.Now().Format(time.RFC3339))
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = env
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start %s (%s): %w", name, bin, err)
	}
	p := &proc{name: name, cmd: cmd, logPath: logPath, logFrom: from, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		logf.Close()
		close(p.done)
	}()
	return p, nil
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM and waits for the process to exit; after timeout, or
// when force is closed, it SIGKILLs the process group. It returns an error
// unless the process stopped as asked.
func (p *proc) stop(timeout time.Duration, force <-chan struct{}) error {
	if p.exited() {
		// It ended by itself: whoever noticed has reported how.
		_ = syscall.Kill(-p.pid(), syscall.SIGKILL)
		return nil
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-p.done:
	case <-t.C:
		_ = syscall.Kill(-p.pid(), syscall.SIGKILL)
		<-p.done
		return fmt.Errorf("%s did not stop within %s of SIGTERM; killed it (log %s)", p.name, timeout, p.logPath)
	case <-force:
		_ = syscall.Kill(-p.pid(), syscall.SIGKILL)
		<-p.done
		return fmt.Errorf("%s killed (second interrupt)", p.name)
	}
	// Whatever the service left in its process group goes too.
	_ = syscall.Kill(-p.pid(), syscall.SIGKILL)
	var ee *exec.ExitError
	if errors.As(p.err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGTERM {
			return nil // it did not handle SIGTERM, but it stopped as asked
		}
	}
	if p.err != nil {
		return fmt.Errorf("%s: %w (log %s)", p.name, p.err, p.logPath)
	}
	return nil
}

// logTail returns the last lines the process wrote since it started.
func (p *proc) logTail() string { return tailFile(p.logPath, p.logFrom, 40) }

func tailFile(path string, from int64, lines int) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	const maxBytes = 64 << 10
	if st, err := f.Stat(); err == nil && st.Size()-from > maxBytes {
		from = st.Size() - maxBytes
	}
	if _, err := f.Seek(from, io.SeekStart); err != nil {
		return ""
	}
	b, _ := io.ReadAll(f)
	ls := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(ls) > lines {
		ls = ls[len(ls)-lines:]
	}
	return "    " + strings.Join(ls, "\n    ")
}

// waitHTTP polls url until it answers 200, the process exits, ctx ends or
// timeout passes.
func waitHTTP(ctx context.Context, p *proc, url string, timeout time.Duration) error {
	hc := &http.Client{Timeout: 2 * time.Second}
	deadline := time.Now().Add(timeout)
	last := "no answer"
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return fmt.Errorf("%s: %w", p.name, err)
		}
		resp, err := hc.Do(req)
		if err == nil {
			b, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Sprintf("%s: %s", resp.Status, bytes.TrimSpace(b))
		} else if ctx.Err() == nil {
			last = err.Error()
		}
		select {
		case <-p.done:
			return fmt.Errorf("%s exited before it was ready (%v); the end of %s:\n%s", p.name, p.err, p.logPath, p.logTail())
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready after %s (%s answered %s); the end of %s:\n%s",
				p.name, timeout, url, last, p.logPath, p.logTail())
		}
	}
}

// checkPorts fails when any of the ports cannot be listened on, naming each
// one and the flag that moves it.
func checkPorts(ports []namedPort) error {
	var bad []string
	for _, p := range ports {
		l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p.port)))
		if err != nil {
			what := "taken"
			if !errors.Is(err, syscall.EADDRINUSE) {
				what = "unusable: " + err.Error()
			}
			bad = append(bad, fmt.Sprintf("  port %d for %s is %s: stop what listens there or choose another with --%s (or $%s)",
				p.port, p.what, what, p.flag, envName(p.flag)))
			continue
		}
		l.Close()
	}
	if len(bad) > 0 {
		return fmt.Errorf("ports in use:\n%s", strings.Join(bad, "\n"))
	}
	return nil
}

type namedPort struct {
	port int
	what string
	flag string
}

// pathForHumans is path relative to the working directory when it lies
// below it (what a user pastes from the repository root), else absolute.
func pathForHumans(path string) string {
	abs, err := filepath.Abs(path)
	if err != nil {
		return path
	}
	wd, err := os.Getwd()
	if err != nil {
		return abs
	}
	rel, err := filepath.Rel(wd, abs)
	if err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
		return abs
	}
	return rel
}

// commandPath is pathForHumans for a command: always with a slash, so a
// shell does not look it up on PATH.
func commandPath(path string) string {
	p := pathForHumans(path)
	if !strings.Contains(p, "/") {
		return "./" + p
	}
	return p
}
