package soak_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/pgs2/pgs2/pkg/ctl"
	"github.com/pgs2/pgs2/pkg/natstest"
	"github.com/pgs2/pgs2/pkg/pgtest"
	"github.com/pgs2/pgs2/pkg/proctest"
	"github.com/pgs2/pgs2/pkg/s2local"
)

// TestSoak runs the whole pipeline with two sources for PGS2_SOAK (a Go
// duration, default 60s) under a seeded schedule of faults, then checks
// from S2 alone that every committed change is there exactly once, in
// commit order per group, except the ones the operator acknowledged.
//
// Set-up: one PostgreSQL with databases app and shop (each a source with
// its own changes and delivery stream), an embedded JetStream, s2local
// over HTTP in this process, and as processes: per source a capture and
// a router, plus two delivery processes serving both sources. Every
// source writes into one sink routed over three S2 streams by key.
//
// Faults, placed by the workload's step count: SIGKILL and restart of
// every service process; restarts of the NATS server; S2 storms (20-40 %
// of appends fail with 503, 429 or 504, the 504 after the append took
// effect); the routing function broken for a while (poisoned changes
// park their group in PGS2_PARKED until it is fixed and reloaded with
// SIGHUP, then the parks drain); and updates larger than S2 takes, which
// park their group until the test, as an operator, acknowledges them with
// pgs2ctl (those changes are then expected to be missing, exactly those).
func TestSoak(t *testing.T) {
	if testing.Short() {
		t.Skip("soak test: PostgreSQL, JetStream, s2local and six service processes under faults")
	}
	dur := 60 * time.Second
	if s := os.Getenv("PGS2_SOAK"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d <= 0 {
			t.Fatalf("PGS2_SOAK=%q: want a Go duration such as 5m", s)
		}
		dur = d
	}
	seed := seedFromEnv(t, "PGS2_SOAK="+dur.String()+" ")
	began := time.Now()
	const rate = 40.0 // workload steps per second: a transaction per source each
	steps := int(dur.Seconds() * rate)

	r := &soakRun{t: t, acked: map[string]bool{}, reported: map[string]bool{}}
	pg := pgtest.New(t)
	sources := []string{"app", "shop"}
	for _, db := range sources {
		pg.MustExec(t, "postgres", "CREATE DATABASE "+db)
		pg.MustExec(t, db, schemaSQL)
	}
	r.ns = natstest.New(t)
	var err error
	r.s2, err = s2local.New(s2local.Options{DataDir: filepath.Join(t.TempDir(), "s2"), Basins: []string{soakBasin}, Logger: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(r.s2)
	t.Cleanup(func() { hs.Close(); r.s2.Close() })

	dir := t.TempDir()
	r.writeConfigs = func(routing string) {
		for _, src := range sources {
			writeFile(t, filepath.Join(dir, src+".yaml"), configYAML(cfgParams{source: src, dsn: pg.DSN(src), slot: "pgs2_" + src,
				changes: "PGS2_CHANGES_" + strings.ToUpper(src), delivery: "PGS2_DELIVERY_" + strings.ToUpper(src),
				natsURL: r.ns.URL(), replicas: 1, endpoint: hs.URL, routing: routing, retryIni: "50ms", retryMax: "1s"}))
		}
		// Delivery serves every source's delivery stream; it needs the
		// sinks, the NATS URL and a valid source section (app's).
		b, err := os.ReadFile(filepath.Join(dir, "app.yaml"))
		if err != nil {
			t.Fatal(err)
		}
		writeFile(t, filepath.Join(dir, "delivery.yaml"), string(b))
	}
	r.writeConfigs(routeFixed)

	capture, router, delivery := proctest.Build(t, servicePath("capture")), proctest.Build(t, servicePath("router")), proctest.Build(t, servicePath("delivery"))
	for _, src := range sources {
		r.svcs = append(r.svcs, &svc{name: "capture-" + src, bin: capture, cfg: filepath.Join(dir, src+".yaml")})
	}
	for _, src := range sources {
		r.svcs = append(r.svcs, &svc{name: "router-" + src, bin: router, cfg: filepath.Join(dir, src+".yaml")})
	}
	for i := 1; i <= 2; i++ {
		r.svcs = append(r.svcs, &svc{name: fmt.Sprintf("delivery-%d", i), bin: delivery, cfg: filepath.Join(dir, "delivery.yaml")})
	}
	for _, s := range r.svcs {
		s.start(t)
	}
	t.Logf("set up in %s: PostgreSQL (databases %v), JetStream at %s, s2local at %s, %d service processes",
		time.Since(began).Round(time.Millisecond), sources, r.ns.URL(), hs.URL, len(r.svcs))

	r.col = newCollector(hs.URL, soakBasin)
	r.col.run(200 * time.Millisecond)
	defer r.col.stopAndDrain()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r.wl = newWorkload(seed, rate, steps)
	for _, src := range sources {
		r.wl.addSource(t, ctx, pg.DSN(src), src)
	}
	var sched []fault
	sched, r.wl.bigAt, r.wl.poison = makeSchedule(newRand(seed, 2), steps, rate, r.svcs, len(sources))
	var plan []string
	for _, f := range sched {
		plan = append(plan, fmt.Sprintf("%d:%s", f.step, f.describe(r.svcs)))
	}
	var bigs []string
	for step, src := range r.wl.bigAt {
		bigs = append(bigs, fmt.Sprintf("%d:%s", step, sources[src]))
	}
	sort.Strings(bigs)
	t.Logf("workload: %d steps at %.0f/s (%s); faults at steps: %s; updates too large for S2 at steps: %s; poison windows %v",
		steps, rate, dur, strings.Join(plan, ", "), strings.Join(bigs, ", "), r.wl.poison)
	if err := r.wl.load(ctx); err != nil {
		t.Fatalf("initial rows: %v", err)
	}
	workStart := time.Now()
	go r.wl.run(ctx)

	// The schedule.
	for _, f := range sched {
		r.waitStep(f.step)
		r.do(f)
	}
	for !r.workloadDone() {
		checkAlive(t, r.svcs)
		time.Sleep(10 * time.Millisecond)
	}
	if r.wl.err != nil {
		t.Fatalf("workload: %v", r.wl.err)
	}
	workEnd := time.Now()
	// Faults off, functions fixed, every service running.
	r.do(fault{kind: fCalm, final: true})
	if r.broken {
		r.do(fault{kind: fFix, final: true})
	}
	for i, s := range r.svcs {
		if !s.up() {
			r.do(fault{kind: fStart, svc: i, final: true})
		}
	}
	t.Logf("workload done after %s: %d changes in %d steps; waiting for S2", workEnd.Sub(workStart).Round(time.Millisecond),
		r.wl.nchanges.Load(), steps)

	// Wait for every change (the acknowledged ones aside).
	deadline := time.Now().Add(max(4*time.Minute, dur))
	for {
		checkAlive(t, r.svcs)
		r.ackTooLarge()
		x := expect(r.wl.snapshot(), r.acked)
		miss := x.missing(r.col.snapshot())
		if len(miss) == 0 && len(r.acked) >= r.wl.bigCount() {
			break
		}
		if time.Now().After(deadline) {
			r.failMissing(x, miss, time.Since(workEnd))
		}
		time.Sleep(time.Second)
	}
	caughtUp := time.Now()
	// Settle: nothing parked or blocked, no new records for 2s (a late
	// duplicate would show).
	r.settle(60 * time.Second)
	r.col.stopAndDrain()

	// Verify from S2 only.
	changes := r.wl.snapshot()
	got := r.col.snapshot()
	x := expect(changes, r.acked)
	problems, dups, missing, extra := verify(x, got, r.acked)
	bad := r.col.bad
	for _, b := range bad {
		problems = append(problems, "unreadable record: "+b)
	}
	bigAll := 0
	for _, c := range changes {
		if c.big {
			bigAll++
			if !r.acked[c.ev.id()] {
				problems = append(problems, fmt.Sprintf("%s: too large for S2, never parked and acknowledged", c.ev))
			}
		}
	}
	if len(r.acked) != bigAll {
		problems = append(problems, fmt.Sprintf("acknowledged %d changes, the workload made %d too large", len(r.acked), bigAll))
	}
	if n, err := r.auditCount(); err != nil {
		problems = append(problems, "read the audit records: "+err.Error())
	} else if n != len(r.acked) {
		problems = append(problems, fmt.Sprintf("PGS2_AUDIT holds %d acknowledgements, the test made %d", n, len(r.acked)))
	}
	if r.wl.poisoned.Load() >= 10 && r.functionParks == 0 {
		problems = append(problems, fmt.Sprintf("%d poisoned changes were committed while the routing function was broken, yet no group was ever seen parked by it: the test did not exercise parks", r.wl.poisoned.Load()))
	}

	// Report.
	skip := r.wl.parkedGroups()
	l := lags(changes, got, skip)
	var perApp, perShop int
	for _, c := range changes {
		if c.ev.db == "app" {
			perApp++
		} else {
			perShop++
		}
	}
	t.Logf("%d changes committed (app %d, shop %d), %d S2 records in %d streams; %d too large for S2 acknowledged; %d poisoned changes (function-failure parks seen: %d heads at most at once)",
		len(changes), perApp, perShop, len(got), len(r.col.next), len(r.acked), r.wl.poisoned.Load(), r.functionParks)
	t.Logf("commit → S2 lag (%d groups parked on purpose left out): p50 %s, p99 %s, max %s; caught up %s after the workload ended",
		len(skip), percentile(l, 50).Round(time.Millisecond), percentile(l, 99).Round(time.Millisecond), percentile(l, 100).Round(time.Millisecond),
		caughtUp.Sub(workEnd).Round(time.Millisecond))
	t.Logf("longest lag by commit time (2s periods): %s", timeline(l, workStart, 2*time.Second))
	t.Logf("per fault: how long the action took, and the pause it caused: the longest commit → S2 lag of the changes committed in the 2s after it (later faults' effects overlap):")
	byKind := map[string][]time.Duration{}
	for _, f := range r.done {
		lag, n := maxLag(l, f.at, f.at.Add(2*time.Second))
		t.Logf("  t+%6.1fs step %5d  %-30s took %-6s  lag %-7s (%d changes)",
			f.at.Sub(workStart).Seconds(), f.step, f.what, f.took.Round(time.Millisecond), lag.Round(time.Millisecond), n)
		byKind[f.kind] = append(byKind[f.kind], lag)
	}
	var kinds []string
	for k, lags := range byKind {
		sort.Slice(lags, func(i, j int) bool { return lags[i] < lags[j] })
		kinds = append(kinds, fmt.Sprintf("%s ×%d: median %s, max %s", k, len(lags), lags[len(lags)/2].Round(10*time.Millisecond), lags[len(lags)-1].Round(10*time.Millisecond)))
	}
	sort.Strings(kinds)
	t.Logf("pause by fault (lag of the changes committed in the 2s after it): %s", strings.Join(kinds, "; "))
	if len(r.col.readErr) > 0 {
		t.Logf("S2 read errors while polling (retried): %v", r.col.readErr)
	}
	t.Logf("verified %d expected changes from S2: %d duplicates, %d missing, %d unexpected; %d problems; run took %s",
		x.total, dups, missing, extra, len(problems), time.Since(began).Round(time.Millisecond))
	if len(problems) > 0 {
		if len(problems) > 60 {
			problems = append(problems[:60], fmt.Sprintf("… and %d more", len(problems)-60))
		}
		t.Errorf("seed %d: S2 does not hold exactly the committed changes in group order:\n  %s", seed, strings.Join(problems, "\n  "))
		_, js := r.ns.Connect(t)
		var streams []string
		for _, src := range sources {
			streams = append(streams, "PGS2_CHANGES_"+strings.ToUpper(src), "PGS2_DELIVERY_"+strings.ToUpper(src))
		}
		t.Logf("what the JetStream streams hold (diagnostics):\n  %s", stageReport(js, streams))
	}

	for _, s := range r.svcs {
		t.Logf("%s (%d runs): %s", s.name, s.runs, s.logSummary())
	}
	// Clean shutdown of every service (exit 0 on SIGTERM).
	for _, s := range r.svcs {
		if s.up() {
			s.proc.Term(t)
		}
	}
}

// soakRun is TestSoak's state.
type soakRun struct {
	t            *testing.T
	ns           *natstest.Server
	s2           *s2local.Server
	svcs         []*svc
	col          *collector
	wl           *workload
	writeConfigs func(routing string)

	broken        bool
	acked         map[string]bool // event ids acknowledged (dropped) through pgs2ctl
	reported      map[string]bool
	functionParks int // most function-failure park heads seen at once
	done          []doneFault
}

type doneFault struct {
	step int
	at   time.Time
	what string
	kind string // what without its target's instance: "kill delivery"
	took time.Duration
}

type faultKind int

const (
	fKill faultKind = iota
	fStart
	fNATS
	fStorm
	fCalm
	fBreak
	fFix
	fAck
)

// fault is one step of the schedule.
type fault struct {
	step int
	kind faultKind
	svc  int     // fKill, fStart
	rate float64 // fStorm
	seed uint64  // fStorm
	// final: the clean-up after the schedule (not reported as a fault)
	final bool
}

func (f fault) describe(svcs []*svc) string {
	switch f.kind {
	case fKill:
		return "kill " + svcs[f.svc].name
	case fStart:
		return "start " + svcs[f.svc].name
	case fNATS:
		return "restart NATS"
	case fStorm:
		return fmt.Sprintf("S2 storm %.0f%%", 100*f.rate)
	case fCalm:
		return "S2 calm"
	case fBreak:
		return "break routing"
	case fFix:
		return "fix routing"
	case fAck:
		return "ack too large"
	}
	return "?"
}

// makeSchedule draws the faults from rng: after a warm-up of 5 % of the
// steps and until 90 %, one every ~3 s of steps (at least 14), covering
// a kill of every service, a NATS restart, an S2 storm, a broken routing
// window and an update too large for S2 per source; the rest drawn. A
// killed service starts again 0-1.5 s later; storms last 2-5 s, broken
// routing 3-8 s (the workload poisons items then); an acknowledgement
// round follows each large update 2-6 s later.
func makeSchedule(rng *rand.Rand, steps int, rate float64, svcs []*svc, nsrc int) ([]fault, map[int]int, []window) {
	warm, end := steps/20, steps*9/10
	k := max(14, int(float64(end-warm)/(3*rate)))
	slot := max(1, (end-warm)/k)
	type want struct {
		kind faultKind
		svc  int // -1: any
		src  int // for a large update
		big  bool
	}
	var kinds []want
	for i := range svcs {
		kinds = append(kinds, want{kind: fKill, svc: i})
	}
	kinds = append(kinds, want{kind: fNATS}, want{kind: fStorm}, want{kind: fBreak})
	for s := 0; s < nsrc; s++ {
		kinds = append(kinds, want{big: true, src: s})
	}
	for len(kinds) < k {
		switch r := rng.IntN(100); {
		case r < 50:
			kinds = append(kinds, want{kind: fKill, svc: -1})
		case r < 65:
			kinds = append(kinds, want{kind: fStorm})
		case r < 75:
			kinds = append(kinds, want{kind: fNATS})
		case r < 87:
			kinds = append(kinds, want{kind: fBreak})
		default:
			kinds = append(kinds, want{big: true, src: rng.IntN(nsrc)})
		}
	}
	rng.Shuffle(len(kinds), func(i, j int) { kinds[i], kinds[j] = kinds[j], kinds[i] })
	var out []fault
	bigAt := map[int]int{}
	var poison []window
	down := make([]int, len(svcs)) // step until which each is down
	stormUntil, brokenUntil := 0, 0
	clamp := func(s int) int { return min(s, steps-1) }
	for i, w := range kinds {
		pos := warm + i*slot + rng.IntN(max(1, slot/2))
		if w.kind == fStorm && pos < stormUntil || w.kind == fBreak && pos < brokenUntil {
			w = want{kind: fKill, svc: -1}
		}
		switch {
		case w.big:
			for _, taken := bigAt[pos]; taken; _, taken = bigAt[pos] {
				pos++
			}
			bigAt[pos] = w.src
			out = append(out, fault{step: clamp(pos + int((2+4*rng.Float64())*rate)), kind: fAck})
		case w.kind == fKill:
			s := w.svc
			if s < 0 || down[s] >= pos {
				var free []int
				for j := range svcs {
					if down[j] < pos {
						free = append(free, j)
					}
				}
				s = free[rng.IntN(len(free))]
			}
			d := rng.IntN(int(1.5 * rate))
			out = append(out, fault{step: pos, kind: fKill, svc: s}, fault{step: clamp(pos + d), kind: fStart, svc: s})
			down[s] = pos + d
		case w.kind == fNATS:
			out = append(out, fault{step: pos, kind: fNATS})
		case w.kind == fStorm:
			n := int((2 + 3*rng.Float64()) * rate)
			out = append(out, fault{step: pos, kind: fStorm, rate: 0.2 + 0.2*rng.Float64(), seed: rng.Uint64()},
				fault{step: clamp(pos + n), kind: fCalm})
			stormUntil = pos + n
		case w.kind == fBreak:
			n := int((3 + 5*rng.Float64()) * rate)
			out = append(out, fault{step: pos, kind: fBreak}, fault{step: clamp(pos + n), kind: fFix})
			poison = append(poison, window{pos, pos + n})
			brokenUntil = pos + n
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].step < out[j].step })
	return out, bigAt, poison
}

func (r *soakRun) workloadDone() bool {
	select {
	case <-r.wl.done:
		return true
	default:
		return false
	}
}

// waitStep waits until the workload reached step (or ended), watching the
// services.
func (r *soakRun) waitStep(step int) {
	for r.wl.step.Load() < int64(step) && !r.workloadDone() {
		checkAlive(r.t, r.svcs)
		time.Sleep(10 * time.Millisecond)
	}
	if r.workloadDone() && r.wl.err != nil {
		r.t.Fatalf("workload: %v", r.wl.err)
	}
}

func (r *soakRun) do(f fault) {
	t := r.t
	t.Helper()
	at := time.Now()
	what := f.describe(r.svcs)
	switch f.kind {
	case fKill:
		if !r.svcs[f.svc].up() {
			return
		}
		r.svcs[f.svc].kill()
	case fStart:
		if r.svcs[f.svc].up() {
			return
		}
		r.svcs[f.svc].start(t)
	case fNATS:
		r.ns.Restart(t)
	case fStorm:
		seed := f.seed
		if err := r.s2.SetFaults(s2local.FaultConfig{Seed: &seed, Rules: []s2local.FaultRule{{AppendsOnly: true,
			ErrorRate: f.rate, Statuses: []int{503, 429, 504}}}}); err != nil {
			t.Fatal(err)
		}
	case fCalm:
		if err := r.s2.SetFaults(s2local.FaultConfig{}); err != nil {
			t.Fatal(err)
		}
	case fBreak:
		r.writeConfigs(routeBroken)
		r.hupAll()
		r.broken = true
	case fFix:
		heads := r.countParks("division by zero")
		r.functionParks = max(r.functionParks, heads)
		what = fmt.Sprintf("fix routing (%d parked heads)", heads)
		r.writeConfigs(routeFixed)
		r.hupAll()
		r.broken = false
	case fAck:
		what = fmt.Sprintf("ack too large (%d)", r.ackTooLarge())
	}
	if !f.final {
		kind := what
		if i := strings.IndexAny(kind, "(%"); i > 0 {
			kind = strings.TrimSpace(kind[:i])
		}
		for _, suffix := range []string{"-app", "-shop", "-1", "-2"} {
			kind = strings.TrimSuffix(kind, suffix)
		}
		if strings.HasPrefix(kind, "S2 storm") {
			kind = "S2 storm"
		}
		r.done = append(r.done, doneFault{step: f.step, at: at, what: what, kind: kind, took: time.Since(at)})
	}
}

// hupAll makes the routers and deliveries reload their functions
// (routers first, so no new change fails once deliveries are fixed).
func (r *soakRun) hupAll() {
	for _, s := range r.svcs {
		if strings.HasPrefix(s.name, "router-") {
			s.hup()
		}
	}
	for _, s := range r.svcs {
		if strings.HasPrefix(s.name, "delivery-") {
			s.hup()
		}
	}
}

// adminAddr is a running delivery process's admin API (any serves it).
func (r *soakRun) adminAddr() string {
	for _, s := range r.svcs {
		if strings.HasPrefix(s.name, "delivery-") && s.up() {
			return s.proc.Addr
		}
	}
	return ""
}

// failedMsg is the admin API's FailedMessage (protojson).
type failedMsg struct {
	ID        string `json:"id"`
	Sink      string `json:"sink"`
	Basin     string `json:"basin"`
	Stream    string `json:"stream"`
	Table     string `json:"table"`
	Group     string `json:"group"`
	BlockedBy string `json:"blocked_by"`
	Payload   []byte `json:"payload"`
	LastError struct {
		HTTPStatus int    `json:"http_status"`
		Code       string `json:"code"`
		Message    string `json:"message"`
	} `json:"last_error"`
}

func adminGet(ctx context.Context, addr, path string, v any) error {
	req, err := http.NewRequestWithContext(ctx, "GET", "http://"+addr+path, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		return fmt.Errorf("GET %s: %s: %s", path, resp.Status, bytes.TrimSpace(b))
	}
	return json.Unmarshal(b, v)
}

// adminList lists every failed message (parks and blocked streams), all
// pages.
func adminList(ctx context.Context, addr string) ([]failedMsg, error) {
	var out []failedMsg
	token := ""
	for {
		var resp struct {
			Messages []failedMsg `json:"messages"`
			Next     string      `json:"next_page_token"`
		}
		q := url.Values{"page_size": {"1000"}}
		if token != "" {
			q.Set("page_token", token)
		}
		if err := adminGet(ctx, addr, "/v1/sinks/-/messages?"+q.Encode(), &resp); err != nil {
			return nil, err
		}
		out = append(out, resp.Messages...)
		if resp.Next == "" {
			return out, nil
		}
		token = resp.Next
	}
}

// countParks counts the parked heads whose error contains reason.
func (r *soakRun) countParks(reason string) int {
	addr := r.adminAddr()
	if addr == "" {
		return 0
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	msgs, err := adminList(ctx, addr)
	if err != nil {
		r.t.Logf("list parked messages: %v", err)
		return 0
	}
	n := 0
	for _, m := range msgs {
		if m.BlockedBy == "" && strings.Contains(m.LastError.Message, reason) {
			n++
		}
	}
	return n
}

// ackTooLarge acknowledges, as an operator with pgs2ctl, every parked
// head that is too large for S2, after checking (from its payload) that
// it is one of the changes the workload made too large. It returns how
// many it acknowledged.
func (r *soakRun) ackTooLarge() int {
	t := r.t
	addr := r.adminAddr()
	if addr == "" {
		return 0
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	msgs, err := adminList(ctx, addr)
	if err != nil {
		t.Logf("list parked messages: %v", err)
		return 0
	}
	n := 0
	for _, m := range msgs {
		if m.BlockedBy != "" || !strings.Contains(m.LastError.Message, "1 MiB") {
			continue
		}
		var full failedMsg
		if err := adminGet(ctx, addr, "/v1/sinks/-/messages/"+url.PathEscape(m.ID), &full); err != nil {
			t.Logf("show parked message %s: %v", m.ID, err)
			continue
		}
		ev, err := parseEvent(full.Payload)
		if err != nil {
			r.once(fmt.Sprintf("parked message %s (%s): payload is not a change: %v", m.ID, m.LastError.Message, err))
			continue
		}
		if !r.wl.isBig(ev) {
			r.once(fmt.Sprintf("%s parked as too large for S2 (%s), but the workload did not make it large", ev, m.LastError.Message))
			continue
		}
		if r.acked[ev.id()] {
			r.once(fmt.Sprintf("%s parked again after it was acknowledged (park message %s)", ev, m.ID))
		}
		var out, errOut bytes.Buffer
		if code := ctl.Run(ctx, []string{"--admin", addr, "messages", "ack", m.ID, "--reason", "soak: larger than S2 takes", "--operator", "soak"}, &out, &errOut); code != 0 {
			t.Logf("pgs2ctl messages ack %s: exit %d: %s", m.ID, code, strings.TrimSpace(errOut.String()))
			continue
		}
		r.acked[ev.id()] = true
		n++
	}
	return n
}

// once reports a problem once (ackTooLarge runs every second at the end).
func (r *soakRun) once(msg string) {
	if !r.reported[msg] {
		r.reported[msg] = true
		r.t.Errorf("%s", msg)
	}
}

// auditCount is how many acknowledgements PGS2_AUDIT holds for the sink.
func (r *soakRun) auditCount() (int, error) {
	addr := r.adminAddr()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var resp struct {
		Records []struct {
			Action string `json:"action"`
		} `json:"records"`
	}
	if err := adminGet(ctx, addr, "/v1/sinks/soak/audit?page_size=1000", &resp); err != nil {
		return 0, err
	}
	n := 0
	for _, rec := range resp.Records { // retries are audited too
		if rec.Action == "ack" {
			n++
		}
	}
	return n, nil
}

// settle waits until nothing is parked or blocked and S2 got no new record
// for 2s, at most for within.
func (r *soakRun) settle(within time.Duration) {
	deadline := time.Now().Add(within)
	last, lastChange := r.col.count(), time.Now()
	for time.Now().Before(deadline) {
		time.Sleep(250 * time.Millisecond)
		checkAlive(r.t, r.svcs)
		if n := r.col.count(); n != last {
			last, lastChange = n, time.Now()
			continue
		}
		if time.Since(lastChange) < 2*time.Second {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		msgs, err := adminList(ctx, r.adminAddr())
		cancel()
		if err == nil && len(msgs) == 0 {
			return
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	msgs, err := adminList(ctx, r.adminAddr())
	r.t.Errorf("not settled within %s: %d failed messages left (%v): %s", within, len(msgs), err, summarize(msgs))
}

func summarize(msgs []failedMsg) string {
	counts := map[string]int{}
	for _, m := range msgs {
		k := fmt.Sprintf("%s/%s %s blocked_by=%q error=%q", m.Basin, m.Stream, m.Table, m.BlockedBy, m.LastError.Message)
		if len(k) > 200 {
			k = k[:200]
		}
		counts[k]++
	}
	var out []string
	for k, n := range counts {
		out = append(out, fmt.Sprintf("%d× %s", n, k))
	}
	sort.Strings(out)
	return strings.Join(out, "; ")
}

// failMissing fails the test naming what S2 lacks and what delivery says
// about it.
func (r *soakRun) failMissing(x *expectation, miss []event, waited time.Duration) {
	t := r.t
	commitAt := map[string]time.Time{}
	for _, c := range r.wl.snapshot() {
		if _, ok := commitAt[c.ev.id()]; !ok {
			commitAt[c.ev.id()] = c.at
		}
	}
	by := map[string]int{}
	for _, e := range miss {
		by[e.db+"/"+e.table+"→"+e.stream()]++
	}
	var lines []string
	for i, e := range miss {
		if i == 30 {
			lines = append(lines, fmt.Sprintf("… and %d more", len(miss)-30))
			break
		}
		lines = append(lines, fmt.Sprintf("%s (stream %s, committed %s)", e, e.stream(), commitAt[e.id()].Format("15:04:05.000")))
	}
	var parks string
	if addr := r.adminAddr(); addr != "" {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		msgs, err := adminList(ctx, addr)
		cancel()
		parks = fmt.Sprintf("%d failed messages (err %v): %s", len(msgs), err, summarize(msgs))
	}
	t.Fatalf("%d of %d expected changes are not in S2 %s after the workload ended (acknowledged %d of %d too large); missing by source/table→stream: %v; delivery's admin API lists %s; S2 read errors %v; first missing:\n  %s",
		len(miss), x.total, waited.Round(time.Second), len(r.acked), r.wl.bigCount(), by, parks, r.col.readErr, strings.Join(lines, "\n  "))
}
