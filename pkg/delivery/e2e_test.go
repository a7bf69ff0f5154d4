package delivery_test

import (
	"context"
	"encoding/json"
	"log/slog"
	"net/http/httptest"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/s2-streamstore/s2-sdk-go/s2"

	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/capture"
	"github.com/pgs2/pgs2/pkg/config"
	"github.com/pgs2/pgs2/pkg/delivery"
	"github.com/pgs2/pgs2/pkg/health"
	"github.com/pgs2/pgs2/pkg/natstest"
	"github.com/pgs2/pgs2/pkg/pgrepl"
	"github.com/pgs2/pgs2/pkg/pgtest"
	"github.com/pgs2/pgs2/pkg/router"
	"github.com/pgs2/pgs2/pkg/s2local"
	"github.com/pgs2/pgs2/pkg/s2sink"
)

// pipeline is the whole of pgs2 in this process: a real Postgres, a real
// JetStream, s2local, and capture, router and delivery.
type pipeline struct {
	pg     *pgtest.Instance
	ns     *natstest.Server
	js     jetstream.JetStream
	s2     *s2local.Server
	s2url  string
	client *s2sink.Client
	tables []string
	sinks  []config.Sink
	// manualStreams leaves each sink's create_stream as the test set it.
	manualStreams bool
	// routerProcess: the test runs the router itself (as a process).
	routerProcess bool
	stopDelivery  func()
	delivery      *delivery.Delivery // the last one started
	// discover is delivery's Discover (default 100 ms).
	discover time.Duration
	registry *prometheus.Registry
}

func newPipeline(t *testing.T, schema string, tables []string, basins ...string) *pipeline {
	t.Helper()
	p := &pipeline{pg: pgtest.New(t), ns: natstest.New(t), tables: tables}
	p.pg.MustExec(t, "postgres", "CREATE DATABASE app")
	p.pg.MustExec(t, "app", schema)
	_, p.js = p.ns.Connect(t)
	var err error
	p.s2, err = s2local.New(s2local.Options{})
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(p.s2)
	t.Cleanup(func() { hs.Close(); p.s2.Close() })
	p.s2url = hs.URL
	p.client, _ = s2sink.New(s2sink.Config{Endpoint: hs.URL})
	for _, b := range basins {
		if _, err := p.client.SDK().Basins.Create(context.Background(), s2.CreateBasinArgs{Basin: s2.BasinName(b)}); err != nil {
			t.Fatalf("create basin %s: %v", b, err)
		}
	}
	return p
}

// quiet logs errors only (everything with PGS2_TEST_LOG=debug).
func quiet() *slog.Logger {
	lvl := slog.LevelError
	if os.Getenv("PGS2_TEST_LOG") == "debug" {
		lvl = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
}

// start runs the three services until the test ends.
func (p *pipeline) start(t *testing.T) {
	t.Helper()
	p.startPipelineWithoutDelivery(t)
	p.stopDelivery = p.startDelivery(t, p.sinks)
	t.Cleanup(func() { p.stopDelivery() })
}

// startPipelineWithoutDelivery runs capture and router until the test ends.
func (p *pipeline) startPipelineWithoutDelivery(t *testing.T) {
	t.Helper()
	for i := range p.sinks {
		s := &p.sinks[i]
		s.Endpoint = p.s2url
		if !p.manualStreams {
			s.CreateStream = true
		}
		if s.Batch.MaxRecords == 0 {
			s.Batch = config.Batch{MaxRecords: 1000, MaxBytes: 1 << 20, Linger: config.Duration(5 * time.Millisecond)}
		}
		if s.Retry.Initial == 0 {
			s.Retry = config.Retry{Initial: config.Duration(50 * time.Millisecond), Max: config.Duration(time.Second)}
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 3)
	state := health.NewState()
	c := capture.New(capture.Config{Source: "app",
		Repl:       pgrepl.Config{DSN: p.pg.DSN("app"), Slot: "pgs2", Publication: "pgs2", Tables: p.tables},
		Stream:     bus.ChangesStreamConfig{Name: "PGS2_CHANGES", Source: "app", Replicas: 1, DuplicateWindow: time.Minute},
		Partitions: 8, StatusInterval: 100 * time.Millisecond}, p.js, capture.WithLogger(quiet()), capture.WithHealth(state))
	go func() { done <- c.Run(ctx) }()
	for ready := false; !ready; ready, _ = state.Ready() {
		time.Sleep(20 * time.Millisecond)
	}
	if p.routerProcess {
		done <- nil
	} else {
		r, err := router.New(router.Config{Source: "app", ChangesStream: "PGS2_CHANGES",
			Delivery: bus.DeliveryStreamConfig{Name: "PGS2_DELIVERY", Source: "app", Replicas: 1, DuplicateWindow: time.Minute},
			Sinks:    p.sinks}, p.js, router.WithLogger(quiet()))
		if err != nil {
			t.Fatal(err)
		}
		go func() { done <- r.Run(ctx) }()
	}
	t.Cleanup(func() {
		cancel()
		for i := 0; i < 2; i++ {
			if err := <-done; err != nil {
				t.Errorf("service: %v", err)
			}
		}
	})
}

// startDelivery runs a delivery with the given sinks; the returned func
// stops it (at most once).
func (p *pipeline) startDelivery(t *testing.T, sinks []config.Sink) func() {
	t.Helper()
	p.registry = prometheus.NewRegistry()
	discover := p.discover
	if discover == 0 {
		discover = 100 * time.Millisecond
	}
	d, err := delivery.New(delivery.Config{Sinks: sinks, Discover: discover, Replicas: 1}, p.js,
		delivery.WithLogger(quiet()), delivery.WithMetrics(p.registry))
	if err != nil {
		t.Fatal(err)
	}
	p.delivery = d
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	var once sync.Once
	return func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("delivery: %v", err)
			}
		})
	}
}

type record struct {
	Seq     uint64
	TS      uint64
	Headers map[string]string
	Body    map[string]any
	Raw     string
}

// records waits until basin/stream holds n records and returns them.
func (p *pipeline) records(t *testing.T, basin, stream string, n int) []record {
	t.Helper()
	return p.recordsWithin(t, basin, stream, n, time.Minute)
}

func (p *pipeline) recordsWithin(t *testing.T, basin, stream string, n int, within time.Duration) []record {
	t.Helper()
	ctx := context.Background()
	deadline := time.Now().Add(within)
	var out []record
	for {
		out = out[:0]
		var start uint64
		for {
			count := uint64(1000)
			b, err := p.client.SDK().Basin(basin).Stream(s2.StreamName(stream)).Read(ctx, &s2.ReadOptions{SeqNum: &start, Count: &count})
			if err != nil || len(b.Records) == 0 {
				break
			}
			for _, r := range b.Records {
				if len(r.Headers) == 1 && len(r.Headers[0].Name) == 0 {
					continue // a command record (fence)
				}
				rec := record{Seq: r.SeqNum, TS: r.Timestamp, Headers: map[string]string{}, Raw: string(r.Body)}
				for _, h := range r.Headers {
					rec.Headers[string(h.Name)] = string(h.Value)
				}
				_ = json.Unmarshal(r.Body, &rec.Body)
				out = append(out, rec)
			}
			start = b.Records[len(b.Records)-1].SeqNum + 1
		}
		if len(out) >= n || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if len(out) != n {
		t.Fatalf("%s/%s holds %d records, want %d", basin, stream, len(out), n)
	}
	return out
}
