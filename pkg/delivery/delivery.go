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
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/trace"

	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/config"
	"github.com/pgs2/pgs2/pkg/fn"
	"github.com/pgs2/pgs2/pkg/health"
	"github.com/pgs2/pgs2/pkg/metrics"
	"github.com/pgs2/pgs2/pkg/restart"
	"github.com/pgs2/pgs2/pkg/s2sink"
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

	failures jetstream.KeyValue
	leases   *leases
	tracer   trace.Tracer
	metrics  *metrics.Delivery
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
		tracer: otel.Tracer("pgs2/delivery")}
	for _, o := range opts {
		o(d)
	}
	if d.metrics == nil {
		d.metrics = metrics.NewDelivery(prometheus.NewRegistry())
	}
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
		return nil, errors.Join(errs...)
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
	err := SetUp(ctx, d.log, d.state, func(ctx context.Context) (err error) {
		if err := EnsureParkedStream(ctx, d.js, d.cfg.Replicas); err != nil {
			return err
		}
		if d.failures, err = EnsureFailures(ctx, d.js, d.cfg.Replicas); err != nil {
			return err
		}
		d.leases, err = openLeases(ctx, d.js, d.cfg.LeaseTTL, d.cfg.Replicas)
		return err
	})
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	defer d.stopAll()
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
		}
	}
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
}

// balance renews the leases held, gives up those over a fair share (new
// processes joined), and claims free units up to it.
func (d *Delivery) balance(ctx context.Context) error {
	live, err := d.leases.heartbeat(ctx)
	if err != nil {
		return fmt.Errorf("heartbeat: %w", err)
	}
	for u, h := range d.held {
		select {
		case <-h.done: // the worker gave up (lost its fence)
			d.stop(ctx, u, true)
			continue
		default:
		}
		rev, err := d.leases.renew(ctx, u, h.rev)
		if errors.Is(err, ErrLeaseLost) {
			d.log.Warn("lease lost; stopping", "unit", u.String())
			d.stop(ctx, u, false)
			continue
		}
		if err != nil {
			return fmt.Errorf("renew %s: %w", u, err)
		}
		h.rev = rev
		h.w.extend(time.Now().Add(d.cfg.LeaseTTL - d.cfg.LeaseTTL/5))
	}
	units, sources, err := d.units(ctx)
	if err != nil {
		return err
	}
	for u, h := range d.held {
		h.w.setSources(sources[u]) // a new source's stream: the worker reads it too
	}
	defer func() { d.metrics.Units.Set(float64(len(d.held))) }()
	fair := (len(units) + live - 1) / live
	for i := len(units) - 1; i >= 0 && len(d.held) > fair; i-- {
		if _, ok := d.held[units[i]]; ok {
			d.log.Info("releasing a unit to another process", "unit", units[i].String())
			d.stop(ctx, units[i], true)
		}
	}
	// Start at a place of our own in the list, so processes claim different units.
	off := int(bus.Partition([]byte(d.leases.id), max(len(units), 1)))
	for k := 0; k < len(units) && len(d.held) < fair; k++ {
		u := units[(off+k)%len(units)]
		if _, ok := d.held[u]; ok {
			continue
		}
		s := d.sinks[u.Sink]
		if s == nil {
			continue // a sink removed from the config: its messages wait
		}
		rev, ok, err := d.leases.claim(ctx, u)
		if err != nil {
			return fmt.Errorf("claim %s: %w", u, err)
		}
		if !ok {
			continue
		}
		w := newWorker(d, u, s)
		w.setSources(sources[u])
		w.extend(time.Now().Add(d.cfg.LeaseTTL - d.cfg.LeaseTTL/5))
		wctx, cancel := context.WithCancel(ctx)
		h := &held{w: w, rev: rev, cancel: cancel, done: make(chan struct{})}
		d.held[u] = h
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			defer close(h.done)
			w.run(wctx)
		}()
	}
	return nil
}

// source is one source's delivery stream, as delivery reads it.
type source struct {
	name  string // the stream's
	key   string // bus.StreamKey: the stream in delivery positions
	token string // the source's subject token: pgs2.deliver.<token>.>
}

// units lists every unit that has messages, and every sink's configured
// stream, in a stable order, with the delivery streams (sources) that hold
// messages for each.
func (d *Delivery) units(ctx context.Context) ([]Unit, map[Unit][]source, error) {
	set := map[Unit][]source{}
	for _, s := range d.sinks {
		if s.cfg.Basin != "" && s.cfg.Stream != "" {
			set[Unit{s.cfg.Name, s.cfg.Basin, s.cfg.Stream}] = nil
		}
	}
	names, err := bus.ListDeliveryStreams(ctx, d.js)
	if err != nil {
		return nil, nil, err
	}
	for _, name := range names {
		st, err := d.js.Stream(ctx, name)
		if errors.Is(err, jetstream.ErrStreamNotFound) {
			continue // deleted since listed
		}
		if err != nil {
			return nil, nil, fmt.Errorf("delivery stream %s: %w", name, err)
		}
		info, err := st.Info(ctx, jetstream.WithSubjectFilter(bus.DeliveryRoot+".>"))
		if err != nil {
			return nil, nil, fmt.Errorf("list the subjects of delivery stream %s: %w", name, err)
		}
		src := source{name: name, key: bus.StreamKey(name, info.Created)}
		if subj := info.Config.Subjects; len(subj) == 1 && strings.HasPrefix(subj[0], bus.DeliveryRoot+".") && strings.HasSuffix(subj[0], ".>") {
			src.token = strings.TrimSuffix(strings.TrimPrefix(subj[0], bus.DeliveryRoot+"."), ".>")
		}
		if src.token == "" || strings.Contains(src.token, ".") {
			continue // not a source's delivery stream (an earlier pgs2's: the router refuses it)
		}
		for subj := range info.State.Subjects {
			if tok, sk, basin, stream, _, err := bus.ParseDeliverySubject(subj); err == nil && bus.EscapeToken(tok) == src.token {
				u := Unit{sk, basin, stream}
				if l := set[u]; len(l) == 0 || l[len(l)-1] != src {
					set[u] = append(l, src)
				}
			}
		}
	}
	units := make([]Unit, 0, len(set))
	for u := range set {
		units = append(units, u)
	}
	sort.Slice(units, func(i, j int) bool { return units[i].String() < units[j].String() })
	return units, set, nil
}
