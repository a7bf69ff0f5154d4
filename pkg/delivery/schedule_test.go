package delivery

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/s2-streamstore/s2-sdk-go/s2"

	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/config"
	"github.com/pgs2/pgs2/pkg/restart"
	"github.com/pgs2/pgs2/pkg/s2sink"
)

// TestWorkerSchedules runs the worker's state machine (batch, flush, park,
// drain, progress, lease loss) over seeded random schedules against
// JetStream and an in-process S2: appends failing before and after their
// effect, timeouts, crashes and session restarts at every step, another
// process taking the unit over (with and without the first noticing), a
// park publish held until the new owner has claimed the parks, a foreign
// writer, parks and drains, functions failing, records from 10 bytes to
// 900 KiB and over S2's limit. After each schedule the S2 stream must hold
// every change exactly once, in group order (oversized ones excepted: an
// operator acknowledges them). PGS2_SCHEDULES sets the number (default
// 150), PGS2_SEED the first seed; a failing seed is printed, and
// PGS2_SEED=<it> PGS2_SCHEDULES=1 replays its schedule.
func TestWorkerSchedules(t *testing.T) {
	n, seed0 := seeds("PGS2_SCHEDULES", 150)
	t.Logf("%d schedules from seed %d", n, seed0)
	h := newHarness(t)
	was := sessionRestarts
	sessionRestarts = restart.Policy{Min: time.Millisecond, Max: 20 * time.Millisecond}
	defer func() { sessionRestarts = was }()
	goroutines := workerGoroutines()

	var wg sync.WaitGroup
	sem := make(chan struct{}, 6)
	for i := 0; i < n; i++ {
		seed := seed0 + uint64(i)
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if err := runSchedule(h, seed); err != nil {
				t.Errorf("seed %d: %v\n  replay: PGS2_SEED=%d PGS2_SCHEDULES=1 go test -run TestWorkerSchedules ./pkg/delivery", seed, err, seed)
			}
		}()
	}
	wg.Wait()
	// Every worker stopped: their session goroutines are gone too.
	deadline := time.Now().Add(5 * time.Second)
	for workerGoroutines() > goroutines && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if g := workerGoroutines(); g > goroutines {
		buf := make([]byte, 4<<20)
		t.Errorf("%d goroutines in delivery's code after the schedules, %d before: sessions leak\n%s", g, goroutines, buf[:runtime.Stack(buf, true)])
	}
}

// workerGoroutines counts the goroutines running a worker's code.
func workerGoroutines() int {
	buf := make([]byte, 8<<20)
	n := 0
	for _, g := range strings.Split(string(buf[:runtime.Stack(buf, true)]), "\n\n") {
		if strings.Contains(g, "pkg/delivery.(*worker)") {
			n++
		}
	}
	return n
}

// schedule is one run: its inputs and its faults, all drawn from the seed.
type schedule struct {
	h    *harness
	seed uint64
	u    Unit
	rng  *rand.Rand
	mu   sync.Mutex // guards rng and the fault counters (faults come from several goroutines)

	want      map[string][]string // source/group → keys, in order
	oversized map[string]bool     // keys an operator acknowledges
	all       int
	msgs      int // published

	s2Faults, jsFaults int // left to inject
	events             chan string
	log                []string
}

func (sc *schedule) draw(n int) int {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	return sc.rng.IntN(n)
}

func (sc *schedule) note(format string, args ...any) {
	sc.mu.Lock()
	sc.log = append(sc.log, fmt.Sprintf(format, args...))
	sc.mu.Unlock()
}

func runSchedule(h *harness, seed uint64) error {
	h, drop := h.own(fmt.Sprint(seed))
	defer drop()
	sc := &schedule{h: h, seed: seed, rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)),
		u:    Unit{Sink: fmt.Sprintf("s%d", seed), Basin: testBasin, Stream: fmt.Sprintf("u%d", seed)},
		want: map[string][]string{}, oversized: map[string]bool{}, events: make(chan string, 64)}
	sc.s2Faults, sc.jsFaults = sc.rng.IntN(10), sc.rng.IntN(4)
	err := sc.run()
	if err != nil && len(sc.log) > 0 {
		err = fmt.Errorf("%w\n  events: %s", err, strings.Join(sc.log, "; "))
	}
	return err
}

