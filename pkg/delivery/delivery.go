// Package delivery appends routed changes to S2: one worker per S2 stream
// of a sink (a unit), reading the unit's messages in delivery-stream order,
// batching them, and appending with match_seq_num so retries never append
// twice. Its progress is stored with the data: every S2 record carries its
// delivery-stream sequence.
package delivery

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/sync/errgroup"

	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/config"
	"github.com/pgs2/pgs2/pkg/fn"
	"github.com/pgs2/pgs2/pkg/health"
	"github.com/pgs2/pgs2/pkg/metrics"
	"github.com/pgs2/pgs2/pkg/restart"
	"github.com/pgs2/pgs2/pkg/s2sink"
	"github.com/pgs2/pgs2/pkg/service"
	"github.com/pgs2/pgs2/pkg/sinkstate"
)

// Config configures delivery. It reads every source's delivery stream
// (the streams with subjects under pgs2.deliver).
type Config struct {
	Sinks []config.Sink
	// Discover is how often new units (streams chosen by routing) are
	// looked for (default 1s).
	Discover time.Duration
	Replicas int
	// LeaseTTL is how long a unit stays with a process that stopped
	// renewing it (default 10s): a SIGKILLed process's units move to the
	// others within it.
	LeaseTTL time.Duration
}

// Unit is one S2 stream of one sink: the unit of ordering and ownership.
type Unit struct {
	Sink, Basin, Stream string
}

func (u Unit) String() string { return u.Sink + ":" + u.Basin + "/" + u.Stream }

// Delivery runs a worker per unit.
type Delivery struct {
	cfg   Config
	js    jetstream.JetStream
	log   *slog.Logger
	state *health.State
	sinks map[string]*sink
	held  map[Unit]*held
	wg    sync.WaitGroup
	// fan reads each delivery stream once for the units it holds (nil:
	// each unit reads on its own).
	fan *fanout

	failures jetstream.KeyValue
	failed   keySet // failures' keys, from a watch (clearFailure deletes only those)
	parked   jetstream.Stream
	leases   *leases
	reg      registry
	starts   chan struct{} // sessions starting (startSlot)
	unitsKV  jetstream.KeyValue
	scanned  map[string]bool // delivery streams (bus.StreamKey) whose subjects were listed
	unitList *unitList
	// states are the sinks' states (sinkstate): units of a sink that is
	// not active have no worker; wake makes balance act on a change now.
	sinkKV  jetstream.KeyValue
	states  *sinkstate.Table
	wake    chan struct{}
	workers sync.Map // Unit → *worker: held's workers, for status requests
	tracer  trace.Tracer
	metrics *metrics.Delivery
}

// held is a unit this process owns.
type held struct {
	w      *worker
	rev    uint64
	cancel context.CancelFunc
	done   chan struct{}
}

type sink struct {
	cfg    config.Sink
	client appender
	// fns re-run the sink's functions on a message the router's functions
	// failed on, when it is retried (after the functions were fixed and
	// reloaded).
	fns atomic.Pointer[fn.Functions]
}

// Option configures optional dependencies.
type Option func(*Delivery)

// WithLogger sets the logger.
func WithLogger(l *slog.Logger) Option { return func(d *Delivery) { d.log = l } }

// WithMetrics registers delivery's metrics in r.
func WithMetrics(r prometheus.Registerer) Option {
	return func(d *Delivery) {
		if r != nil {
			d.metrics = metrics.NewDelivery(r)
			r.MustRegister(&gauges{d: d})
		}
	}
}

// WithHealth reports readiness into s.
func WithHealth(s *health.State) Option { return func(d *Delivery) { d.state = s } }

