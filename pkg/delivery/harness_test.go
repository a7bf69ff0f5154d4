package delivery

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net/http/httptest"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/s2-streamstore/s2-sdk-go/s2"
	"go.opentelemetry.io/otel"

	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/config"
	"github.com/pgs2/pgs2/pkg/fn"
	"github.com/pgs2/pgs2/pkg/health"
	"github.com/pgs2/pgs2/pkg/metrics"
	"github.com/pgs2/pgs2/pkg/natstest"
	"github.com/pgs2/pgs2/pkg/s2local"
	"github.com/pgs2/pgs2/pkg/s2sink"
)

// harness runs workers alone: a JetStream from natstest holding the
// delivery, park and failure streams, and an in-process S2 (s2local in
// memory, through its HTTP API), with test seams around both.
type harness struct {
	t      testing.TB
	ns     *natstest.Server
	nc     *nats.Conn
	js     jetstream.JetStream
	client *s2sink.Client
	s2     *s2local.Server // behind client (faults)
	fails  jetstream.KeyValue
	src    source   // the test source's delivery stream
	srcs   []source // it and a second source's
}

// The test source and its delivery stream, and a second one.
const (
	testSource  = "app"
	testStream  = "PGS2_DELIVERY"
	otherSource = "crm"
	otherStream = "CRM_DELIVERY"
)

const testBasin = "test-basin"

func newHarness(t testing.TB) *harness {
	t.Helper()
	h := &harness{t: t, ns: natstest.New(t)}
	h.nc, h.js = h.ns.Connect(t)
	ctx := context.Background()
	h.srcs = h.sources(ctx, testSource, testStream, otherSource, otherStream)
	h.src = h.srcs[0]
	var err error
	if _, err := EnsureParkedStream(ctx, h.js, 1); err != nil {
		t.Fatal(err)
	}
	if h.fails, err = EnsureFailures(ctx, h.js, 1); err != nil {
		t.Fatal(err)
	}
	srv, err := s2local.New(s2local.Options{Basins: []string{testBasin}})
	if err != nil {
		t.Fatal(err)
	}
	h.s2 = srv
	hs := httptest.NewServer(srv)
	t.Cleanup(func() { hs.Close(); srv.Close() })
	if h.client, err = s2sink.New(s2sink.Config{Endpoint: hs.URL}); err != nil {
		t.Fatal(err)
	}
	return h
}

// sources makes the delivery streams of the sources named in pairs
// (source, stream).
func (h *harness) sources(ctx context.Context, pairs ...string) []source {
	h.t.Helper()
	var out []source
	for i := 0; i+1 < len(pairs); i += 2 {
		src, name := pairs[i], pairs[i+1]
		ds, err := bus.EnsureDeliveryStream(ctx, h.js, bus.DeliveryStreamConfig{Name: name, Source: src, Replicas: 1, DuplicateWindow: time.Minute})
		if err != nil {
			h.t.Fatal(err)
		}
		out = append(out, source{name: name, key: bus.StreamKey(name, ds.CachedInfo().Created), token: src})
	}
	return out
}

// own returns a harness like h whose workers read two delivery streams
// of their own (sources named after tag), and a function deleting them:
// a process reads all of a delivery stream (fanout), so workers of
// unrelated tests sharing one would each read all the others' messages.
func (h *harness) own(tag string) (*harness, func()) {
	ctx := context.Background()
	o := *h
	o.srcs = h.sources(ctx, "a"+tag, "A"+tag, "b"+tag, "B"+tag)
	o.src = o.srcs[0]
	return &o, func() {
		for _, s := range o.srcs {
			_ = h.js.DeleteStream(ctx, s.name)
		}
	}
}

