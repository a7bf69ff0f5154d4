// Package pgtest starts throwaway PostgreSQL servers from the installed server
// binaries, for tests, benchmarks and `make run`.
package pgtest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
)

// ErrNoBinaries is returned when no PostgreSQL server binaries are installed.
var ErrNoBinaries = errors.New("PostgreSQL server binaries not found: install them with " +
	"`apt-get install postgresql-15` (or set PGS2_PG_BINDIR to the directory holding initdb and postgres)")

// Options configure a server.
type Options struct {
	// BinDir holds initdb and postgres; empty = FindBinDir.
	BinDir string
	// DataDir is used (and kept) when set; empty = a new temporary directory removed by Close.
	DataDir string
	// Port to listen on; 0 = a free port.
	Port int
	// Settings are extra `-c name=value` server settings; they override the defaults.
	Settings map[string]string
	// LogFile receives the server's output; empty = DataDir/../postgres.log.
	LogFile string
	// FixParentPerms, when the server runs as the postgres OS user (this
	// process is root), adds search permission for others (o+x) to each
	// directory above DataDir's parent that the postgres user cannot enter.
	// Without it such a directory is an error that names it.
	FixParentPerms bool
}

// Instance is a running (or stopped) PostgreSQL server.
type Instance struct {
	BinDir  string
	DataDir string
	Port    int
	LogFile string

	opts    Options
	tempDir string // removed by Close
	cred    *syscall.Credential

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
}

// FindBinDir returns the directory of the newest installed PostgreSQL server.
func FindBinDir() (string, error) {
	if d := os.Getenv("PGS2_PG_BINDIR"); d != "" {
		if _, err := os.Stat(filepath.Join(d, "postgres")); err != nil {
			return "", fmt.Errorf("PGS2_PG_BINDIR=%s has no postgres binary: %w", d, err)
		}
		return d, nil
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool { return versionOf(dirs[i]) > versionOf(dirs[j]) })
	for _, d := range dirs {
		if _, err := os.Stat(filepath.Join(d, "initdb")); err == nil {
			return d, nil
		}
	}
	if p, err := exec.LookPath("pg_config"); err == nil {
		if out, err := exec.Command(p, "--bindir").Output(); err == nil {
			d := strings.TrimSpace(string(out))
			if _, err := os.Stat(filepath.Join(d, "initdb")); err == nil {
				return d, nil
			}
		}
	}
	return "", ErrNoBinaries
}

func versionOf(dir string) int {
	v, _ := strconv.Atoi(filepath.Base(filepath.Dir(dir)))
	return v
}

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// Start initialises (when the data directory is new) and starts a server with
// wal_level=logical. As root it runs the server as the `postgres` OS user.
func Start(ctx context.Context, opts Options) (*Instance, error) {
	bin := opts.BinDir
	if bin == "" {
		var err error
		if bin, err = FindBinDir(); err != nil {
			return nil, err
		}
	}
	in := &Instance{BinDir: bin, opts: opts}
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			return nil, fmt.Errorf("running as root needs the postgres OS user (created by the postgresql package): %w", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		in.cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	}
	in.DataDir = opts.DataDir
	if in.DataDir == "" {
		// os.MkdirTemp, not t.TempDir: the postgres user must be able to enter it.
		dir, err := os.MkdirTemp("", "pgs2-pg-")
		if err != nil {
			return nil, fmt.Errorf("create temp dir: %w", err)
		}
		in.tempDir = dir
		in.DataDir = filepath.Join(dir, "data")
	}
	in.LogFile = opts.LogFile
	if in.LogFile == "" {
		in.LogFile = filepath.Join(filepath.Dir(in.DataDir), "postgres.log")
	}
	if err := in.chown(filepath.Dir(in.DataDir)); err != nil {
		in.Close()
		return nil, err
	}
	if err := in.checkParents(filepath.Dir(in.DataDir)); err != nil {
		in.Close()
		return nil, err
	}
	if _, err := os.Stat(filepath.Join(in.DataDir, "PG_VERSION")); err != nil {
		if err := in.initdb(ctx); err != nil {
			in.Close()
			return nil, err
		}
	}
	in.Port = opts.Port
	if in.Port == 0 {
		p, err := FreePort()
		if err != nil {
			in.Close()
			return nil, err
		}
		in.Port = p
	}
	if err := in.start(ctx); err != nil {
		in.Close()
		return nil, err
	}
	return in, nil
}