// New returns a delivery. Each sink needs its S2 client settings: a cloud
// sink without a token is an error here, not at the first append.
func New(cfg Config, js jetstream.JetStream, opts ...Option) (*Delivery, error) {
	if cfg.Discover <= 0 {
		cfg.Discover = time.Second
	}
	if cfg.LeaseTTL <= 0 {
		cfg.LeaseTTL = 10 * time.Second
	}
	d := &Delivery{cfg: cfg, js: js, log: slog.Default(), state: health.NewState(), sinks: map[string]*sink{}, held: map[Unit]*held{},
		reg: registry{refs: map[string]bus.UnitRef{}}, scanned: map[string]bool{}, starts: make(chan struct{}, sessionStarts),
		wake:   make(chan struct{}, 1),
		tracer: otel.Tracer("pgs2/delivery")}
	for _, o := range opts {
		o(d)
	}
	if d.metrics == nil {
		d.metrics = metrics.NewDelivery(prometheus.NewRegistry())
	}
	d.states = sinkstate.NewTable(d.wakeUp)
	for _, sc := range cfg.Sinks {
		c, err := s2sink.New(s2sink.FromSink(sc))
		if err != nil {
			return nil, fmt.Errorf("sink %q: %w", sc.Name, err)
		}
		fns, err := fn.Compile(sc.Name, sc.Filter, sc.Transform, sc.Routing)
		if err != nil {
			return nil, err
		}
		s := &sink{cfg: sc, client: c}
		s.fns.Store(fns)
		d.sinks[sc.Name] = s
	}
	return d, nil
}

// Reload applies the sinks' functions from a new config (SIGHUP): a parked
// change the router's functions failed on is retried with them. Functions
// that do not compile are refused, and nothing changes. Sinks added or
// removed, or changed in anything but their functions, apply after a
// restart; restart names them.
func (d *Delivery) Reload(sinks []config.Sink) (restart []string, err error) {
	compiled := map[string]*fn.Functions{}
	var errs []error
	for _, sc := range sinks {
		f, err := fn.Compile(sc.Name, sc.Filter, sc.Transform, sc.Routing)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		compiled[sc.Name] = f
	}
	if len(errs) > 0 {
		return nil, service.Refuse(errors.Join(errs...))
	}
	if d.sinkKV != nil { // a status: changed in the config applies now
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := sinkstate.Apply(ctx, d.sinkKV, sinks); err != nil {
			return nil, err
		}
	}
	seen := map[string]bool{}
	for _, sc := range sinks {
		seen[sc.Name] = true
		s, ok := d.sinks[sc.Name]
		if !ok {
			restart = append(restart, sc.Name)
			continue
		}
		s.fns.Store(compiled[sc.Name])
		was, now := s.cfg, sc
		was.Filter, was.Transform, was.Routing = "", "", ""
		now.Filter, now.Transform, now.Routing = "", "", ""
		if !reflect.DeepEqual(was, now) {
			restart = append(restart, sc.Name)
		}
	}
	for name := range d.sinks {
		if !seen[name] {
			restart = append(restart, name)
		}
	}
	sort.Strings(restart)
	return restart, nil
}

// Run delivers until ctx ends: it keeps a fair share of the units leased,
// runs a worker for each, and releases them on the way out.
func (d *Delivery) Run(ctx context.Context) error {
	err := SetUp(ctx, d.log, d.state, func(ctx context.Context) error {
		g, ctx := errgroup.WithContext(ctx) // independent: at once, for a quick start
		g.Go(func() (err error) { d.parked, err = EnsureParkedStream(ctx, d.js, d.cfg.Replicas); return err })
		g.Go(func() (err error) { d.failures, err = EnsureFailures(ctx, d.js, d.cfg.Replicas); return err })
		g.Go(func() (err error) { d.unitsKV, err = bus.EnsureUnits(ctx, d.js, d.cfg.Replicas); return err })
		g.Go(func() (err error) { d.leases, err = openLeases(ctx, d.js, d.cfg.LeaseTTL, d.cfg.Replicas); return err })
		g.Go(func() (err error) {
			if d.sinkKV, err = sinkstate.Ensure(ctx, d.js, d.cfg.Replicas); err != nil {
				return err
			}
			return sinkstate.Apply(ctx, d.sinkKV, d.cfg.Sinks)
		})
		return g.Wait()
	})
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	if err := SetUp(ctx, d.log, d.state, d.leases.heartbeat); err != nil {
		return nil // ctx ended
	}
	wctx, stopWatches := context.WithCancel(ctx)
	defer stopWatches()
	d.fan = newFanout(wctx, d.js, d.log)
	d.leases.watch(wctx)
	go d.leases.beat(wctx, func(err error) {
		d.state.SetNotReady(err.Error())
		d.log.Warn("heartbeat failed; units stop at the lease's end unless it succeeds", "error", err)
	})
	go bus.WatchKV(wctx, d.failures, d.failed.sync, d.failed.put)
	go bus.WatchKV(wctx, d.unitsKV, d.reg.sync, func(e jetstream.KeyValueEntry) {
		d.reg.put(e)
		d.wakeUp() // a new unit is claimed now, not at the next Discover tick
	})
	go d.states.Watch(wctx, d.sinkKV)
	sub, err := bus.ServeStatus(d.js.Conn(), bus.StatusSubject("delivery"), d.statusNow)
	if err != nil {
		return err
	}
	defer func() { _ = sub.Unsubscribe() }()
	retries, err := d.serveRetries()
	if err != nil {
		return err
	}
	defer func() { _ = retries.Unsubscribe() }()
	defer d.stopAll()
	// The first round claims at once: the watches deliver what the buckets
	// hold within milliseconds (a round before would wait a whole tick).
	for wait := time.Now().Add(5 * time.Second); !(d.leases.ready() && d.reg.ready() && d.states.Ready()) && time.Now().Before(wait) && ctx.Err() == nil; {
		time.Sleep(2 * time.Millisecond)
	}
	t := time.NewTicker(d.cfg.Discover)
	defer t.Stop()
	for {
		if err := d.balance(ctx); err != nil && ctx.Err() == nil {
			d.state.SetNotReady(err.Error())
			d.log.Warn("balancing delivery units", "error", err)
		} else {
			d.state.SetReady()
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		case <-d.wake: // a sink's state changed, or a unit is new: at once
		}
	}
}