// inputs publishes the schedule's delivery messages.
func (sc *schedule) inputs(msgs int) {
	groups := 1 + sc.rng.IntN(6)
	for end := sc.msgs + msgs; sc.msgs < end; sc.msgs++ {
		m := sc.msgs
		// Two sources: the same groups of the same table, of two
		// databases, are distinct groups.
		src := sc.h.srcs[0].token
		if sc.rng.IntN(3) == 0 {
			src = sc.h.srcs[1].token
		}
		var entries []bus.Entry
		total := 0
		n := 1 + sc.rng.IntN(15)
		for i := 0; i < n; i++ {
			g := sc.rng.IntN(groups)
			key := fmt.Sprintf("k%d.%d", m, i)
			var size int
			switch r := sc.rng.Float64(); {
			case r < 0.85:
				size = 10 + sc.rng.IntN(200)
			case r < 0.95:
				size = 1000 + sc.rng.IntN(20_000)
			case r < 0.985:
				size = 100_000 + sc.rng.IntN(800_000)
			default:
				size = s2sink.MaxBatchBytes + 1000 // over S2's limit: parked until acknowledged
			}
			if total+size > 6<<20 {
				break
			}
			total += size
			body := fmt.Appendf(nil, `{"k":%q,"pad":"%s"}`, key, strings.Repeat("x", max(0, size-20)))
			e := entry("public.t", g, key, body)
			if sc.rng.Float64() < 0.05 { // a sink function failed on it in the router: retried with the functions as they are now
				e.Error, e.ErrorKind = []byte("injected function failure"), bus.ErrorFunction
			}
			entries = append(entries, e)
			if size > s2sink.MaxBatchBytes {
				sc.oversized[key] = true
			} else {
				sg := fmt.Sprintf("%s/%d", src, g)
				sc.want[sg] = append(sc.want[sg], key)
				sc.all++
			}
		}
		sc.h.publishFrom(src, sc.u, sc.rng.IntN(3), entries...)
	}
}

// s2Plan draws the fault of each S2 call.
func (sc *schedule) s2Plan(call int, op string) s2Fault {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if sc.s2Faults == 0 || sc.rng.Float64() > 0.25 {
		return s2OK
	}
	sc.s2Faults--
	switch r := sc.rng.IntN(9); {
	case r < 2:
		sc.log = append(sc.log, fmt.Sprintf("s2#%d %s fails", call, op))
		return s2FailBefore
	case r < 4:
		sc.log = append(sc.log, fmt.Sprintf("s2#%d %s fails after effect", call, op))
		return s2FailAfter
	case r < 5:
		sc.log = append(sc.log, fmt.Sprintf("s2#%d %s times out after effect", call, op))
		return s2TimeoutAfter
	case r < 6:
		sc.log = append(sc.log, fmt.Sprintf("s2#%d %s: crash after effect", call, op))
		return s2Crash
	case r < 7:
		sc.events <- "restart"
		return s2OK
	case r < 8:
		sc.events <- "takeover"
		return s2OK
	default:
		sc.events <- "foreign"
		return s2OK
	}
}

// jsPlan draws the fault of each park publish and purge.
func (sc *schedule) jsPlan(call int, op string) s2Fault {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if sc.jsFaults == 0 || sc.rng.Float64() > 0.3 {
		return s2OK
	}
	sc.jsFaults--
	if sc.rng.IntN(2) == 0 {
		sc.log = append(sc.log, fmt.Sprintf("js#%d %s fails", call, op))
		return s2FailBefore
	}
	sc.log = append(sc.log, fmt.Sprintf("js#%d %s fails after effect", call, op))
	return s2FailAfter
}

// incarnation is one worker process.
type incarnation struct {
	w    *worker
	stop func()
	done <-chan struct{}
}