func testLogger() *slog.Logger {
	lvl := slog.LevelError + 4 // silent
	switch os.Getenv("PGS2_TEST_LOG") {
	case "debug":
		lvl = slog.LevelDebug
	case "warn":
		lvl = slog.LevelWarn
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
}

// delivery is a delivery process as a worker sees it, with fencing token
// token, talking to JetStream through js.
func (h *harness) delivery(token string, js jetstream.JetStream) *Delivery {
	l := &leases{id: token}
	l.until.Store(math.MaxInt64) // the process's lease holds; a test lapses a worker's
	d := &Delivery{cfg: Config{}, js: js, log: testLogger(), state: health.NewState(),
		sinks: map[string]*sink{}, held: map[Unit]*held{}, failures: h.fails, leases: l,
		tracer: otel.Tracer("test"), metrics: metrics.NewDelivery(prometheus.NewRegistry())}
	retries, err := d.serveRetries() // as Run does
	if err != nil {
		h.t.Fatal(err)
	}
	h.t.Cleanup(func() { _ = retries.Unsubscribe() })
	return d
}

// sink is a sink of one stream writing through a.
func (h *harness) sink(u Unit, a appender, retry config.Retry) *sink {
	fns, err := fn.Compile(u.Sink, "", "", "")
	if err != nil {
		h.t.Fatal(err)
	}
	s := &sink{cfg: config.Sink{Name: u.Sink, Basin: u.Basin, Stream: u.Stream, CreateStream: true,
		Batch: config.Batch{MaxRecords: 1000, MaxBytes: 1 << 20, Linger: config.Duration(2 * time.Millisecond)}, Retry: retry}, client: a}
	s.fns.Store(fns)
	return s
}

// start runs a worker for u until the returned stop is called (or it stops
// by itself: the returned channel closes).
func (h *harness) start(d *Delivery, u Unit, s *sink) (w *worker, stop func(), done <-chan struct{}) {
	w = newWorker(d, u, s)
	w.setSources(h.srcs)
	w.extend(time.Now().Add(time.Hour))
	ctx, cancel := context.WithCancel(context.Background())
	ch := make(chan struct{})
	d.workers.Store(u, w) // as balance does
	go func() {
		defer close(ch)
		defer d.workers.CompareAndDelete(u, w)
		w.run(ctx)
	}()
	var once sync.Once
	return w, func() { once.Do(func() { cancel(); <-ch }) }, ch
}

// publish stores one delivery message of u holding entries, from the
// test source.
func (h *harness) publish(u Unit, partition int, entries ...bus.Entry) {
	h.t.Helper()
	h.publishFrom(testSource, u, partition, entries...)
}

// publishFrom stores one delivery message of u holding entries, from
// source (testSource or otherSource).
func (h *harness) publishFrom(source string, u Unit, partition int, entries ...bus.Entry) {
	h.t.Helper()
	var b bus.BatchBuilder
	for i := range entries {
		b.Add(&entries[i])
	}
	subj := bus.DeliverySubject(source, u.Sink, u.Basin, u.Stream, fmt.Sprint(partition))
	if _, err := h.js.Publish(context.Background(), subj, b.Bytes()); err != nil {
		h.t.Fatal(err)
	}
}

// records returns the S2 stream's records that delivery wrote (not
// commands, not other writers'), in order.
func (h *harness) records(u Unit) []s2.SequencedRecord {
	h.t.Helper()
	ctx := context.Background()
	var out []s2.SequencedRecord
	for seq := uint64(0); ; {
		recs, err := h.client.Read(ctx, u.Basin, u.Stream, seq, 1000)
		if e := s2sink.Classify(err); e != nil && e.Status == 416 { // at the tail
			return out
		}
		if notFound(err) {
			return nil
		}
		if err != nil {
			h.t.Error(err)
			return out
		}
		if len(recs) == 0 {
			return out
		}
		for _, r := range recs {
			if recordPos(&r) != "" {
				out = append(out, r)
			}
		}
		seq = recs[len(recs)-1].SeqNum + 1
	}
}

// header is a record's header value.
func header(r *s2.SequencedRecord, name string) string {
	for _, h := range r.Headers {
		if string(h.Name) == name {
			return string(h.Value)
		}
	}
	return ""
}

// waitRecords waits until u's stream holds at least n of delivery's
// records and returns them.
func (h *harness) waitRecords(u Unit, n int, within time.Duration) []s2.SequencedRecord {
	h.t.Helper()
	deadline := time.Now().Add(within)
	for {
		recs := h.records(u)
		if len(recs) >= n || time.Now().After(deadline) {
			return recs
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// entry is a change of group g with key k and body size n.
func entry(table string, g int, k string, body []byte) bus.Entry {
	return bus.Entry{Key: []byte(k), Group: fmt.Appendf(nil, `["%d"]`, g), Action: []byte("update"), Table: []byte(table), CommitMs: 1, Body: body}
}

// faultyS2 is a test seam around a worker's S2: plan decides, for each call
// (numbered from 1), whether it fails and how.
type faultyS2 struct {
	appender
	mu    sync.Mutex
	calls int
	plan  func(call int, op string) s2Fault
	// before runs before a call is made (a foreign writer appends, say).
	before func(call int, op string)
}

// s2Fault is what happens to one S2 call.
type s2Fault int

const (
	s2OK           s2Fault = iota
	s2FailBefore           // 503 without effect
	s2FailAfter            // the call takes effect, then 504
	s2TimeoutAfter         // the call takes effect, then no answer
	s2Crash                // the call takes effect, then the session ends (a crash)
)

var errCrash = errors.New("simulated crash")

func (f *faultyS2) next(op string) (int, s2Fault) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	if f.before != nil {
		f.before(f.calls, op)
	}
	if f.plan == nil {
		return f.calls, s2OK
	}
	return f.calls, f.plan(f.calls, op)
}

func (f *faultyS2) fail(fault s2Fault, op string, err error) error {
	switch fault {
	case s2FailBefore:
		return &s2sink.Error{Op: op, Class: s2sink.RetrySoon, Status: 503, Code: "unavailable", Message: "injected"}
	case s2FailAfter:
		if err == nil {
			return &s2sink.Error{Op: op, Class: s2sink.RetrySoon, Status: 504, Code: "upstream_timeout", Message: "injected", MayHaveTakenEffect: true}
		}
	case s2TimeoutAfter:
		if err == nil {
			return &s2sink.Error{Op: op, Class: s2sink.RetrySoon, Message: "timed out: injected", MayHaveTakenEffect: true}
		}
	case s2Crash:
		return errCrash
	}
	return err
}

func (f *faultyS2) AppendFenced(ctx context.Context, basin, stream string, b *s2sink.Batch, match *uint64, token *string) (s2sink.Ack, error) {
	_, fault := f.next("append")
	if fault == s2FailBefore {
		return s2sink.Ack{}, f.fail(fault, "append", nil)
	}
	ack, err := f.appender.AppendFenced(ctx, basin, stream, b, match, token)
	if err := f.fail(fault, "append", err); err != nil {
		return s2sink.Ack{}, err
	}
	return ack, nil
}

func (f *faultyS2) Read(ctx context.Context, basin, stream string, seq uint64, count int) ([]s2.SequencedRecord, error) {
	if _, fault := f.next("read"); fault == s2FailBefore || fault == s2Crash {
		return nil, f.fail(fault, "read", nil)
	}
	return f.appender.Read(ctx, basin, stream, seq, count)
}

func (f *faultyS2) Fence(ctx context.Context, basin, stream, token string) (uint64, error) {
	_, fault := f.next("fence")
	if fault == s2FailBefore {
		return 0, f.fail(fault, "fence", nil)
	}
	tail, err := f.appender.Fence(ctx, basin, stream, token)
	if err := f.fail(fault, "fence", err); err != nil {
		return 0, err
	}
	return tail, nil
}

// faultyJS is a test seam around a worker's JetStream: publishes to the
// park stream and its purges can be failed, before or after their effect,
// or held until the test lets them go.
type faultyJS struct {
	jetstream.JetStream
	mu    sync.Mutex
	calls int
	plan  func(call int, op string) s2Fault
	// hold, when set, is called before a park publish and may block it
	// (until ctx ends).
	hold func(ctx context.Context, subject string)
}

func (j *faultyJS) next(op string) s2Fault {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.calls++
	if j.plan == nil {
		return s2OK
	}
	return j.plan(j.calls, op)
}

var errInjected = errors.New("injected JetStream failure")

func (j *faultyJS) PublishMsg(ctx context.Context, m *nats.Msg, opts ...jetstream.PublishOpt) (*jetstream.PubAck, error) {
	if bytes.HasPrefix([]byte(m.Subject), []byte(ParkRoot+".")) {
		if j.hold != nil {
			j.hold(ctx, m.Subject)
		}
		switch j.next("park") {
		case s2FailBefore:
			return nil, errInjected
		case s2FailAfter, s2TimeoutAfter, s2Crash:
			_, _ = j.JetStream.PublishMsg(ctx, m, opts...)
			return nil, errInjected
		}
	}
	return j.JetStream.PublishMsg(ctx, m, opts...)
}

func (j *faultyJS) Stream(ctx context.Context, name string) (jetstream.Stream, error) {
	st, err := j.JetStream.Stream(ctx, name)
	if err != nil || name != ParkedStream {
		return st, err
	}
	return &faultyStream{Stream: st, j: j}, nil
}

type faultyStream struct {
	jetstream.Stream
	j *faultyJS
}

func (s *faultyStream) Purge(ctx context.Context, opts ...jetstream.StreamPurgeOpt) error {
	switch s.j.next("purge") {
	case s2FailBefore:
		return errInjected
	case s2FailAfter, s2TimeoutAfter, s2Crash:
		_ = s.Stream.Purge(ctx, opts...)
		return errInjected
	}
	return s.Stream.Purge(ctx, opts...)
}

// seeds reads a seeded test's count (from env countVar, default n) and
// first seed (PGS2_SEED, default the clock).
func seeds(countVar string, n int) (int, uint64) {
	if v, err := strconv.Atoi(os.Getenv(countVar)); err == nil {
		n = v
	}
	seed0 := uint64(time.Now().UnixNano())
	if v, err := strconv.ParseUint(os.Getenv("PGS2_SEED"), 10, 64); err == nil {
		seed0 = v
	}
	return n, seed0
}