// serveRetries hands the admin API's "retry now" requests to the units'
// workers.
func (d *Delivery) serveRetries() (*nats.Subscription, error) {
	sub, err := d.js.Conn().Subscribe(retryAll, func(m *nats.Msg) {
		if u, ok := retryUnit(m.Subject); ok {
			if w, ok := d.workers.Load(u); ok {
				w.(*worker).RetryNow()
			}
		}
	})
	if err != nil {
		return nil, fmt.Errorf("subscribe to retry requests: %w", err)
	}
	return sub, nil
}

// SetUp runs delivery's start-up calls (streams and buckets) until they
// succeed: while a NATS cluster elects leaders they time out, and delivery
// waits (not ready) rather than exit. A permanent error (bus.Permanent)
// ends it.
func SetUp(ctx context.Context, log *slog.Logger, state *health.State, step func(context.Context) error) error {
	return restart.Until(ctx, sessionRestarts, step, bus.Permanent, func(err error, wait time.Duration) {
		state.SetNotReady(err.Error())
		log.Warn("cannot set up delivery's streams and buckets yet; retrying", "error", err, "retry_in", wait)
	})
}

func (d *Delivery) stopAll() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for u, h := range d.held {
		h.cancel()
		<-h.done
		d.leases.release(ctx, u, h.rev)
	}
	d.leases.leave(ctx)
	d.wg.Wait()
}

func (d *Delivery) stop(ctx context.Context, u Unit, release bool) {
	h := d.held[u]
	h.cancel()
	<-h.done
	if release {
		d.leases.release(ctx, u, h.rev)
	}
	delete(d.held, u)
	d.workers.Delete(u)
}

