package delivery

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/config"
)

// TestFanoutFeedsEveryMessageOnce: units of one process read their
// messages of a delivery stream shared by many units, with their own
// consumers and through the process's shared reader (attaching once
// caught up, detached when they fall behind its small feeds, the reader
// killed now and then), while messages to every unit are published in
// seeded bursts, and some units start late from a position (some get
// what the reader passed from its history of seeded size). Some attach
// before their session starts (as a session does before it waits for its
// start slot and S2) and start reading a while later, some of those
// without a position (they look up their first message). Every unit must
// get each of its messages after its start exactly once, in order.
// PGS2_SEED replays a seed; PGS2_FANOUT_SEEDS sets how many.
func TestFanoutFeedsEveryMessageOnce(t *testing.T) {
	h := newHarness(t)
	n, seed0 := seeds("PGS2_FANOUT_SEEDS", 8)
	var fed, detached, replayed int
	for i := range n {
		seed := seed0 + uint64(i)
		f, d, rp, err := runFanout(t, h, seed)
		if err != nil {
			t.Fatalf("seed %d: %v\n  replay: PGS2_SEED=%d PGS2_FANOUT_SEEDS=1 go test -run TestFanoutFeedsEveryMessageOnce ./pkg/delivery", seed, err, seed)
		}
		fed, detached, replayed = fed+f, detached+d, replayed+rp
	}
	t.Logf("%d seeds from %d: %d messages fed (%d from history), %d feeds detached", n, seed0, fed, replayed, detached)
	// The test reaches what it is for: messages through feeds, from
	// history, and feeds detached.
	if fed == 0 || detached == 0 || replayed == 0 {
		t.Errorf("over %d seeds from %d: %d messages fed, %d from history, %d feeds detached; want all > 0", n, seed0, fed, replayed, detached)
	}
}