func (in *Instance) chown(dir string) error {
	if in.cred == nil {
		return nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	if err := os.Chown(dir, int(in.cred.Uid), int(in.cred.Gid)); err != nil {
		return fmt.Errorf("chown %s to postgres: %w", dir, err)
	}
	return nil
}

// checkParents makes sure the postgres OS user can enter every directory
// above dir (it needs search permission on each to reach its data).
func (in *Instance) checkParents(dir string) error {
	if in.cred == nil {
		return nil
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return fmt.Errorf("resolve %s: %w", dir, err)
	}
	for p := filepath.Dir(abs); ; p = filepath.Dir(p) {
		fi, err := os.Stat(p)
		if err != nil {
			return fmt.Errorf("stat %s: %w", p, err)
		}
		st, ok := fi.Sys().(*syscall.Stat_t)
		if !ok {
			return nil
		}
		bit, who := os.FileMode(0o001), "o"
		switch {
		case st.Uid == in.cred.Uid:
			bit, who = 0o100, "u"
		case st.Gid == in.cred.Gid:
			bit, who = 0o010, "g"
		}
		if fi.Mode().Perm()&bit == 0 {
			if !in.opts.FixParentPerms {
				return fmt.Errorf("the postgres OS user cannot enter %s (mode %04o), so it cannot reach %s: "+
					"run `chmod %s+x %s` or choose a data directory elsewhere", p, fi.Mode().Perm(), dir, who, p)
			}
			if err := os.Chmod(p, fi.Mode()&(os.ModePerm|os.ModeSetuid|os.ModeSetgid|os.ModeSticky)|bit); err != nil {
				return fmt.Errorf("let the postgres OS user enter %s: %w", p, err)
			}
		}
		if p == filepath.Dir(p) {
			return nil
		}
	}
}

func (in *Instance) command(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, filepath.Join(in.BinDir, name), args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Credential: in.cred}
	cmd.Dir = "/"
	cmd.Env = append(os.Environ(), "LC_ALL=C", "LANG=C")
	return cmd
}

func (in *Instance) initdb(ctx context.Context) error {
	cmd := in.command(ctx, "initdb", "-D", in.DataDir, "-U", "postgres", "--auth=trust",
		"--encoding=UTF8", "--locale=C", "--no-sync")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("initdb %s: %w\n%s", in.DataDir, err, out)
	}
	return nil
}

func (in *Instance) start(ctx context.Context) error {
	settings := map[string]string{
		"listen_addresses":        "127.0.0.1",
		"unix_socket_directories": filepath.Dir(in.DataDir),
		"wal_level":               "logical",
		"max_wal_senders":         "20",
		"max_replication_slots":   "20",
		"fsync":                   "off",
		"synchronous_commit":      "off",
		"full_page_writes":        "off",
		"max_connections":         "100",
		"shared_buffers":          "128MB",
		"log_min_messages":        "warning",
	}
	for k, v := range in.opts.Settings {
		settings[k] = v
	}
	args := []string{"-D", in.DataDir, "-p", strconv.Itoa(in.Port)}
	keys := make([]string, 0, len(settings))
	for k := range settings {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		args = append(args, "-c", k+"="+settings[k])
	}
	logf, err := os.OpenFile(in.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("open postgres log: %w", err)
	}
	// The server outlives ctx: it is stopped by Stop/Close, not by cancellation.
	cmd := in.command(context.WithoutCancel(ctx), "postgres", args...)
	// If this process dies without stopping it, the postmaster shuts down
	// immediately instead of lingering.
	cmd.SysProcAttr.Pdeathsig = syscall.SIGQUIT
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start postgres: %w", err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); logf.Close(); close(done) }()
	in.mu.Lock()
	in.cmd, in.done = cmd, done
	in.mu.Unlock()

	deadline := time.Now().Add(60 * time.Second)
	for {
		c, err := pgx.Connect(ctx, in.DSN("postgres"))
		if err == nil {
			c.Close(ctx)
			return nil
		}
		select {
		case <-done:
			return fmt.Errorf("postgres exited during start-up; log %s:\n%s", in.LogFile, tail(in.LogFile))
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("postgres not ready after 60s: %w; log %s:\n%s", err, in.LogFile, tail(in.LogFile))
		}
	}
}

func tail(path string) string {
	b, _ := os.ReadFile(path)
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}

// DSN returns a URL for database db as the postgres superuser.
func (in *Instance) DSN(db string) string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", in.Port, db)
}

// Exec runs SQL statements on database db.
func (in *Instance) Exec(ctx context.Context, db, sql string, args ...any) error {
	c, err := pgx.Connect(ctx, in.DSN(db))
	if err != nil {
		return err
	}
	defer c.Close(ctx)
	_, err = c.Exec(ctx, sql, args...)
	return err
}

// CreateDB creates a database.
func (in *Instance) CreateDB(ctx context.Context, name string) error {
	return in.Exec(ctx, "postgres", "CREATE DATABASE "+pgx.Identifier{name}.Sanitize())
}

// Stop shuts the server down (fast mode) and waits for it to exit.
func (in *Instance) Stop() error { return in.signal(syscall.SIGINT, 60*time.Second) }

// Kill SIGKILLs the postmaster (its children exit when they notice).
func (in *Instance) Kill() error { return in.signal(syscall.SIGKILL, 30*time.Second) }

func (in *Instance) signal(sig syscall.Signal, wait time.Duration) error {
	in.mu.Lock()
	cmd, done := in.cmd, in.done
	in.mu.Unlock()
	if cmd == nil {
		return nil
	}
	select {
	case <-done:
		return nil
	default:
	}
	_ = cmd.Process.Signal(sig)
	select {
	case <-done:
	case <-time.After(wait):
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
		return fmt.Errorf("postgres did not stop within %s", wait)
	}
	if sig == syscall.SIGKILL {
		// Backends notice the dead postmaster quickly; make sure none survives.
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	}
	return nil
}

// Restart stops the server and starts it again on the same port and data.
func (in *Instance) Restart(ctx context.Context) error {
	if err := in.Stop(); err != nil {
		return err
	}
	return in.start(ctx)
}

// Close stops the server and removes a temporary data directory.
func (in *Instance) Close() error {
	err := in.Stop()
	if in.tempDir != "" {
		if rmErr := os.RemoveAll(in.tempDir); rmErr != nil && err == nil {
			err = rmErr
		}
	}
	return err
}
