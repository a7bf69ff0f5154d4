// Package delivery appends routed changes to S2: one worker per S2 stream
// of a sink (a unit), reading the unit's messages in delivery-stream order,
// batching them, and appending with match_seq_num so retries never append
// twice. Its progress is stored with the data: every S2 record carries its
// delivery-stream sequence.
package delivery

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/config"
	"github.com/pgs2/pgs2/pkg/health"
	"github.com/pgs2/pgs2/pkg/s2sink"
)

// Config configures delivery.
type Config struct {
	DeliveryStream string
	Sinks          []config.Sink
	// Discover is how often new units (streams chosen by routing) are
	// looked for (default 1s).
	Discover time.Duration
	Replicas int
}

// Unit is one S2 stream of one sink: the unit of ordering and ownership.
type Unit struct {
	Sink, Basin, Stream string
}

func (u Unit) String() string { return u.Sink + ":" + u.Basin + "/" + u.Stream }

// Delivery runs a worker per unit.
type Delivery struct {
	cfg     Config
	js      jetstream.JetStream
	log     *slog.Logger
	state   *health.State
	sinks   map[string]*sink
	workers map[Unit]*worker
	wg      sync.WaitGroup

	failures jetstream.KeyValue
}

type sink struct {
	cfg    config.Sink
	client *s2sink.Client
}

// Option configures optional dependencies.
type Option func(*Delivery)

// WithLogger sets the logger.
func WithLogger(l *slog.Logger) Option { return func(d *Delivery) { d.log = l } }

// WithHealth reports readiness into s.
func WithHealth(s *health.State) Option { return func(d *Delivery) { d.state = s } }

// New returns a delivery. Each sink needs its S2 client settings: a cloud
// sink without a token is an error here, not at the first append.
func New(cfg Config, js jetstream.JetStream, opts ...Option) (*Delivery, error) {
	if cfg.Discover <= 0 {
		cfg.Discover = time.Second
	}
	if cfg.DeliveryStream == "" {
		cfg.DeliveryStream = bus.DefaultDeliveryStream
	}
	d := &Delivery{cfg: cfg, js: js, log: slog.Default(), state: health.NewState(), sinks: map[string]*sink{}, workers: map[Unit]*worker{}}
	for _, o := range opts {
		o(d)
	}
	for _, sc := range cfg.Sinks {
		c, err := s2sink.New(s2sink.FromSink(sc))
		if err != nil {
			return nil, fmt.Errorf("sink %q: %w", sc.Name, err)
		}
		d.sinks[sc.Name] = &sink{cfg: sc, client: c}
	}
	return d, nil
}

// Run delivers until ctx ends.
func (d *Delivery) Run(ctx context.Context) error {
	if err := EnsureParkedStream(ctx, d.js, d.cfg.Replicas); err != nil {
		return err
	}
	kv, err := EnsureFailures(ctx, d.js, d.cfg.Replicas)
	if err != nil {
		return err
	}
	d.failures = kv
	defer d.wg.Wait()
	t := time.NewTicker(d.cfg.Discover)
	defer t.Stop()
	for {
		if err := d.discover(ctx); err != nil && ctx.Err() == nil {
			d.state.SetNotReady(err.Error())
			d.log.Warn("discovering delivery units", "error", err)
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

// discover starts a worker for every unit that has messages, and for every
// sink's configured stream.
func (d *Delivery) discover(ctx context.Context) error {
	units := map[Unit]bool{}
	for _, s := range d.sinks {
		if s.cfg.Basin != "" && s.cfg.Stream != "" {
			units[Unit{s.cfg.Name, s.cfg.Basin, s.cfg.Stream}] = true
		}
	}
	st, err := d.js.Stream(ctx, d.cfg.DeliveryStream)
	if err != nil {
		return fmt.Errorf("delivery stream %s (is the router running? it creates it): %w", d.cfg.DeliveryStream, err)
	}
	info, err := st.Info(ctx, jetstream.WithSubjectFilter(bus.DeliveryRoot+".>"))
	if err != nil {
		return fmt.Errorf("list delivery subjects: %w", err)
	}
	for subj := range info.State.Subjects {
		sk, basin, stream, _, err := bus.ParseDeliverySubject(subj)
		if err != nil {
			continue
		}
		units[Unit{sk, basin, stream}] = true
	}
	for u := range units {
		if _, ok := d.workers[u]; ok {
			continue
		}
		s := d.sinks[u.Sink]
		if s == nil {
			continue // a sink removed from the config: its messages wait
		}
		w := newWorker(d, u, s, st)
		d.workers[u] = w
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			w.run(ctx)
		}()
	}
	return nil
}