func runFanout(t *testing.T, h *harness, seed uint64) (fed, detached, replayed int, err error) {
	rng := rand.New(rand.NewPCG(seed, seed^0x5bd1e995))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	d := h.delivery(fmt.Sprintf("fan%d", seed), h.js)
	d.fan = newFanout(ctx, h.js, d.log)
	d.fan.room = 1 + rng.IntN(6) // feeds that fill up
	if rng.IntN(2) == 0 {
		d.fan.room = 20 + rng.IntN(200) // or take a unit's history
	}
	d.fan.histRoom = rng.IntN(300)
	src := h.src
	st, err := h.js.Stream(ctx, src.name)
	if err != nil {
		return 0, 0, 0, err
	}
	base := st.CachedInfo().State.LastSeq // earlier seeds' messages

	const units = 6
	us := make([]Unit, units)
	for i := range us {
		us[i] = Unit{Sink: fmt.Sprintf("f%d-%d", seed, i), Basin: testBasin, Stream: fmt.Sprintf("s%d", i)}
	}
	var mu sync.Mutex
	published := map[int][]uint64{} // unit → sequences, in order
	publish := func(n int) error {
		for range n {
			i := rng.IntN(units)
			subj := bus.DeliverySubject(testSource, us[i].Sink, us[i].Basin, us[i].Stream, strconv.Itoa(rng.IntN(3)))
			ack, err := h.js.Publish(ctx, subj, []byte("x"))
			if err != nil {
				return err
			}
			mu.Lock()
			published[i] = append(published[i], ack.Sequence)
			mu.Unlock()
		}
		return nil
	}
	startReader := func() error { // a reader runs
		_, _, err := d.fan.attach(ctx, src, Unit{Sink: "nobody", Basin: testBasin, Stream: "x"})
		return err
	}
	early := rng.IntN(2) == 0 // the reader's history holds the first burst
	if early {
		if err := startReader(); err != nil {
			return 0, 0, 0, err
		}
	}
	if err := publish(20 + rng.IntN(200)); err != nil {
		return 0, 0, 0, err
	}
	if !early {
		if err := startReader(); err != nil {
			return 0, 0, 0, err
		}
	}

	type got struct {
		seqs []uint64
		fed  int
		err  error
	}
	results := make([]got, units)
	var wg sync.WaitGroup
	var done atomic.Bool            // every burst is published
	starts := make([]uint64, units) // the first sequence each unit reads (0: the first)
	for i := range us {
		w := newWorker(d, us[i], h.sink(us[i], nil, config.Retry{}))
		slow := time.Duration(rng.IntN(3)) * time.Millisecond // some fall behind their feeds
		late := rng.IntN(3) == 0
		var pre preFeeds
		var wait time.Duration
		if rng.IntN(2) == 0 { // attached before its session starts, which reads a while later
			w.setSources([]source{src})
			pre, wait = w.preattach(), time.Duration(rng.IntN(40))*time.Millisecond
		}
		if late {
			mu.Lock()
			if l := published[i]; len(l) > 0 {
				starts[i] = l[rng.IntN(len(l))]
			}
			mu.Unlock()
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := &results[i]
			if starts[i] > 0 {
				w.done = bus.Progress{src.key: bus.DeliveryPos{Stream: src.key, Seq: starts[i]}}
			}
			msgs := make(chan jetstream.Msg, 4)
			readErr := make(chan error, 1)
			wctx, stop := context.WithCancel(ctx)
			defer stop()
			time.Sleep(wait)
			p := pre.take(src.key)
			if pre != nil && p == nil {
				r.err = fmt.Errorf("not attached before its session though a reader runs")
				return
			}
			if r.err = w.read1(wctx, src, msgs, readErr, p); r.err != nil {
				return
			}
			idle := time.NewTimer(300 * time.Millisecond)
			for {
				select {
				case m := <-msgs:
					md, _ := m.Metadata()
					if _, ok := m.(*fedMsg); ok {
						r.fed++
					}
					r.seqs = append(r.seqs, md.Sequence.Stream)
					if slow > 0 {
						time.Sleep(slow)
					}
					idle.Reset(300 * time.Millisecond)
				case r.err = <-readErr:
					return
				case <-idle.C: // nothing more for a while, and nothing more to come: done
					if done.Load() {
						return
					}
					idle.Reset(300 * time.Millisecond)
				}
			}
		}()
	}
	// More bursts while they read; the reader is killed now and then.
	for range 3 + rng.IntN(5) {
		time.Sleep(time.Duration(rng.IntN(30)) * time.Millisecond)
		if err := publish(rng.IntN(300)); err != nil {
			return 0, 0, 0, err
		}
		if rng.IntN(3) == 0 {
			d.fan.mu.Lock()
			if r := d.fan.readers[src.key]; r != nil {
				d.fan.mu.Unlock()
				r.mu.Lock()
				for _, f := range r.feeds {
					f.detach() // as the reader's end does
				}
				clear(r.feeds)
				r.mu.Unlock()
			} else {
				d.fan.mu.Unlock()
			}
		}
	}
	done.Store(true)
	wg.Wait()

	// A unit starting at the very message the reader read last must get
	// it (from its own consumer: the reader is past it).
	late := Unit{Sink: fmt.Sprintf("f%d-late", seed), Basin: testBasin, Stream: "late"}
	ack, err := h.js.Publish(ctx, bus.DeliverySubject(testSource, late.Sink, late.Basin, late.Stream, "0"), []byte("x"))
	if err != nil {
		return 0, 0, 0, err
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		d.fan.mu.Lock()
		r := d.fan.readers[src.key]
		d.fan.mu.Unlock()
		var pos uint64
		if r != nil {
			r.mu.Lock()
			pos = r.pos
			r.mu.Unlock()
		} else if _, _, err := d.fan.attach(ctx, src, us[0]); err != nil { // a reader again (killed above)
			return 0, 0, 0, err
		}
		if pos >= ack.Sequence {
			break
		}
		if time.Now().After(deadline) {
			return 0, 0, 0, fmt.Errorf("the shared reader is at %d, not past %d", pos, ack.Sequence)
		}
	}
	lw := newWorker(d, late, h.sink(late, nil, config.Retry{}))
	lw.done = bus.Progress{src.key: bus.DeliveryPos{Stream: src.key, Seq: ack.Sequence}}
	lmsgs, lerr := make(chan jetstream.Msg, 1), make(chan error, 1)
	if err := lw.read1(ctx, src, lmsgs, lerr, nil); err != nil {
		return 0, 0, 0, err
	}
	if err := firstRead(lmsgs, lerr, ack.Sequence, fmt.Sprintf("a unit starting at %d, where the shared reader is", ack.Sequence)); err != nil {
		return 0, 0, 0, err
	}
	// Units starting at the reader's history's edges: at the last
	// message it forgot (on their own), and at the oldest it holds.
	d.fan.mu.Lock()
	r := d.fan.readers[src.key]
	d.fan.mu.Unlock()
	var edges []uint64
	if r != nil {
		r.mu.Lock()
		edges = []uint64{r.hist.from - 1, r.hist.from}
		r.mu.Unlock()
	}
	for k, seq := range edges {
		edge := edges[1]
		owner := -1
		mu.Lock()
		for i, l := range published {
			if slices.Contains(l, seq) {
				owner = i
			}
		}
		mu.Unlock()
		if owner < 0 || seq <= base {
			continue // not one of this seed's units' messages
		}
		ew := newWorker(d, us[owner], h.sink(us[owner], nil, config.Retry{}))
		ew.done = bus.Progress{src.key: bus.DeliveryPos{Stream: src.key, Seq: seq}}
		emsgs, eerr := make(chan jetstream.Msg, 1), make(chan error, 1)
		ectx, stop := context.WithCancel(ctx)
		if err := ew.read1(ectx, src, emsgs, eerr, nil); err != nil {
			stop()
			return 0, 0, 0, err
		}
		err := firstRead(emsgs, eerr, seq, fmt.Sprintf("a unit starting at %d (history from %d, edge %d)", seq, edge, k))
		stop()
		if err != nil {
			return 0, 0, 0, err
		}
	}
	// A new unit attached before its session, with no message yet: its
	// first is the next message the reader reads.
	fresh := Unit{Sink: fmt.Sprintf("f%d-fresh", seed), Basin: testBasin, Stream: "fresh"}
	fw := newWorker(d, fresh, h.sink(fresh, nil, config.Retry{}))
	fw.setSources([]source{src})
	pre := fw.preattach()
	fp := pre.take(src.key)
	if fp == nil {
		return 0, 0, 0, fmt.Errorf("a unit was not attached before its session though a reader runs")
	}
	fmsgs, ferr := make(chan jetstream.Msg, 1), make(chan error, 1)
	if err := fw.read1(ctx, src, fmsgs, ferr, fp); err != nil {
		return 0, 0, 0, err
	}
	fack, err := h.js.Publish(ctx, bus.DeliverySubject(testSource, fresh.Sink, fresh.Basin, fresh.Stream, "1"), []byte("x"))
	if err != nil {
		return 0, 0, 0, err
	}
	if err := firstRead(fmsgs, ferr, fack.Sequence, "a new unit attached before its session"); err != nil {
		return 0, 0, 0, err
	}
	detached = int(d.fan.detached.Load())
	for i := range us {
		r := results[i]
		if r.err != nil {
			return 0, 0, 0, fmt.Errorf("unit %d: %w", i, r.err)
		}
		var want []uint64
		for _, s := range published[i] {
			if s > base && s >= starts[i] {
				want = append(want, s)
			}
		}
		if fmt.Sprint(r.seqs) != fmt.Sprint(want) {
			return 0, 0, 0, fmt.Errorf("unit %d (from %d, room %d): got %v, want %v", i, starts[i], d.fan.room, r.seqs, want)
		}
		fed += r.fed
	}
	return fed, detached, int(d.fan.replayed.Load()), nil
}

// firstRead checks that the first message a reader forwards is want's.
func firstRead(msgs <-chan jetstream.Msg, errs <-chan error, want uint64, who string) error {
	select {
	case m := <-msgs:
		if md, _ := m.Metadata(); md.Sequence.Stream != want {
			return fmt.Errorf("%s got %d first, want %d", who, md.Sequence.Stream, want)
		}
		return nil
	case err := <-errs:
		return fmt.Errorf("%s: %w", who, err)
	case <-time.After(5 * time.Second):
		return fmt.Errorf("%s got nothing, want %d", who, want)
	}
}
