package devrun_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pgs2/pgs2/pkg/natstest"
	"github.com/pgs2/pgs2/pkg/pgtest"
	"github.com/pgs2/pgs2/pkg/proctest"
	"github.com/pgs2/pgs2/pkg/tlstest"
)

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

// binaries builds the services, pgs2ctl and the runner (scripts/run) into
// one directory, once per test binary.
func binaries(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "pgs2-run-bin-")
		if err != nil {
			buildErr = err
			return
		}
		cmd := exec.Command("go", "build", "-o", dir+"/",
			"../../services/capture", "../../services/router", "../../services/delivery",
			"../../services/s2local", "../../services/pgs2ctl", "../../scripts/run")
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = errors.New("go build: " + err.Error() + "\n" + string(out))
			return
		}
		binDir = dir
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binDir
}

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

func needPostgres(t *testing.T) {
	t.Helper()
	if _, err := pgtest.FindBinDir(); err != nil {
		if errors.Is(err, pgtest.ErrNoBinaries) && os.Getenv("CI") == "" {
			t.Skipf("skipping: %v", err)
		}
		t.Fatal(err)
	}
}

// runner is one pgs2-run process.
type runner struct {
	cmd    *exec.Cmd
	out    *lines
	stderr *proctest.Buffer
	done   chan error
}

type lines struct {
	mu  sync.Mutex
	all []string
}

func (l *lines) add(s string) { l.mu.Lock(); l.all = append(l.all, s); l.mu.Unlock() }

func (l *lines) find(pred func(string) bool) (string, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, s := range l.all {
		if pred(s) {
			return s, true
		}
	}
	return "", false
}

func (l *lines) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.all, "\n")
}

func startRunner(t *testing.T, bin string, args ...string) *runner {
	t.Helper()
	cmd := exec.Command(filepath.Join(bin, "run"), args...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	r := &runner{cmd: cmd, out: &lines{}, stderr: &proctest.Buffer{}, done: make(chan error, 1)}
	cmd.Stderr = r.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	copied := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			r.out.add(sc.Text())
		}
		close(copied)
	}()
	go func() {
		<-copied
		r.done <- cmd.Wait()
	}()
	t.Cleanup(func() {
		if r.cmd.ProcessState == nil {
			_ = r.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-r.done:
			case <-time.After(2 * time.Minute):
				_ = r.cmd.Process.Kill()
			}
		}
		if t.Failed() {
			t.Logf("runner stdout:\n%s\nrunner stderr:\n%s", r.out, r.stderr)
		}
	})
	return r
}

// banner waits for the printed commands.
func (r *runner) banner(t *testing.T) (insert, tail string) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		ins, ok1 := r.out.find(func(s string) bool { return strings.Contains(s, "psql") && strings.Contains(s, "INSERT") })
		tl, ok2 := r.out.find(func(s string) bool { return strings.Contains(s, "pgs2ctl") && strings.Contains(s, " tail ") })
		if ok1 && ok2 {
			return strings.TrimSpace(ins), strings.TrimSpace(tl)
		}
		select {
		case err := <-r.done:
			r.done <- err
			t.Fatalf("runner exited before its banner: %v\nstderr:\n%s", err, r.stderr)
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("no banner after 3m")
		}
	}
}

// stop signals the runner and checks that it exits 0.
func (r *runner) stop(t *testing.T, sig syscall.Signal) {
	t.Helper()
	_ = r.cmd.Process.Signal(sig)
	select {
	case err := <-r.done:
		r.done <- err
		if err != nil {
			t.Fatalf("runner exit after %v: %v, want status 0\nstderr:\n%s", sig, err, r.stderr)
		}
	case <-time.After(3 * time.Minute):
		t.Fatalf("runner did not exit within 3m of %v", sig)
	}
}

// shell runs a printed command line as a user pasting it would.
func shell(t *testing.T, ctx context.Context, line string) string {
	t.Helper()
	cmd := exec.CommandContext(ctx, "sh", "-c", line)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s: %v\nstdout:\n%s\nstderr:\n%s", line, err, out.String(), errb.String())
	}
	return out.String()
}

type tailed struct {
	SeqNum  uint64      `json:"seq_num"`
	Headers [][2]string `json:"headers"`
	Body    struct {
		Action string `json:"action"`
		Record struct {
			ID   int64  `json:"id"`
			Name string `json:"name"`
		} `json:"record"`
	} `json:"body"`
}

func parseTail(t *testing.T, out string) []tailed {
	t.Helper()
	var recs []tailed
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if line == "" {
			continue
		}
		var r tailed
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatalf("tail --json printed %q: %v", line, err)
		}
		recs = append(recs, r)
	}
	return recs
}

func freePorts(t *testing.T, n int) []int {
	t.Helper()
	var ls []net.Listener
	var ports []int
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	for _, l := range ls {
		l.Close()
	}
	return ports
}