// balance keeps the heartbeat going, stops the workers of units another
// process took, gives up units over a fair share (new processes joined),
// and claims free units up to it. Its per-second work does not grow with
// the number of units: ownership and units come from watches.
func (d *Delivery) balance(ctx context.Context) error {
	for u, h := range d.held {
		select {
		case <-h.done: // the worker gave up (lost its fence, or its lease lapsed)
			d.stop(ctx, u, true)
			continue
		default:
		}
		if d.leases.lost(u, h.rev) {
			d.log.Warn("lease lost; stopping", "unit", u.String())
			d.stop(ctx, u, false)
			continue
		}
		if st := d.states.Of(u.Sink); !st.Delivers() {
			d.log.Info("sink "+string(st)+"; stopping its unit (its changes wait in JetStream)", "unit", u.String())
			d.stop(ctx, u, true)
		}
	}
	if err := d.leases.valid(); err != nil {
		return err // no heartbeat of late: claim nothing
	}
	if !d.leases.ready() || !d.reg.ready() || !d.states.Ready() {
		return nil // not yet what the buckets hold
	}
	d.leases.probe(ctx)
	live := d.leases.live()
	units, sources, err := d.units(ctx)
	if err != nil {
		return err
	}
	for u, h := range d.held {
		h.w.setSources(sources[u]) // a new source's stream: the worker reads it too
	}
	units = d.delivering(units)
	defer func() { d.metrics.Units.Set(float64(len(d.held))) }()
	fair := (len(units) + live - 1) / live
	for i := len(units) - 1; i >= 0 && len(d.held) > fair; i-- {
		if _, ok := d.held[units[i]]; ok {
			d.log.Info("releasing a unit to another process", "unit", units[i].String())
			d.stop(ctx, units[i], true)
		}
	}
	// Start at a place of our own in the list, so processes claim different
	// units; claim them in parallel (a takeover of thousands of units).
	off := int(bus.Partition([]byte(d.leases.id), max(len(units), 1)))
	var want []Unit
	for k := 0; k < len(units) && len(d.held)+len(want) < fair; k++ {
		u := units[(off+k)%len(units)]
		if _, ok := d.held[u]; ok || d.sinks[u.Sink] == nil || !d.leases.claimable(u) || !d.states.Of(u.Sink).Delivers() {
			continue // held, a sink removed from the config (its messages wait), another's, or paused
		}
		want = append(want, u)
	}
	revs, errs := make([]uint64, len(want)), make([]error, len(want))
	var wg sync.WaitGroup
	sem := make(chan struct{}, claimParallel)
	for i, u := range want {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			rev, ok, err := d.leases.claim(ctx, u)
			if ok {
				revs[i] = rev
			}
			errs[i] = err
		}()
	}
	wg.Wait()
	for i, u := range want {
		if revs[i] == 0 {
			continue
		}
		w := newWorker(d, u, d.sinks[u.Sink])
		w.setSources(sources[u])
		wctx, cancel := context.WithCancel(ctx)
		h := &held{w: w, rev: revs[i], cancel: cancel, done: make(chan struct{})}
		d.held[u] = h
		d.workers.Store(u, w)
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			defer close(h.done)
			w.run(wctx)
		}()
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("claim units: %w", err)
	}
	return nil
}

// statusNow is this process's answer to a status request: the units it
// writes.
func (d *Delivery) statusNow() any {
	st := bus.DeliveryStatus{Process: bus.ThisProcess(d.leases.id)}
	d.workers.Range(func(_, v any) bool {
		st.Units = append(st.Units, v.(*worker).status())
		return true
	})
	return st
}

// wakeUp makes the balancing loop run now (once, however often called
// before it runs).
func (d *Delivery) wakeUp() {
	select {
	case d.wake <- struct{}{}:
	default:
	}
}

// delivering returns the units of sinks that are active (the others'
// changes wait: they take no share).
func (d *Delivery) delivering(units []Unit) []Unit {
	out := units[:0:0]
	for _, u := range units {
		if d.states.Of(u.Sink).Delivers() {
			out = append(out, u)
		}
	}
	return out
}

// sessionStarts is how many worker sessions of a process start at once.
const sessionStarts = 32

// startSlot waits for a turn to start a session; release ends it (once).
func (d *Delivery) startSlot(ctx context.Context) (release func(), err error) {
	if d.starts == nil {
		return func() {}, nil
	}
	select {
	case d.starts <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	var once sync.Once
	return func() { once.Do(func() { <-d.starts }) }, nil
}

// claimParallel is how many claims are in flight at once.
const claimParallel = 32

// source is one source's delivery stream, as delivery reads it.
type source struct {
	name  string // the stream's
	key   string // bus.StreamKey: the stream in delivery positions
	token string // the source's subject token: pgs2.deliver.<token>.>
}

// sourceOf reads a delivery stream's info: a source's stream has the one
// subject pgs2.deliver.<token>.> (an earlier pgs2's shared stream does not).
func sourceOf(info *jetstream.StreamInfo) (source, bool) {
	src := source{name: info.Config.Name, key: bus.StreamKey(info.Config.Name, info.Created)}
	if subj := info.Config.Subjects; len(subj) == 1 && strings.HasPrefix(subj[0], bus.DeliveryRoot+".") && strings.HasSuffix(subj[0], ".>") {
		src.token = strings.TrimSuffix(strings.TrimPrefix(subj[0], bus.DeliveryRoot+"."), ".>")
	}
	return src, src.token != "" && !strings.Contains(src.token, ".")
}

// registry is what the units bucket holds (bus.UnitsBucket), from a watch.
type registry struct {
	mu      sync.Mutex
	refs    map[string]bus.UnitRef // by bus.UnitKey
	version uint64                 // of refs: one more at every change
	synced  bool
}

func (r *registry) put(e jetstream.KeyValueEntry) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if e.Operation() != jetstream.KeyValuePut {
		delete(r.refs, e.Key())
	} else if ref, err := bus.ParseUnitEntry(e.Key(), e.Value()); err == nil {
		r.refs[e.Key()] = ref
	}
	r.version++
}

