package soak_test

import (
	"context"
	"fmt"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/change"
	"github.com/pgs2/pgs2/pkg/natstest"
	"github.com/pgs2/pgs2/pkg/pgtest"
	"github.com/pgs2/pgs2/pkg/proctest"
	"github.com/pgs2/pgs2/pkg/s2local"
)

// TestClusterSoak runs the pipeline on a 3-node JetStream cluster (every
// stream and bucket at replicas: 3; capture, router and two delivery
// processes given all three URLs) under a steady load, SIGKILLs the node
// leading PGS2_CHANGES and later brings it back, then does the same to the
// node leading PGS2_DELIVERY. Nothing supervises the services: each must
// ride through the elections by itself (one that exits fails the test).
// At the end S2 must hold every change exactly once in group order; the
// pause each loss caused is logged.
func TestClusterSoak(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a 3-node nats-server cluster, PostgreSQL and four service processes, and kills stream leaders")
	}
	seed := seedFromEnv(t, "")
	rng := newRand(seed, 3)
	began := time.Now()

	c := natstest.NewCluster(t, 3)
	pg := pgtest.New(t)
	pg.MustExec(t, "postgres", "CREATE DATABASE app")
	pg.MustExec(t, "app", schemaSQL)
	c.WaitReady(t)
	_, js := c.Connect(t)
	srv, err := s2local.New(s2local.Options{Basins: []string{soakBasin}, Logger: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(srv)
	t.Cleanup(func() { hs.Close(); srv.Close() })

	cfg := filepath.Join(t.TempDir(), "app.yaml")
	writeFile(t, cfg, configYAML(cfgParams{source: "app", dsn: pg.DSN("app"), slot: "pgs2_app", natsURL: c.URLs(), replicas: 3,
		endpoint: hs.URL, routing: routeFixed, retryIni: "50ms", retryMax: "1s"}))
	svcs := []*svc{
		{name: "capture", bin: proctest.Build(t, servicePath("capture")), cfg: cfg},
		{name: "router", bin: proctest.Build(t, servicePath("router")), cfg: cfg},
		{name: "delivery-1", bin: proctest.Build(t, servicePath("delivery")), cfg: cfg},
		{name: "delivery-2", bin: proctest.Build(t, servicePath("delivery")), cfg: cfg},
	}
	for _, s := range svcs {
		s.start(t)
	}
	t.Logf("set up in %s: 3 nats-server nodes (%s), PostgreSQL, s2local, %d service processes",
		time.Since(began).Round(time.Millisecond), c.URLs(), len(svcs))

	col := newCollector(hs.URL, soakBasin)
	col.run(100 * time.Millisecond)
	defer col.stopAndDrain()

	// A steady load: 60 steps/s of one transaction each (~350 changes/s),
	// until stopped.
	const rate = 60.0
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	wl := newWorkload(seed, rate, int(120*rate))
	wl.addSource(t, ctx, pg.DSN("app"), "app")
	if err := wl.load(ctx); err != nil {
		t.Fatal(err)
	}
	workStart := time.Now()
	go wl.run(ctx)
	// Progress of each stage: the last sequences of the two streams (as
	// their leaders tell, while there is one) and S2's record count.
	smp := &sampler{}
	go smp.run(ctx, js, col)

	alive := func() {
		checkAlive(t, svcs)
		select {
		case <-wl.done:
			if wl.err != nil {
				t.Fatalf("workload: %v", wl.err)
			}
		default:
		}
	}
	// waitSteps waits until the workload made n more steps.
	waitSteps := func(n int) {
		until := wl.step.Load() + int64(n)
		for wl.step.Load() < until {
			alive()
			time.Sleep(10 * time.Millisecond)
		}
	}
	type loss struct {
		stream          string
		node            int
		step            int
		killed, started time.Time
		caughtUp        time.Duration // from start until its replicas are current again
	}
	var losses []*loss
	kill := func(stream string) {
		l := &loss{stream: stream}
		deadline := time.Now().Add(30 * time.Second)
		for {
			lctx, lcancel := context.WithTimeout(ctx, 2*time.Second)
			node, err := c.StreamLeader(lctx, js, stream)
			lcancel()
			if err == nil {
				l.node = node
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("no leader of %s within 30s: %v", stream, err)
			}
			alive()
			time.Sleep(50 * time.Millisecond)
		}
		l.step, l.killed = int(wl.step.Load()), time.Now()
		c.Kill(l.node)
		t.Logf("t+%.1fs step %d: SIGKILLed %s, the leader of %s", l.killed.Sub(workStart).Seconds(), l.step, c.Name(l.node), stream)
		// Down for 3-5 s of load.
		waitSteps(int((3 + 2*rng.Float64()) * rate))
		l.started = time.Now()
		c.Start(t, l.node)
		waitCurrent(t, ctx, js, stream, alive)
		l.caughtUp = time.Since(l.started)
		t.Logf("t+%.1fs: started %s again; %s current on every replica %s later", l.started.Sub(workStart).Seconds(), c.Name(l.node),
			stream, l.caughtUp.Round(time.Millisecond))
		losses = append(losses, l)
	}

	waitSteps(int((3 + rng.Float64()) * rate)) // flowing
	kill("PGS2_CHANGES")
	waitSteps(int((3 + rng.Float64()) * rate))
	kill("PGS2_DELIVERY")
	waitSteps(int(3 * rate))
	wl.stop.Store(true)
	<-wl.done
	if wl.err != nil {
		t.Fatalf("workload: %v", wl.err)
	}
	workEnd := time.Now()
	t.Logf("workload done after %s: %d changes in %d steps; waiting for S2", workEnd.Sub(workStart).Round(time.Millisecond),
		wl.nchanges.Load(), wl.step.Load())

	changes := wl.snapshot()
	x := expect(changes, nil)
	deadline := time.Now().Add(90 * time.Second)
	for {
		alive()
		miss := x.missing(col.snapshot())
		if len(miss) == 0 {
			break
		}
		if time.Now().After(deadline) {
			var first []string
			for i, e := range miss {
				if i == 20 {
					break
				}
				first = append(first, e.String())
			}
			t.Fatalf("%d of %d changes are not in S2 %s after the workload ended; first: %s; S2 read errors %v",
				len(miss), x.total, time.Since(workEnd).Round(time.Second), strings.Join(first, ", "), col.readErr)
		}
		time.Sleep(250 * time.Millisecond)
	}
	caughtUp := time.Now()
	// A late duplicate would show within this.
	for last, quiet := col.count(), time.Now(); time.Since(quiet) < 2*time.Second; {
		time.Sleep(200 * time.Millisecond)
		if n := col.count(); n != last {
			last, quiet = n, time.Now()
		}
	}
	col.stopAndDrain()
	got := col.snapshot()
	problems, dups, missing, extra := verify(x, got, nil)
	for _, b := range col.bad {
		problems = append(problems, "unreadable record: "+b)
	}

	l := lags(changes, got, nil)
	t.Logf("%d changes committed, %d S2 records in %d streams; commit → S2 lag p50 %s, p99 %s, max %s; caught up %s after the workload ended",
		len(changes), len(got), len(col.next), percentile(l, 50).Round(time.Millisecond), percentile(l, 99).Round(time.Millisecond),
		percentile(l, 100).Round(time.Millisecond), caughtUp.Sub(workEnd).Round(time.Millisecond))
	t.Logf("longest lag by commit time (2s periods): %s", timeline(l, workStart, 2*time.Second))
	for i, ls := range losses {
		from, to := ls.killed, ls.killed.Add(30*time.Second)
		if workEnd.Before(to) {
			to = workEnd
		}
		t.Logf("leader loss %d: longest stall of each stage from the kill until 30s later or the end of the load: capture (PGS2_CHANGES grows) %s, router (PGS2_DELIVERY grows) %s, delivery (S2 grows) %s",
			i+1, smp.stall(from, to, 0).Round(time.Millisecond), smp.stall(from, to, 1).Round(time.Millisecond), smp.stall(from, to, 2).Round(time.Millisecond))
		to = ls.started.Add(ls.caughtUp + 2*time.Second)
		lag, n := maxLag(l, ls.killed.Add(-time.Second), to)
		all, _ := longestGap(merge(got), ls.killed, to)
		one, stream := longestGap(got, ls.killed, to)
		t.Logf("leader loss %d (%s of %s, at step %d, down %s): longest commit → S2 lag of the %d changes committed from 1s before the kill until 2s after it was current again: %s; longest time no S2 stream got a record: %s; longest silence of one stream: %s (%s)",
			i+1, c.Name(ls.node), ls.stream, ls.step, ls.started.Sub(ls.killed).Round(time.Millisecond), n, lag.Round(time.Millisecond),
			all.Round(time.Millisecond), one.Round(time.Millisecond), stream)
	}
	if len(col.readErr) > 0 {
		t.Logf("S2 read errors while polling (retried): %v", col.readErr)
	}
	for i := 0; i < 3; i++ {
		logs := c.Logs(i)
		for _, bad := range []string{"critical write error", "NO quorum, stalled"} {
			if strings.Contains(logs, bad) {
				problems = append(problems, fmt.Sprintf("nats-server %s logged %q", c.Name(i), bad))
			}
		}
	}
	t.Logf("verified %d changes from S2: %d duplicates, %d missing, %d unexpected; %d problems; run took %s",
		x.total, dups, missing, extra, len(problems), time.Since(began).Round(time.Millisecond))
	if len(problems) > 0 {
		if len(problems) > 60 {
			problems = append(problems[:60], fmt.Sprintf("… and %d more", len(problems)-60))
		}
		t.Errorf("seed %d: S2 does not hold exactly the committed changes in group order:\n  %s", seed, strings.Join(problems, "\n  "))
		t.Logf("what the JetStream streams hold (diagnostics):\n  %s", stageReport(js, []string{"PGS2_CHANGES", "PGS2_DELIVERY"}))
	}
	for _, s := range svcs {
		t.Logf("%s: %s", s.name, s.logSummary())
		if os.Getenv("PGS2_SOAK_DUMP") != "" {
			t.Logf("%s output:\n%s", s.name, s.proc.Output())
		}
	}
	for _, s := range svcs {
		s.proc.Term(t)
	}
}

// sampler records every 200ms how far each stage got.
type sampler struct {
	mu      sync.Mutex
	samples []progress
}

type progress struct {
	at time.Time
	n  [3]uint64 // PGS2_CHANGES and PGS2_DELIVERY last sequences, S2 records; 0: unknown
}

func (s *sampler) run(ctx context.Context, js jetstream.JetStream, col *collector) {
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	for {
		var p progress
		p.at = time.Now()
		for i, name := range []string{"PGS2_CHANGES", "PGS2_DELIVERY"} {
			ictx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
			st, err := js.Stream(ictx, name)
			if err == nil {
				var info *jetstream.StreamInfo
				if info, err = st.Info(ictx); err == nil {
					p.n[i] = info.State.LastSeq
				}
			}
			cancel()
		}
		p.n[2] = uint64(col.count())
		s.mu.Lock()
		s.samples = append(s.samples, p)
		s.mu.Unlock()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// stall is the longest time in [from, to) stage i did not advance.
func (s *sampler) stall(from, to time.Time, i int) time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	var best uint64
	last := from
	var m time.Duration
	for _, p := range s.samples {
		if p.at.Before(from) {
			best = max(best, p.n[i])
			continue
		}
		if !p.at.Before(to) {
			break
		}
		if p.n[i] > best {
			m = max(m, p.at.Sub(last))
			best, last = p.n[i], p.at
		}
	}
	end := to
	if l := s.samples[len(s.samples)-1].at; l.Before(end) {
		end = l
	}
	return max(m, end.Sub(last))
}

// merge gives every record one stream name, for the silence of S2 as a
// whole.
func merge(got []obs) []obs {
	out := make([]obs, len(got))
	for i, o := range got {
		o.stream = "any"
		out[i] = o
	}
	return out
}

// waitCurrent waits (up to 60s) until stream has a leader and both other
// replicas are current.
func waitCurrent(t *testing.T, ctx context.Context, js jetstream.JetStream, stream string, alive func()) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	var why string
	for {
		alive()
		ictx, cancel := context.WithTimeout(ctx, time.Second)
		s, err := js.Stream(ictx, stream)
		var info *jetstream.StreamInfo
		if err == nil {
			info, err = s.Info(ictx)
		}
		cancel()
		switch {
		case err != nil:
			why = err.Error()
		case info.Cluster == nil || info.Cluster.Leader == "":
			why = "no leader"
		case len(info.Cluster.Replicas) != 2:
			why = fmt.Sprintf("%d replicas besides the leader, want 2", len(info.Cluster.Replicas))
		default:
			why = ""
			for _, r := range info.Cluster.Replicas {
				if !r.Current || r.Offline {
					why += fmt.Sprintf("%s current=%v offline=%v lag=%d; ", r.Name, r.Current, r.Offline, r.Lag)
				}
			}
			if why == "" {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not current on every replica within 60s: %s", stream, why)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestClusterResumeReadsTheLastMessage checks, on a 3-node cluster, that
// bus.ResumeChanges (capture's resume) reads the stream's last message:
// the message it takes the resume point from must be the one at the
// LastSeq it chains on. It reads LastSeq from the stream leader
// (STREAM.INFO) but the last message with GetLastMsgForSubject, which
// nats.go sends as a direct get when the stream has AllowDirect (as
// PGS2_CHANGES and PGS2_DELIVERY do), and any replica answers a direct
// get, a lagging one with an older message. Capture would then skip only
// the changes through that older message and publish the ones after it
// again, chained on the newer LastSeq, so JetStream accepts them: every
// change in between is stored twice and delivered twice. The router's
// lastOutput reads its resume point the same way. Here a follower is
// paused (SIGSTOP, as a long GC pause or a starved VM would) while the
// stream grows, and resumed; resumes through a connection to it follow.
// TestClusterSoak met the consequence (seed 1796281201853147881: 1863
// changes twice in S2, in one contiguous block per stream).
func TestClusterResumeReadsTheLastMessage(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a 3-node nats-server cluster")
	}
	c := natstest.NewCluster(t, 3)
	c.WaitReady(t)
	_, js := c.Connect(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cfg := bus.ChangesStreamConfig{Name: "PGS2_CHANGES", Source: "app", Replicas: 3, DuplicateWindow: time.Minute}
	var err error
	for _, err = bus.EnsureChangesStream(ctx, js, cfg); err != nil; _, err = bus.EnsureChangesStream(ctx, js, cfg) {
		if ctx.Err() != nil {
			t.Fatalf("create the stream: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	leader, err := c.StreamLeader(ctx, js, cfg.Name)
	if err != nil {
		t.Fatal(err)
	}
	urls := strings.Split(c.URLs(), ",")
	connect := func(i int) (*nats.Conn, jetstream.JetStream) {
		nc, err := nats.Connect(urls[i])
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(nc.Close)
		njs, err := jetstream.New(nc)
		if err != nil {
			t.Fatal(err)
		}
		return nc, njs
	}
	// Capture's way of publishing: chained batches, one change each, a
	// round of one message each, through the leader's node (so a paused
	// follower never holds the publisher up).
	lnc, _ := connect(leader)
	pub, err := bus.NewPublisher(lnc, 0, 0, bus.PublisherOptions{})
	if err != nil {
		t.Fatal(err)
	}
	key := func(i int) string { return change.Position{LSN: uint64(i + 1)}.Key() }
	seqOf := map[string]int{}
	next := 0
	publish := func(n int) {
		for k := 0; k < n; k++ {
			id := key(next)
			var b bus.BatchBuilder
			b.Add(&bus.Entry{Key: []byte(id), Group: []byte(`["1"]`), Action: []byte("insert"), Table: []byte("public.items"), Schema: []byte("public"), CommitMs: -1, Body: make([]byte, 300)})
			pub.SetHeader(bus.HeaderRound, "1/1")
			pub.SetHeader(bus.HeaderRoundFirst, id)
			pub.SetHeader(bus.HeaderRoundLast, id)
			if err := pub.Publish(ctx, "pgs2.changes.app."+strconv.Itoa(next%8), id, b.Bytes()); err != nil {
				t.Fatal(err)
			}
			next++
			seqOf[id] = next
		}
		for pub.InFlight() > 0 {
			if err := pub.Err(); err != nil {
				t.Fatal(err)
			}
			time.Sleep(time.Millisecond)
		}
	}
	publish(50000)
	var bad []string
	for round := 0; round < 12; round++ {
		if l, err := c.StreamLeader(ctx, js, cfg.Name); err != nil || l != leader {
			t.Fatalf("the leader of %s moved (%v, %v): pausing a follower should not move it", cfg.Name, l, err)
		}
		f := (leader + 1 + round%2) % 3
		_, fs := connect(f)
		pid := nodePid(t, c, f)
		if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		n := []int{5000, 20000}[round%2]
		publish(n)
		if err := syscall.Kill(pid, syscall.SIGCONT); err != nil {
			t.Fatal(err)
		}
		stale := 0
		for k := 0; k < 100; k++ {
			r, err := bus.ResumeChanges(ctx, fs, cfg.Name, "app")
			if err != nil {
				continue
			}
			if got := seqOf[r.LastID]; got < int(r.LastSeq) {
				if stale == 0 {
					bad = append(bad, fmt.Sprintf("after %s was paused for %d messages: ResumeChanges chains on LastSeq %d but resumes after message %d (Through %s): capture would publish the changes of %d stored messages again",
						c.Name(f), n, r.LastSeq, got, r.Through, int(r.LastSeq)-got))
				}
				stale++
			}
		}
		if stale > 0 {
			bad[len(bad)-1] += fmt.Sprintf(" (%d of 100 resumes right after it went on)", stale)
		}
	}
	if len(bad) > 0 {
		t.Errorf("bus.ResumeChanges takes its resume point from an older message than the LastSeq it chains on (a direct get answered by a lagging replica):\n  %s",
			strings.Join(bad, "\n  "))
	}
}

// nodePid is the process id of node i's latest run, from its log lines
// ("[pid] date time [INF] …").
func nodePid(t *testing.T, c *natstest.Cluster, i int) int {
	t.Helper()
	m := regexp.MustCompile(`(?m)^\[(\d+)\] \d{4}/`).FindAllStringSubmatch(c.Logs(i), -1)
	if len(m) == 0 {
		t.Fatalf("no process id in the log of %s", c.Name(i))
	}
	pid, _ := strconv.Atoi(m[len(m)-1][1])
	return pid
}