func runArgs(dir, bin string, ports []int) []string {
	return []string{"--dir", dir, "--bin", bin,
		"--pg-port", strconv.Itoa(ports[0]), "--nats-port", strconv.Itoa(ports[1]), "--s2-port", strconv.Itoa(ports[2]),
		"--capture-port", strconv.Itoa(ports[3]), "--router-port", strconv.Itoa(ports[4]), "--delivery-port", strconv.Itoa(ports[5])}
}

// runDir is a private temporary directory (mode 0700, as t.TempDir), so the
// runner must make it passable for the postgres OS user.
func runDir(t *testing.T) string {
	t.Helper()
	parent, err := os.MkdirTemp("", "pgs2-run-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(parent) })
	return filepath.Join(parent, ".run")
}

// checkAllGone fails unless every process of the last start (the pids file:
// each leads its own process group) and anything naming dir is gone.
func checkAllGone(t *testing.T, dir string) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "pids"))
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		name, pidText, _ := strings.Cut(line, " ")
		pid, err := strconv.Atoi(pidText)
		if err != nil {
			t.Fatalf("pids file line %q", line)
		}
		names[name] = true
		if err := syscall.Kill(-pid, 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("%s (process group %d) still has processes (kill -0: %v)", name, pid, err)
		}
	}
	for _, want := range []string{"postgres", "s2local", "capture", "router", "delivery"} {
		if !names[want] {
			t.Errorf("pids file lacks %s:\n%s", want, b)
		}
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		cl, err := os.ReadFile(p)
		if err == nil && bytes.Contains(cl, []byte(dir)) {
			t.Errorf("a process still names %s: %s", dir, bytes.ReplaceAll(cl, []byte{0}, []byte{' '}))
		}
	}
}

func TestRunInsertTailStopResume(t *testing.T) {
	needPostgres(t)
	bin := binaries(t)
	dir := runDir(t)
	args := runArgs(dir, bin, freePorts(t, 6))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	// First run: the printed insert arrives in S2 as the printed tail shows it.
	r := startRunner(t, bin, args...)
	insert, tail := r.banner(t)
	if !strings.Contains(tail, "pgs2-local/users") {
		t.Fatalf("tail command %q does not name the sample stream", tail)
	}
	shell(t, ctx, insert)
	recs := parseTail(t, shell(t, ctx, tail+" --json --count 1"))
	if len(recs) != 1 || recs[0].Body.Action != "insert" || recs[0].Body.Record.Name != "alice" || recs[0].Body.Record.ID != 1 {
		t.Fatalf("tail printed %+v, want the insert of alice (id 1)", recs)
	}
	r.stop(t, syscall.SIGINT)
	checkAllGone(t, dir)
	if !strings.Contains(r.stderr.String(), "everything stopped cleanly") {
		t.Errorf("stderr lacks the clean stop:\n%s", r.stderr)
	}

	// Second run: resumes (same slot, streams and data); a second insert
	// arrives and the first is not delivered again.
	r2 := startRunner(t, bin, args...)
	insert2, tail2 := r2.banner(t)
	shell(t, ctx, insert2)
	recs = parseTail(t, shell(t, ctx, tail2+" --json --count 2"))
	if len(recs) != 2 || recs[1].Body.Record.ID != 2 {
		t.Fatalf("after the restart tail printed %+v, want ids 1 and 2", recs)
	}
	// Give a duplicate time to show up, then read everything there is.
	time.Sleep(2 * time.Second)
	recs = parseTail(t, shell(t, ctx, tail2+" --json --no-follow"))
	ids := map[int64]int{}
	for _, rec := range recs {
		ids[rec.Body.Record.ID]++
	}
	if len(recs) != 2 || ids[1] != 1 || ids[2] != 1 {
		t.Fatalf("the stream holds %d data records (ids %v), want ids 1 and 2 once each", len(recs), ids)
	}
	r2.stop(t, syscall.SIGTERM)
	checkAllGone(t, dir)
}

