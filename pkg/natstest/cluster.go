package natstest

import (
	"context"
	"errors"
	"fmt"
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

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgs2/pgs2/pkg/proctest"
)

// Cluster is a JetStream cluster of nats-server processes on loopback, for
// crash tests: a node can be SIGKILLed and started again on the same ports
// and store.
type Cluster struct {
	bin   string
	dir   string
	nodes []*node
}

type node struct {
	name  string // server_name: "n0", "n1", ...
	port  int    // client port
	conf  string // config file
	out   proctest.Buffer
	mu    sync.Mutex
	cmd   *exec.Cmd     // nil when not running
	exitc chan struct{} // closed when cmd exited
}

// NewCluster builds nats-server (once per test binary) and starts an n-node
// JetStream cluster, each node with its own config, store and output. At
// cleanup every node is killed and the stores removed; when the test failed
// the nodes' output is shown. Call WaitReady before using JetStream.
func NewCluster(t testing.TB, n int) *Cluster {
	t.Helper()
	bin := proctest.Build(t, "github.com/nats-io/nats-server/v2")
	dir, err := os.MkdirTemp("", "pgs2-natscluster-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	c := &Cluster{bin: bin, dir: dir}
	t.Cleanup(func() {
		for i := range c.nodes {
			c.Kill(i)
		}
		if t.Failed() {
			for i, nd := range c.nodes {
				t.Logf("nats-server %s (%d) output:\n%s", nd.name, i, c.Logs(i))
			}
		}
	})

	ports := freePorts(t, 2*n)
	var routes []string
	for i := 0; i < n; i++ {
		routes = append(routes, fmt.Sprintf("nats-route://127.0.0.1:%d", ports[n+i]))
	}
	for i := 0; i < n; i++ {
		nd := &node{name: "n" + strconv.Itoa(i), port: ports[i]}
		store := filepath.Join(dir, nd.name)
		var others []string
		for j, r := range routes {
			if j != i {
				others = append(others, strconv.Quote(r))
			}
		}
		conf := fmt.Sprintf(`server_name: %q
listen: "127.0.0.1:%d"
jetstream {
  store_dir: %q
  max_mem: 64MB
  max_file: 256MB
}
cluster {
  name: "pgs2test"
  listen: "127.0.0.1:%d"
  routes: [%s]
}
`, nd.name, nd.port, store, ports[n+i], strings.Join(others, ", "))
		nd.conf = filepath.Join(dir, nd.name+".conf")
		if err := os.WriteFile(nd.conf, []byte(conf), 0o644); err != nil {
			t.Fatal(err)
		}
		c.nodes = append(c.nodes, nd)
	}
	for i := range c.nodes {
		c.launch(t, i)
	}
	for i := range c.nodes {
		c.awaitClients(t, i)
	}
	return c
}

// freePorts returns n distinct free loopback ports (all listened on at
// once, then released).
func freePorts(t testing.TB, n int) []int {
	t.Helper()
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var ports []int
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports
}

// URLs is the nodes' client URLs, comma-separated.
func (c *Cluster) URLs() string {
	var us []string
	for _, nd := range c.nodes {
		us = append(us, nd.url())
	}
	return strings.Join(us, ",")
}

func (nd *node) url() string { return "nats://127.0.0.1:" + strconv.Itoa(nd.port) }

// Name is node i's server_name ("n<i>").
func (c *Cluster) Name(i int) string { return c.nodes[i].name }

// Connect connects to the cluster (all URLs) for the test: no reconnect
// buffer, so publishes fail while disconnected; reconnecting for ever.
// Closed at cleanup.
func (c *Cluster) Connect(t testing.TB) (*nats.Conn, jetstream.JetStream) {
	t.Helper()
	return connect(t, c.URLs(), nats.ReconnectWait(50*time.Millisecond))
}

func (c *Cluster) launch(t testing.TB, i int) {
	t.Helper()
	nd := c.nodes[i]
	nd.mu.Lock()
	defer nd.mu.Unlock()
	if nd.cmd != nil {
		t.Fatalf("nats-server %s is running already", nd.name)
	}
	fmt.Fprintf(&nd.out, "--- natstest: starting %s at %s ---\n", nd.name, time.Now().Format(time.StampMicro))
	cmd := exec.Command(c.bin, "-c", nd.conf)
	cmd.Stdout, cmd.Stderr = &nd.out, &nd.out
	if err := cmd.Start(); err != nil {
		t.Fatalf("start nats-server %s: %v", nd.name, err)
	}
	exitc := make(chan struct{})
	go func() {
		err := cmd.Wait()
		fmt.Fprintf(&nd.out, "--- natstest: %s exited: %v ---\n", nd.name, err)
		close(exitc)
	}()
	nd.cmd, nd.exitc = cmd, exitc
}

// awaitClients waits until node i accepts client connections.
func (c *Cluster) awaitClients(t testing.TB, i int) {
	t.Helper()
	nd := c.nodes[i]
	nd.mu.Lock()
	exitc := nd.exitc
	nd.mu.Unlock()
	deadline := time.Now().Add(30 * time.Second)
	for {
		nc, err := nats.Connect(nd.url(), nats.NoReconnect(), nats.Timeout(time.Second))
		if err == nil {
			nc.Close()
			return
		}
		select {
		case <-exitc:
			t.Fatalf("nats-server %s exited before it accepted clients:\n%s", nd.name, nd.out.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("nats-server %s accepts no clients after 30s: %v\n%s", nd.name, err, nd.out.String())
		}
	}
}

// Kill SIGKILLs node i and waits until it exited (nothing when it is not
// running).
func (c *Cluster) Kill(i int) {
	nd := c.nodes[i]
	nd.mu.Lock()
	defer nd.mu.Unlock()
	if nd.cmd == nil {
		return
	}
	_ = nd.cmd.Process.Signal(syscall.SIGKILL)
	<-nd.exitc
	nd.cmd, nd.exitc = nil, nil
}

// Start starts node i again, on its ports and store, and waits until it
// accepts clients (not until it caught up).
func (c *Cluster) Start(t testing.TB, i int) {
	t.Helper()
	c.launch(t, i)
	c.awaitClients(t, i)
}

// Logs is node i's output so far, over all its runs.
func (c *Cluster) Logs(i int) string { return c.nodes[i].out.String() }

// StreamLeader is the index of the node leading stream (as its info tells).
func (c *Cluster) StreamLeader(ctx context.Context, js jetstream.JetStream, stream string) (int, error) {
	s, err := js.Stream(ctx, stream)
	if err != nil {
		return -1, err
	}
	info := s.CachedInfo()
	if info.Cluster == nil || info.Cluster.Leader == "" {
		return -1, fmt.Errorf("stream %s has no leader", stream)
	}
	for i, nd := range c.nodes {
		if nd.name == info.Cluster.Leader {
			return i, nil
		}
	}
	return -1, fmt.Errorf("stream %s is led by %q, not a node of this cluster", stream, info.Cluster.Leader)
}

// WaitReady waits (up to 30s) until JetStream has a meta leader and a
// stream replicated on every node can be created (it is deleted again).
func (c *Cluster) WaitReady(t testing.TB) {
	t.Helper()
	nc, err := nats.Connect(c.URLs(), nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	const probe = "NATSTEST_READY"
	for {
		err = func() error {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			if _, err := js.AccountInfo(ctx); err != nil {
				return fmt.Errorf("account info: %w", err)
			}
			_, err := js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
				Name: probe, Subjects: []string{"natstest.ready"}, Storage: jetstream.MemoryStorage, Replicas: len(c.nodes)})
			if err != nil {
				return fmt.Errorf("create a stream: %w", err)
			}
			if err := js.DeleteStream(ctx, probe); err != nil && !errors.Is(err, jetstream.ErrStreamNotFound) {
				return fmt.Errorf("delete the stream: %w", err)
			}
			return nil
		}()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("JetStream cluster not ready after 30s: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