func (sc *schedule) run() error {
	h := sc.h
	sc.inputs(1 + sc.rng.IntN(10))
	s2f := &faultyS2{appender: h.client, plan: sc.s2Plan}
	retry := config.Retry{Initial: config.Duration(2 * time.Millisecond), Max: config.Duration(20 * time.Millisecond)}
	gen := 0
	maxRecords := []int{3, 10, 1000}[sc.rng.IntN(3)] // batches flushed full by count, too
	holdOnce := sc.rng.Float64() < 0.3               // a park publish waits until another process claimed the parks
	var release chan struct{}
	var releaseHeld func() // closes release once
	newProcess := func() *incarnation {
		gen++
		token := fmt.Sprintf("w%d-%d", sc.seed, gen)
		jsf := &faultyJS{JetStream: h.js, plan: sc.jsPlan}
		if holdOnce {
			holdOnce = false
			release = make(chan struct{})
			releaseHeld = sync.OnceFunc(func() { close(release) })
			rel := release
			var once sync.Once
			jsf.hold = func(ctx context.Context, subject string) {
				if strings.HasSuffix(subject, "."+ownerToken) {
					return
				}
				once.Do(func() {
					sc.note("park publish held for a takeover")
					sc.events <- "takeover-held"
					select {
					case <-rel:
					case <-ctx.Done():
					}
				})
			}
		}
		d := h.delivery(token, jsf)
		// Most processes read through a shared reader (fanout), with
		// feeds small enough to detach and attach again; some without.
		fctx, stopFan := context.WithCancel(context.Background())
		if sc.draw(4) > 0 {
			d.fan = newFanout(fctx, jsf, d.log)
			d.fan.room = 4 << sc.draw(5) // 4..64 (TestFanoutFeedsEveryMessageOnce takes smaller ones)
		}
		sk := h.sink(sc.u, s2f, retry)
		sk.cfg.Batch.MaxRecords = maxRecords
		w, stop, done := h.start(d, sc.u, sk)
		return &incarnation{w: w, stop: func() { stop(); stopFan() }, done: done}
	}
	cur := newProcess()
	var old []*incarnation
	defer func() {
		if releaseHeld != nil {
			releaseHeld()
		}
		cur.stop()
		for _, o := range old {
			o.stop()
		}
	}()

	ctx := context.Background()
	more := sc.rng.IntN(3) // batches of inputs published while the workers run
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	deadline := time.Now().Add(60 * time.Second)
	var settled time.Time
	final := false
	for {
		select {
		case ev := <-sc.events:
			switch ev {
			case "restart": // the process dies and starts again
				sc.note("process restart")
				cur.stop()
				cur = newProcess()
			case "takeover", "takeover-held": // another process owns the unit now
				sc.note("takeover (%s)", ev)
				if sc.draw(2) == 0 {
					cur.w.extend(time.Now().Add(-time.Second)) // the old owner's lease lapsed
				}
				old = append(old, cur)
				cur = newProcess()
				if ev == "takeover-held" {
					go func(token string) {
						defer releaseHeld()
						owner := ParkSubject(sc.u, ownerToken)
						for end := time.Now().Add(10 * time.Second); time.Now().Before(end); time.Sleep(2 * time.Millisecond) {
							st, err := h.js.Stream(ctx, ParkedStream)
							if err != nil {
								continue
							}
							if m, err := st.GetLastMsgForSubject(ctx, owner); err == nil && string(m.Data) == token {
								return
							}
						}
					}(cur.w.token)
				}
			case "foreign": // another writer appends to the stream
				b := s2sink.NewBatch(0, 0)
				for i := 0; i <= sc.draw(3); i++ {
					_ = b.Add(s2.AppendRecord{Body: []byte("not pgs2's")})
				}
				_ = h.client.CreateStream(ctx, sc.u.Basin, sc.u.Stream)
				if _, err := h.client.Append(ctx, sc.u.Basin, sc.u.Stream, b, nil); err == nil {
					sc.note("foreign append of %d", b.Len())
				}
			}
		case <-tick.C:
			if more > 0 && sc.draw(5) == 0 {
				more--
				func() { // unlocked even if a publish fails the test
					sc.mu.Lock()
					defer sc.mu.Unlock()
					sc.inputs(1 + sc.rng.IntN(4))
				}()
			}
			select {
			case <-cur.done: // stopped itself (lease lost to a process that stopped since): a new one
				sc.note("worker stopped; a new process")
				cur = newProcess()
			default:
			}
			if err := sc.acknowledgeOversized(ctx); err != nil {
				return err
			}
			if n := len(h.records(sc.u)); n >= sc.all && more == 0 {
				if settled.IsZero() {
					settled = time.Now()
				} else if time.Since(settled) > 50*time.Millisecond {
					if !final {
						// A last restart of a process without faults: what
						// a session leaves behind (a park nobody knew of)
						// shows now.
						final = true
						sc.mu.Lock()
						sc.s2Faults, sc.jsFaults = 0, 0
						sc.mu.Unlock()
						cur.stop()
						for _, o := range old {
							o.stop()
						}
						old = nil
						cur = newProcess()
						settled = time.Time{}
						continue
					}
					if n, err := sc.parked(ctx); err != nil || n > 0 {
						if err == nil && time.Since(settled) < 2*time.Second {
							continue // still draining
						}
						return fmt.Errorf("%d messages left parked (%v); %v", n, err, sc.check())
					}
					return sc.check()
				}
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("not complete after 60s: %v", sc.check())
			}
		}
	}
}