func TestRunFailsFast(t *testing.T) {
	bin := binaries(t)

	t.Run("port taken", func(t *testing.T) {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		ports := freePorts(t, 6)
		ports[1] = l.Addr().(*net.TCPAddr).Port
		cmd := exec.Command(filepath.Join(bin, "run"), runArgs(runDir(t), bin, ports)...)
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 1 {
			t.Fatalf("exit %v, want 1\n%s", err, out)
		}
		want := "port " + strconv.Itoa(ports[1]) + " for JetStream is taken"
		if !strings.Contains(string(out), want) || !strings.Contains(string(out), "--nats-port") {
			t.Fatalf("output lacks %q and the flag:\n%s", want, out)
		}
	})

	t.Run("missing binaries", func(t *testing.T) {
		cmd := exec.Command(filepath.Join(bin, "run"), "--dir", runDir(t), "--bin", t.TempDir())
		out, err := cmd.CombinedOutput()
		if err == nil || !strings.Contains(string(out), "make build") {
			t.Fatalf("exit %v, want a failure that says make build\n%s", err, out)
		}
	})

	t.Run("service never ready", func(t *testing.T) {
		needPostgres(t)
		// A bin directory whose capture never becomes ready.
		fake := t.TempDir()
		for _, b := range []string{"router", "delivery", "s2local", "pgs2ctl"} {
			if err := os.Symlink(filepath.Join(bin, b), filepath.Join(fake, b)); err != nil {
				t.Fatal(err)
			}
		}
		script := "#!/bin/sh\necho 'fake capture: waiting forever'\nexec sleep 600\n"
		if err := os.WriteFile(filepath.Join(fake, "capture"), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
		dir := runDir(t)
		cmd := exec.Command(filepath.Join(bin, "run"), append(runArgs(dir, fake, freePorts(t, 6)), "--timeout", "3s")...)
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 1 {
			t.Fatalf("exit %v, want 1\n%s", err, out)
		}
		for _, want := range []string{"capture not ready after 3s", "fake capture: waiting forever", "postgres stopped"} {
			if !strings.Contains(string(out), want) {
				t.Errorf("output lacks %q:\n%s", want, out)
			}
		}
	})
}

// TestRunAgainstSecuredNATS: make run against an external JetStream that
// requires TLS with client certificates and a password (--nats-url,
// --nats-user with $PGS2_NATS_PASSWORD, --nats-ca, --nats-cert,
// --nats-key): no embedded server is started, the printed insert reaches
// S2 through it (its streams are there), and the password is in no output
// and not in the config file.
func TestRunAgainstSecuredNATS(t *testing.T) {
	needPostgres(t)
	bin := binaries(t)
	dir := runDir(t)
	certs := t.TempDir()
	ca := tlstest.NewCA(t, "pgs2 run test CA")
	cli := ca.Issue(t, "pgs2-client")
	const password = "RUN-NATS-PW-31337"
	ns := natstest.NewMutualTLS(t, ca, "nats.test", "pgs2", password)
	t.Setenv("PGS2_NATS_PASSWORD", password)
	ports := freePorts(t, 6)
	args := append(runArgs(dir, bin, ports), "--nats-url", "tls://"+ns.Addr().String(), "--nats-user", "pgs2",
		"--nats-ca", ca.WriteCert(t, certs, "ca.pem"), "--nats-cert", cli.WriteCert(t, certs, "client.pem"),
		"--nats-key", cli.WriteKey(t, certs, "client.key"), "--nats-tls-server-name", "nats.test")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	r := startRunner(t, bin, args...)
	insert, tail := r.banner(t)
	shell(t, ctx, insert)
	recs := parseTail(t, shell(t, ctx, tail+" --json --count 1"))
	if len(recs) != 1 || recs[0].Body.Record.Name != "alice" {
		t.Fatalf("tail printed %+v, want the insert of alice", recs)
	}
	if l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(ports[1])); err != nil {
		t.Errorf("--nats-port %d is taken: an embedded JetStream runs next to --nats-url", ports[1])
	} else {
		l.Close()
	}
	r.stop(t, syscall.SIGTERM)
	if ns.GlobalAccount().JetStreamUsage().Streams == 0 {
		t.Error("the secured server holds no stream: the pipeline did not run on it")
	}
	cfg, _ := os.ReadFile(filepath.Join(dir, "pgs2.yaml"))
	for what, s := range map[string]string{"stdout": r.out.String(), "stderr": r.stderr.String(), "pgs2.yaml": string(cfg)} {
		if strings.Contains(s, password) {
			t.Errorf("the NATS password is in %s", what)
		}
	}
}

// TestRunAgainstCluster: make run against an external 3-node JetStream
// cluster (--nats-url with the three URLs, --nats-replicas 3): the printed
// insert reaches S2, and pgs2's streams have three replicas.
func TestRunAgainstCluster(t *testing.T) {
	needPostgres(t)
	bin := binaries(t)
	dir := runDir(t)
	c := natstest.NewCluster(t, 3)
	args := append(runArgs(dir, bin, freePorts(t, 6)), "--nats-url", c.URLs(), "--nats-replicas", "3")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	r := startRunner(t, bin, args...)
	insert, tail := r.banner(t)
	shell(t, ctx, insert)
	if recs := parseTail(t, shell(t, ctx, tail+" --json --count 1")); len(recs) != 1 || recs[0].Body.Record.Name != "alice" {
		t.Fatalf("tail printed %+v, want the insert of alice", recs)
	}
	_, js := c.Connect(t)
	for _, name := range []string{"PGS2_CHANGES", "PGS2_DELIVERY"} {
		s, err := js.Stream(ctx, name)
		if err != nil {
			t.Fatalf("stream %s on the cluster: %v", name, err)
		}
		info, err := s.Info(ctx)
		if err != nil {
			t.Fatalf("stream %s: %v", name, err)
		}
		if info.Config.Replicas != 3 {
			t.Errorf("stream %s: %d replicas, want 3", name, info.Config.Replicas)
		}
	}
	r.stop(t, syscall.SIGTERM)
}
