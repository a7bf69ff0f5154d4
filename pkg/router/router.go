// Package router applies each sink's functions to the changes of a source
// and republishes them, in order, to the subjects delivery consumes:
// `pgs2.deliver.<sink>.<basin>.<stream>.<partition>`.
package router

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/change"
	"github.com/pgs2/pgs2/pkg/config"
	"github.com/pgs2/pgs2/pkg/fn"
	"github.com/pgs2/pgs2/pkg/health"
	"github.com/pgs2/pgs2/pkg/telemetry"
)

// Config configures a router.
type Config struct {
	Source        string
	ChangesStream string
	Delivery      bus.DeliveryStreamConfig
	Sinks         []config.Sink
	// Window is how many outputs may await their PubAck (default 4096).
	Window int
}

// Router runs routing sessions.
type Router struct {
	cfg    Config
	nc     *nats.Conn
	js     jetstream.JetStream
	log    *slog.Logger
	state  *health.State
	sinks  atomic.Pointer[Sinks]
	tracer trace.Tracer
}

// Option configures optional dependencies.
type Option func(*Router)

// WithLogger sets the logger.
func WithLogger(l *slog.Logger) Option { return func(r *Router) { r.log = l } }

// WithHealth reports readiness into s.
func WithHealth(s *health.State) Option { return func(r *Router) { r.state = s } }

// New compiles the sinks' functions and returns a router.
func New(cfg Config, js jetstream.JetStream, opts ...Option) (*Router, error) {
	if cfg.Window <= 0 {
		cfg.Window = 4096
	}
	sinks, err := CompileSinks(cfg.Sinks)
	if err != nil {
		return nil, err
	}
	r := &Router{cfg: cfg, nc: js.Conn(), js: js, log: slog.Default(), state: health.NewState(), tracer: otel.Tracer("pgs2/router")}
	r.sinks.Store(sinks)
	for _, o := range opts {
		o(r)
	}
	return r, nil
}

// Reload replaces the sinks (SIGHUP). The new functions apply from the next
// change on; a config whose functions do not compile is refused and the
// router keeps the old one.
func (r *Router) Reload(cfg []config.Sink) error {
	sinks, err := CompileSinks(cfg)
	if err != nil {
		return err
	}
	r.sinks.Store(sinks)
	return nil
}

// Run routes until ctx ends, restarting sessions after failures.
//
// The router's progress lives in the delivery stream itself: its last
// output names the input it came from (Pgs2-Input-Seq), so a session reads
// the changes stream in order from there with an ordered consumer. A
// durable pull consumer would not do: after a crash it redelivers the dead
// client's unacknowledged messages only when their AckWait expires, while
// handing later messages to the new client at once — a reorder, and with
// AckAll the earlier ones would then be acknowledged unrouted.
func (r *Router) Run(ctx context.Context) error {
	if _, err := bus.EnsureDeliveryStream(ctx, r.js, r.cfg.Delivery); err != nil {
		return err
	}
	backoff := 100 * time.Millisecond
	for {
		started := time.Now()
		err := r.session(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if time.Since(started) > 30*time.Second {
			backoff = 100 * time.Millisecond
		}
		r.state.SetNotReady(err.Error())
		r.log.Warn("router session ended; restarting", "error", err, "retry_in", backoff)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 5*time.Second)
	}
}

// resume is the last output the delivery stream holds: outputs at or
// before it are not published again.
type resume struct {
	pos  change.Position
	sink string
	set  bool
}

func parseOutputID(id string) (resume, error) {
	if id == "" {
		return resume{}, nil
	}
	key, sink, ok := strings.Cut(id, ":")
	if !ok {
		return resume{}, fmt.Errorf("delivery message id %q is not <key>:<sink>", id)
	}
	pos, err := change.ParseKey(key)
	if err != nil {
		return resume{}, err
	}
	return resume{pos: pos, sink: sink, set: true}, nil
}

// done reports whether the output of change pos for the sink at order i
// is already stored.
func (rs resume) done(pos change.Position, sinks *Sinks, i int) bool {
	if !rs.set || rs.pos.Less(pos) {
		return false
	}
	if pos.Less(rs.pos) {
		return true
	}
	last, ok := sinks.order[rs.sink]
	if !ok { // that sink is gone from the config: its position is finished
		return true
	}
	return sinks.order[sinks.list[i].Name] <= last
}