// acknowledgeOversized drops parked messages over S2's limit, as an
// operator would (the admin API's acknowledge), and asks for a retry.
func (sc *schedule) acknowledgeOversized(ctx context.Context) error {
	st, err := sc.h.js.Stream(ctx, ParkedStream)
	if err != nil {
		return err
	}
	dropped := false
	for seq := uint64(1); ; {
		m, err := st.GetMsg(ctx, seq, jetstream.WithGetMsgSubject(ParkFilter(sc.u)))
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			break
		}
		if err != nil {
			return err
		}
		seq = m.Sequence + 1
		if sc.oversized[m.Header.Get(bus.HeaderKey)] {
			if err := st.DeleteMsg(ctx, m.Sequence); err == nil {
				dropped = true
			}
		}
	}
	if dropped {
		return sc.h.nc.Publish(RetrySubject(sc.u), nil)
	}
	return nil
}

// parked counts the unit's parked messages (not the owner marker).
func (sc *schedule) parked(ctx context.Context) (int, error) {
	st, err := sc.h.js.Stream(ctx, ParkedStream)
	if err != nil {
		return 0, err
	}
	info, err := st.Info(ctx, jetstream.WithSubjectFilter(ParkFilter(sc.u)))
	if err != nil {
		return 0, err
	}
	n := 0
	for subj, c := range info.State.Subjects {
		if _, _, ok := parseParkSubject(subj); ok {
			n += int(c)
		}
	}
	return n, nil
}

// check verifies the S2 stream: every wanted change once, in group order.
func (sc *schedule) check() error {
	recs := sc.h.records(sc.u)
	seen := map[string]int{}
	for i := range recs {
		r := &recs[i]
		k := header(r, s2sink.HeaderIdempotencyKey)
		seen[k]++
		if seen[k] > 1 {
			return fmt.Errorf("%s appended twice (record %d)", k, r.SeqNum)
		}
		if sc.oversized[k] {
			return fmt.Errorf("oversized %s reached S2", k)
		}
		if !strings.Contains(string(r.Body), fmt.Sprintf(`"k":%q`, k)) {
			return fmt.Errorf("record %d (%s) has another change's body", r.SeqNum, k)
		}
	}
	// Group order: each group's keys appear in input order.
	pos := map[string]int{}
	for i := range recs {
		pos[header(&recs[i], s2sink.HeaderIdempotencyKey)] = i
	}
	for g, keys := range sc.want {
		last := -1
		for _, k := range keys {
			p, ok := pos[k]
			if !ok {
				return fmt.Errorf("group %s: %s missing (S2 holds %d of %d)", g, k, len(recs), sc.all)
			}
			if p < last {
				return fmt.Errorf("group %s: %s at record %d after a later change at %d", g, k, p, last)
			}
			last = p
		}
	}
	if len(recs) != sc.all {
		return fmt.Errorf("S2 holds %d records, want %d", len(recs), sc.all)
	}
	return nil
}