func (r *registry) add(ref bus.UnitRef) {
	r.mu.Lock()
	defer r.mu.Unlock()
	key := bus.UnitKey(ref.Source, ref.Sink, ref.Basin, ref.Stream)
	if _, ok := r.refs[key]; !ok {
		r.refs[key] = ref
		r.version++
	}
}

func (r *registry) sync() {
	r.mu.Lock()
	r.synced = true
	r.mu.Unlock()
}

func (r *registry) ready() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.synced
}

// unitList is units() computed once for a registry version and a set of
// delivery streams.
type unitList struct {
	version uint64
	streams string
	units   []Unit
	sources map[Unit][]source
}

// units lists every registered unit and every sink's configured stream,
// in a stable order, with the delivery streams (sources) that hold
// messages for each. Each delivery stream's subjects are listed once, the
// first time this process sees it (units an earlier router published to
// without registering them).
func (d *Delivery) units(ctx context.Context) ([]Unit, map[Unit][]source, error) {
	names, err := bus.ListDeliveryStreams(ctx, d.js)
	if err != nil {
		return nil, nil, err
	}
	byName := map[string]source{}
	var keys []string
	for _, name := range names {
		st, err := d.js.Stream(ctx, name)
		if errors.Is(err, jetstream.ErrStreamNotFound) {
			continue // deleted since listed
		}
		if err != nil {
			return nil, nil, fmt.Errorf("delivery stream %s: %w", name, err)
		}
		src, ok := sourceOf(st.CachedInfo())
		if !ok {
			continue // not a source's delivery stream (an earlier pgs2's: the router refuses it)
		}
		if !d.scanned[src.key] {
			if err := d.scan(ctx, st, src); err != nil {
				return nil, nil, err
			}
			d.scanned[src.key] = true
		}
		byName[name] = src
		keys = append(keys, src.key)
	}
	d.reg.mu.Lock()
	defer d.reg.mu.Unlock()
	streams := strings.Join(keys, " ")
	if l := d.unitList; l != nil && l.version == d.reg.version && l.streams == streams {
		return l.units, l.sources, nil
	}
	set := map[Unit][]source{}
	for _, s := range d.sinks {
		if s.cfg.Basin != "" && s.cfg.Stream != "" {
			set[Unit{s.cfg.Name, s.cfg.Basin, s.cfg.Stream}] = nil
		}
	}
	for _, ref := range d.reg.refs {
		src, ok := byName[ref.DeliveryStream]
		if !ok || bus.EscapeToken(ref.Source) != src.token {
			continue // its delivery stream is gone, or is another source's now
		}
		u := Unit{ref.Sink, ref.Basin, ref.Stream}
		if l := set[u]; !slices.Contains(l, src) {
			set[u] = append(l, src)
		}
	}
	units := make([]Unit, 0, len(set))
	for u, l := range set {
		units = append(units, u)
		slices.SortFunc(l, func(a, b source) int { return strings.Compare(a.name, b.name) })
	}
	sort.Slice(units, func(i, j int) bool { return units[i].String() < units[j].String() })
	d.unitList = &unitList{version: d.reg.version, streams: streams, units: units, sources: set}
	return units, set, nil
}

// scan lists the subjects of a delivery stream into the registry.
func (d *Delivery) scan(ctx context.Context, st jetstream.Stream, src source) error {
	info, err := st.Info(ctx, jetstream.WithSubjectFilter(bus.DeliveryRoot+".>"))
	if err != nil {
		return fmt.Errorf("list the subjects of delivery stream %s: %w", src.name, err)
	}
	for subj := range info.State.Subjects {
		if tok, sk, basin, stream, _, err := bus.ParseDeliverySubject(subj); err == nil && bus.EscapeToken(tok) == src.token {
			d.reg.add(bus.UnitRef{Source: tok, Sink: sk, Basin: basin, Stream: stream, DeliveryStream: src.name})
		}
	}
	return nil
}