// lastOutput reads the delivery stream's last message: its id, and the
// changes-stream sequence it was routed from.
func (r *Router) lastOutput(ctx context.Context) (id string, inputSeq uint64, err error) {
	delivery, err := r.js.Stream(ctx, r.cfg.Delivery.Name)
	if err != nil {
		return "", 0, fmt.Errorf("delivery stream %s: %w", r.cfg.Delivery.Name, err)
	}
	m, err := delivery.GetLastMsgForSubject(ctx, bus.DeliveryRoot+".>")
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return "", 0, nil
	}
	if err != nil {
		return "", 0, fmt.Errorf("read the delivery stream's last message: %w", err)
	}
	id = m.Header.Get(bus.HeaderMsgID)
	inputSeq, err = strconv.ParseUint(m.Header.Get(bus.HeaderInputSeq), 10, 64)
	if err != nil || id == "" {
		return "", 0, fmt.Errorf("delivery message %d lacks %s or %s", m.Sequence, bus.HeaderMsgID, bus.HeaderInputSeq)
	}
	return id, inputSeq, nil
}

func (r *Router) session(ctx context.Context) error {
	lastID, inputSeq, err := r.lastOutput(ctx)
	if err != nil {
		return err
	}
	rs, err := parseOutputID(lastID)
	if err != nil {
		return err
	}
	occ := jetstream.OrderedConsumerConfig{FilterSubjects: []string{bus.ChangesFilter(r.cfg.Source)}}
	if inputSeq > 0 { // from the input of the last output: its other sinks may be missing
		occ.DeliverPolicy, occ.OptStartSeq = jetstream.DeliverByStartSequencePolicy, inputSeq
	}
	cons, err := r.js.OrderedConsumer(ctx, r.cfg.ChangesStream, occ)
	if err != nil {
		return fmt.Errorf("read %s (is capture running? it creates the stream): %w", r.cfg.ChangesStream, err)
	}
	pub, err := bus.NewPublisher(r.nc, lastID, 0, bus.PublisherOptions{Window: r.cfg.Window})
	if err != nil {
		return err
	}
	it, err := cons.Messages(jetstream.PullMaxMessages(2 * r.cfg.Window))
	if err != nil {
		_ = pub.Close(ctx)
		return fmt.Errorf("read %s: %w", r.cfg.ChangesStream, err)
	}
	s := &session{Router: r, pub: pub, resume: rs}
	stop := context.AfterFunc(ctx, it.Stop)
	r.state.SetReady()
	r.log.Info("routing", "source", r.cfg.Source, "from_seq", inputSeq, "resume_after", lastID)

	runErr := s.run(ctx, it)
	stop()
	it.Stop()
	cctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	closeErr := pub.Close(cctx)
	if ctx.Err() != nil {
		return closeErr
	}
	if runErr == nil {
		runErr = closeErr
	}
	return runErr
}

type session struct {
	*Router
	pub     *bus.Publisher
	resume  resume
	lastSeq uint64
	out     []byte // reused output body
}

func (s *session) run(ctx context.Context, it jetstream.MessagesContext) error {
	for {
		msg, err := it.Next()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, jetstream.ErrMsgIteratorClosed) {
				return ctx.Err()
			}
			return fmt.Errorf("next change: %w", err)
		}
		if err := s.pub.Err(); err != nil {
			return err
		}
		md, err := msg.Metadata()
		if err != nil {
			return fmt.Errorf("change metadata: %w", err)
		}
		seq := md.Sequence.Stream
		if seq <= s.lastSeq {
			continue
		}
		s.lastSeq = seq
		if err := s.route(ctx, msg, seq); err != nil {
			return err
		}
	}
}

var (
	actionField = []byte(`"action":"`)
	commitField = []byte(`"commit_timestamp":"`)
)

// field returns the string value after the last occurrence of name. The
// metadata of a change is written last, so the last occurrence is the
// real one.
func field(body, name []byte) string {
	i := bytes.LastIndex(body, name)
	if i < 0 {
		return ""
	}
	rest := body[i+len(name):]
	j := bytes.IndexByte(rest, '"')
	if j < 0 {
		return ""
	}
	return string(rest[:j])
}

func (s *session) route(ctx context.Context, msg jetstream.Msg, seq uint64) error {
	_, schema, table, partition, err := bus.ParseChangeSubject(msg.Subject())
	if err != nil {
		return err
	}
	sinks := s.sinks.Load()
	idxs := sinks.byTable[schema+"."+table]
	if len(idxs) == 0 {
		return nil
	}
	h := msg.Headers()
	key := h.Get(bus.HeaderMsgID)
	pos, err := change.ParseKey(key)
	if err != nil {
		return fmt.Errorf("change on %s: %w", msg.Subject(), err)
	}
	body := msg.Data()
	group := []byte(h.Get(bus.HeaderGroup))
	traceparent := h.Get(bus.HeaderTraceParent)
	if telemetry.Enabled() {
		parent := trace.ContextWithRemoteSpanContext(ctx, telemetry.ParseTraceParent(traceparent))
		_, span := s.tracer.Start(parent, "route change", trace.WithSpanKind(trace.SpanKindConsumer),
			trace.WithAttributes(attribute.String("pgs2.table", schema+"."+table), attribute.String("pgs2.key", key)))
		defer span.End()
		if tp := telemetry.TraceParent(span.SpanContext()); tp != "" {
			traceparent = tp
		}
	}
	action := field(body, actionField)
	commitMs := ""
	if ts, err := time.Parse(time.RFC3339Nano, field(body, commitField)); err == nil {
		commitMs = strconv.FormatInt(ts.UnixMilli(), 10)
	}
	s.pub.SetHeader(bus.HeaderKey, key)
	s.pub.SetHeader(bus.HeaderAction, action)
	s.pub.SetHeader(bus.HeaderTable, schema+"."+table)
	s.pub.SetHeader(bus.HeaderCommitMs, commitMs)
	s.pub.SetHeader(bus.HeaderInputSeq, strconv.FormatUint(seq, 10))

	var in *fn.Input
	var inErr error
	upstream := h.Get(bus.HeaderError) // capture could not publish the change itself
	for _, i := range idxs {
		if s.resume.done(pos, sinks, i) {
			continue
		}
		sk := sinks.list[i]
		basin, stream, out, failure, keep := sk.Basin, sk.Stream, []byte(nil), "", true
		if upstream != "" {
			out, failure = s.splice(body, sk), upstream
		} else if sk.Functions.Empty() {
			out = s.splice(body, sk)
		} else {
			if in == nil && inErr == nil {
				in, inErr = fn.ParseInput(body)
			}
			basin, stream, out, failure, keep = s.apply(sk, in, inErr, body)
		}
		if !keep {
			continue
		}
		s.pub.SetHeader(bus.HeaderError, failure)
		if err := s.pub.Publish(ctx, bus.DeliverySubject(sk.Name, basin, stream, partition), key+":"+sk.Name, group, out, traceparent); err != nil {
			return err
		}
	}
	return nil
}

// apply runs a sink's functions. A runtime error or an invalid routing
// result becomes a failure: the original change goes on, marked, to the
// sink's own basin and stream, and delivery parks it with its group.
func (s *session) apply(sk *Sink, in *fn.Input, inErr error, body []byte) (basin, stream string, out []byte, failure string, keep bool) {
	basin, stream = sk.Basin, sk.Stream
	fail := func(err error) (string, string, []byte, string, bool) {
		return sk.Basin, sk.Stream, s.splice(body, sk), err.Error(), true
	}
	if inErr != nil {
		return fail(inErr)
	}
	ok, err := sk.Functions.Keep(in)
	if err != nil {
		return fail(err)
	}
	if !ok {
		return "", "", nil, "", false
	}
	b, st, err := sk.Functions.Route(in)
	if err != nil {
		return fail(err)
	}
	if b != "" {
		basin = b
	}
	if st != "" {
		stream = st
	}
	if err := validTarget(basin, stream); err != nil {
		return fail(&fn.RuntimeError{Sink: sk.Name, Kind: fn.Routing, Err: err})
	}
	if sk.Functions.HasTransform() {
		out, err = sk.Functions.TransformBody(in)
		if err != nil {
			return fail(err)
		}
		return basin, stream, out, "", true
	}
	return basin, stream, s.splice(body, sk), "", true
}

// splice writes `"consumer":{"name":<sink>}` as the last field of metadata.
// The publisher copies the body, so the buffer is reused.
func (s *session) splice(body []byte, sk *Sink) []byte {
	if !bytes.HasSuffix(body, []byte("}}")) {
		return body
	}
	s.out = append(s.out[:0], body[:len(body)-2]...)
	s.out = append(s.out, sk.consumer...)
	s.out = append(s.out, "}}"...)
	return s.out
}
