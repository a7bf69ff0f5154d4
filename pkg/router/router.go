// Package router applies each sink's functions to the changes of a source
// and republishes them, in order, to the subjects delivery consumes:
// `pgs2.deliver.<sink>.<basin>.<stream>.<partition>`.
package router

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/config"
	"github.com/pgs2/pgs2/pkg/fn"
	"github.com/pgs2/pgs2/pkg/health"
	"github.com/pgs2/pgs2/pkg/metrics"
	"github.com/pgs2/pgs2/pkg/restart"
	"github.com/pgs2/pgs2/pkg/service"
	"github.com/pgs2/pgs2/pkg/sinkstate"
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
	// MaxBatchBytes caps a delivery message's body (default 1 MiB, and
	// never above the NATS server's max_payload).
	MaxBatchBytes int
	// Linger is how long a round may wait for more inputs once none is
	// waiting (default 1ms): larger rounds make larger delivery messages.
	Linger time.Duration
}

// Router runs routing sessions.
type Router struct {
	cfg     Config
	nc      *nats.Conn
	js      jetstream.JetStream
	log     *slog.Logger
	state   *health.State
	sinks   atomic.Pointer[Sinks]
	tracer  trace.Tracer
	metrics *metrics.Router
	// wrap, when set (a test seam), wraps each session's publisher.
	wrap func(chain) chain
	// units registers the S2 streams routed to, for delivery to find.
	units *bus.Units
	// registered are the delivery subjects whose unit is registered.
	registered map[string]bool
	// lease makes this router its source's only one.
	lease *bus.Lease
	// states are the sinks' states: nothing is routed to a disabled sink.
	states *sinkstate.Table
	sinkKV jetstream.KeyValue
	// For status requests: whether this router holds the lease, the last
	// input read and what the stream held beyond it then.
	active    atomic.Bool
	lastInput atomic.Uint64
	pendingIn atomic.Uint64
}

// chain is what a session needs of its publisher (bus.Publisher has it).
type chain interface {
	Publish(ctx context.Context, subject, id string, body []byte) error
	SetHeader(name, value string)
	Err() error
	// Failed is closed once the publisher broke (a lost connection, no
	// PubAck in time): the session ends then, not at its next input.
	Failed() <-chan struct{}
	// InFlight is the number of published messages not yet acknowledged.
	InFlight() int
	Close(ctx context.Context) error
}

// Option configures optional dependencies.
type Option func(*Router)

// WithLogger sets the logger.
func WithLogger(l *slog.Logger) Option { return func(r *Router) { r.log = l } }

// WithHealth reports readiness into s.
func WithHealth(s *health.State) Option { return func(r *Router) { r.state = s } }

// WithMetrics registers the router's metrics in r, labelled with the
// source.
func WithMetrics(r prometheus.Registerer, source string) Option {
	return func(rt *Router) {
		if r != nil {
			rt.metrics = metrics.NewRouter(metrics.WithSource(r, source))
		}
	}
}

// New compiles the sinks' functions and returns a router.
func New(cfg Config, js jetstream.JetStream, opts ...Option) (*Router, error) {
	if cfg.Window <= 0 {
		cfg.Window = 4096
	}
	if cfg.MaxBatchBytes <= 0 {
		cfg.MaxBatchBytes = bus.MaxBatchBytes
	}
	if cfg.Linger <= 0 {
		cfg.Linger = time.Millisecond
	}
	sinks, err := CompileSinks(cfg.Sinks)
	if err != nil {
		return nil, err
	}
	r := &Router{cfg: cfg, nc: js.Conn(), js: js, log: slog.Default(), state: health.NewState(), tracer: otel.Tracer("pgs2/router"),
		states: sinkstate.NewTable(nil)}
	for _, o := range opts {
		o(r)
	}
	if r.metrics == nil {
		r.metrics = metrics.NewRouter(prometheus.NewRegistry())
	}
	r.sinks.Store(sinks.bind(r.metrics))
	return r, nil
}

// Reload replaces the sinks (SIGHUP). The new functions apply from the next
// change on; a config whose functions do not compile is refused and the
// router keeps the old one.
func (r *Router) Reload(cfg []config.Sink) error {
	sinks, err := CompileSinks(cfg)
	if err != nil {
		return service.Refuse(err)
	}
	if r.sinkKV != nil { // a status: changed in the config applies now
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := sinkstate.Apply(ctx, r.sinkKV, cfg); err != nil {
			return err
		}
	}
	r.sinks.Store(sinks.bind(r.metrics))
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
	err := restart.Until(ctx, sessionRestarts, func(ctx context.Context) error {
		if _, err := bus.EnsureDeliveryStream(ctx, r.js, r.cfg.Delivery); err != nil {
			return err
		}
		kv, err := bus.EnsureUnits(ctx, r.js, r.cfg.Delivery.Replicas)
		if err != nil {
			return err
		}
		if r.units, err = bus.NewUnits(ctx, kv); err != nil {
			return err
		}
		if r.sinkKV, err = sinkstate.Ensure(ctx, r.js, r.cfg.Delivery.Replicas); err != nil {
			return err
		}
		if err := sinkstate.Apply(ctx, r.sinkKV, r.cfg.Sinks); err != nil {
			return err
		}
		r.lease, err = bus.OpenLease(ctx, r.js, bus.LeaseConfig{Bucket: RoutersBucket, Key: r.cfg.Source, Role: "router",
			Replicas: r.cfg.Delivery.Replicas, TTL: leaseTTL})
		return err
	}, bus.Permanent, func(err error, wait time.Duration) {
		r.state.SetNotReady(err.Error())
		r.log.Warn("cannot set up the delivery stream yet; retrying", "error", err, "retry_in", wait)
	})
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	go r.states.Watch(ctx, r.sinkKV)
	if err := r.states.Wait(ctx); err != nil {
		return nil // ctx ended
	}
	sub, err := bus.ServeStatus(r.nc, bus.StatusSubject("router"), r.statusNow)
	if err != nil {
		return err
	}
	defer func() { _ = sub.Unsubscribe() }()
	return r.lease.Hold(ctx, r.log, r.state, func(ctx context.Context) error {
		r.active.Store(true)
		r.metrics.Active.Set(1)
		defer func() { r.active.Store(false); r.metrics.Active.Set(0) }()
		restart.Loop(ctx, sessionRestarts, r.session, func(err error, wait time.Duration) bool {
			r.state.SetNotReady(err.Error())
			r.log.Warn("router session ended; restarting", "error", err, "retry_in", wait)
			return true
		})
		return nil
	})
}

// sessionRestarts is the back-off between sessions (and start-up attempts).
var sessionRestarts = restart.Policy{Min: 100 * time.Millisecond, Max: 5 * time.Second, ResetAfter: 30 * time.Second}

// lastRound describes the delivery stream's last message: the round it
// belongs to and its place in it.
type lastRound struct {
	seq        uint64 // the delivery stream's last sequence
	id         string
	start, end uint64 // the round's changes-stream sequences
	i, n       int    // the message is the round's i-th of n
	disabled   []string
}

// lastOutput reads the delivery stream's last message (ok=false: none).
func (r *Router) lastOutput(ctx context.Context) (lr lastRound, ok bool, err error) {
	delivery, err := r.js.Stream(ctx, r.cfg.Delivery.Name)
	if err != nil {
		return lr, false, fmt.Errorf("delivery stream %s: %w", r.cfg.Delivery.Name, err)
	}
	info, err := delivery.Info(ctx)
	if err != nil {
		return lr, false, fmt.Errorf("read the state of delivery stream %s: %w", r.cfg.Delivery.Name, err)
	}
	lr.seq = info.State.LastSeq
	if info.State.Msgs == 0 {
		return lr, false, nil
	}
	// The chain goes on from LastSeq; the headers come from the last
	// message still stored (an operator may have deleted the very last).
	// From the leader (bus.LeaderMsg): a lagging replica's last message is
	// older than LastSeq, and the rounds in between would go out twice.
	m, err := bus.LeaderMsg(ctx, r.js, r.cfg.Delivery.Name, 0, bus.DeliveryFilter(r.cfg.Source))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return lr, false, nil
	}
	if err != nil {
		return lr, false, fmt.Errorf("read the delivery stream's last message: %w", err)
	}
	lr.id = m.Header.Get(bus.HeaderID)
	lr.start, err = strconv.ParseUint(m.Header.Get(bus.HeaderInputSeq), 10, 64)
	if err == nil {
		lr.end, err = strconv.ParseUint(m.Header.Get(bus.HeaderInputEnd), 10, 64)
	}
	if err == nil {
		lr.i, lr.n, err = bus.ParseRound(m.Header.Get(bus.HeaderRound))
	}
	if d := m.Header.Get(bus.HeaderDisabled); d != "" {
		lr.disabled = strings.Split(d, ",")
	}
	if err != nil || lr.id == "" || lr.end < lr.start {
		return lr, false, fmt.Errorf("delivery message %d lacks a valid %s, %s, %s or %s (written by another version of the router?)",
			m.Sequence, bus.HeaderID, bus.HeaderInputSeq, bus.HeaderInputEnd, bus.HeaderRound)
	}
	return lr, true, nil
}

func (r *Router) session(ctx context.Context) error {
	last, found, err := r.lastOutput(ctx)
	if err != nil {
		return err
	}
	occ := jetstream.OrderedConsumerConfig{FilterSubjects: []string{bus.ChangesFilter(r.cfg.Source)}, InactiveThreshold: bus.OrderedInactive}
	var rp *replay
	switch {
	case !found:
	case last.i == last.n: // the last round is complete
		occ.DeliverPolicy, occ.OptStartSeq = jetstream.DeliverByStartSequencePolicy, last.end+1
	default: // it was cut short: route it again, publish what is missing
		occ.DeliverPolicy, occ.OptStartSeq = jetstream.DeliverByStartSequencePolicy, last.start
		rp = &replay{end: last.end, stored: last.i, lastID: last.id, disabled: last.disabled}
	}
	cons, err := r.js.OrderedConsumer(ctx, r.cfg.ChangesStream, occ)
	if err != nil {
		return fmt.Errorf("read %s (is capture running? it creates the stream): %w", r.cfg.ChangesStream, err)
	}
	bp, err := bus.NewPublisher(r.nc, last.seq, 0, bus.PublisherOptions{Window: r.cfg.Window})
	if err != nil {
		return err
	}
	var pub chain = bp
	if r.wrap != nil {
		pub = r.wrap(pub)
	}
	// Heartbeats every second: a lost leader is noticed in about two (the
	// default, 5 s, took 10 s and more).
	it, err := cons.Messages(jetstream.PullMaxMessages(2*r.cfg.Window), jetstream.PullHeartbeat(time.Second), jetstream.PullExpiry(5*time.Second))
	if err != nil {
		_ = pub.Close(ctx)
		return fmt.Errorf("read %s: %w", r.cfg.ChangesStream, err)
	}
	maxPayload := max(int(r.nc.MaxPayload())-8<<10, 64<<10) // room for the headers
	s := &session{Router: r, pub: pub, replay: rp, maxPayload: maxPayload,
		round: round{Round: bus.NewRound(bus.MaxBatchEntries, min(maxPayload, r.cfg.MaxBatchBytes))}}
	stop := context.AfterFunc(ctx, it.Stop)
	r.state.SetReady()
	r.log.Info("routing", "source", r.cfg.Source, "from_seq", occ.OptStartSeq, "resume_after", last.id)

	runErr := s.run(ctx, it)
	stop()
	it.Stop()
	bus.DropConsumer(r.js, r.cfg.ChangesStream, cons)
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

// replay rebuilds a round that was cut short: the same inputs routed the
// same way give the same messages, of which the first stored are in the
// delivery stream already.
type replay struct {
	end    uint64 // the round's last input
	stored int    // how many of its messages the stream holds
	lastID string // the id of the last of them
	// disabled are the sinks that were disabled when it was routed.
	disabled []string
}

// round is the outputs of the inputs read in one go (bus.Round), and which
// inputs those are.
type round struct {
	*bus.Round
	start, end uint64
	started    time.Time
	inputs     int
	// whole: its last input is the last message of capture's round, so
	// nothing more of that round is on its way.
	whole bool
	// lastFlush is when the previous round was published.
	lastFlush time.Time
	// disabled are the sinks disabled when the round started: it routes
	// nothing to them (and says so in its messages' HeaderDisabled).
	disabled []string
}

// Round limits: a round ends when no input is waiting, or at these.
const maxRoundInputs = 8192 // and bus.MaxRoundBytes; bus.MaxRoundAge while catching up

type session struct {
	*Router
	pub        chain
	replay     *replay
	maxPayload int // of a delivery message's body: one change may reach it
	lastSeq    uint64
	pending    uint64 // inputs the stream holds beyond the last one read
	round      round
	out        []byte              // reused output body
	in         bus.Entry           // the change being routed
	entry      bus.Entry           // its output
	tables     map[string]tableKey // tables met, by schema.table
}

type input struct {
	msg jetstream.Msg
	err error
}

func (s *session) run(ctx context.Context, it jetstream.MessagesContext) error {
	ctx, cancel := context.WithCancel(ctx) // ends the reader with the session
	defer cancel()
	in := make(chan input, 2*s.cfg.Window)
	go func() {
		for {
			m, err := it.Next()
			select {
			case in <- input{m, err}:
			case <-ctx.Done():
				return
			}
			if err != nil {
				return
			}
		}
	}()
	linger := time.NewTimer(time.Hour)
	linger.Stop()
	for {
		item, err := s.next(ctx, in, linger)
		if err != nil {
			return err
		}
		if item.err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if errors.Is(item.err, jetstream.ErrMsgIteratorClosed) {
				return fmt.Errorf("reading %s ended (connection closed?): %w", s.cfg.ChangesStream, item.err)
			}
			return fmt.Errorf("next change: %w", item.err)
		}
		if err := s.pub.Err(); err != nil {
			return err
		}
		md, err := item.msg.Metadata()
		if err != nil {
			return fmt.Errorf("change metadata: %w", err)
		}
		seq := md.Sequence.Stream
		s.pending = md.NumPending
		s.lastInput.Store(seq)
		s.pendingIn.Store(md.NumPending)
		s.metrics.Pending.Set(float64(md.NumPending))
		if seq <= s.lastSeq {
			continue
		}
		s.lastSeq = seq
		if s.replay != nil && seq > s.replay.end && s.round.inputs > 0 {
			if err := s.flush(ctx); err != nil { // the round's last input is gone (max age): end it here
				return err
			}
		}
		if s.round.inputs == 0 {
			s.round.start, s.round.started = seq, time.Now()
			s.round.disabled = s.disabledNow()
		}
		s.round.end = seq
		s.round.inputs++
		i, n, _ := bus.ParseRound(item.msg.Headers().Get(bus.HeaderRound))
		s.round.whole = i > 0 && i == n
		if err := s.route(ctx, item.msg); err != nil {
			return err
		}
		if s.replay != nil {
			if seq >= s.replay.end {
				if err := s.flush(ctx); err != nil {
					return err
				}
			}
		} else if s.round.inputs >= maxRoundInputs || s.round.Bytes() >= bus.MaxRoundBytes {
			if err := s.flush(ctx); err != nil {
				return err
			}
		}
	}
}

// next returns the next input. When none is waiting, the round is
// published at once if it ends with the whole of a capture round and
// nothing published waits for its ack, else once it is Linger old (rounds
// grow by themselves while acks are outstanding); while a backlog streams
// in, it grows up to bus.MaxRoundAge.
func (s *session) next(ctx context.Context, in <-chan input, linger *time.Timer) (input, error) {
	for {
		select {
		case item := <-in:
			return item, nil
		case <-ctx.Done():
			return input{}, ctx.Err()
		default:
		}
		if s.round.inputs > 0 && s.replay == nil {
			limit := s.cfg.Linger
			switch {
			case s.pending > 0: // catching up: more is on its way, let the round grow
				limit = bus.MaxRoundAge
			case s.round.whole && s.pub.InFlight() == 0 && time.Since(s.round.lastFlush) >= s.cfg.Linger:
				// Live, capture's round is all here, nothing waits for an
				// ack, and the last round is Linger old: now.
				limit = 0
			}
			if wait := limit - time.Since(s.round.started); wait > 0 {
				linger.Reset(wait)
				select {
				case item := <-in:
					linger.Stop()
					return item, nil
				case <-ctx.Done():
					linger.Stop()
					return input{}, ctx.Err()
				case <-s.pub.Failed():
					linger.Stop()
					return input{}, s.pub.Err()
				case <-linger.C:
				}
			}
			if err := s.flush(ctx); err != nil {
				return input{}, err
			}
		}
		select {
		case item := <-in:
			return item, nil
		case <-ctx.Done():
			return input{}, ctx.Err()
		case <-s.pub.Failed():
			return input{}, s.pub.Err()
		}
	}
}

// statusNow is this router's answer to a status request.
func (r *Router) statusNow() any {
	st := bus.RouterStatus{Process: bus.ThisProcess(""), Source: r.cfg.Source, Role: "standby",
		ChangesStream: r.cfg.ChangesStream, DeliveryStream: r.cfg.Delivery.Name}
	if r.active.Load() {
		st.Role, st.LastInput, st.Pending = "active", r.lastInput.Load(), r.pendingIn.Load()
	}
	for _, sk := range r.sinks.Load().list {
		if !r.states.Of(sk.Name).Routes() {
			st.Disabled = append(st.Disabled, sk.Name)
		}
	}
	return st
}

// disabledNow lists the sinks a new round routes nothing to: those
// disabled now, or, for a round cut short that is routed again, those
// disabled when it was first routed (so it routes the same way).
func (s *session) disabledNow() []string {
	if s.replay != nil {
		return s.replay.disabled
	}
	var l []string
	for _, sk := range s.sinks.Load().list {
		if !s.states.Of(sk.Name).Routes() {
			l = append(l, sk.Name)
		}
	}
	return l
}

// add puts an entry into its subject's batch.
func (s *session) add(subject string, e *bus.Entry) {
	if size := e.Size(); size > s.maxPayload {
		e.Error = fmt.Appendf(nil, "the routed change is %d bytes, more than a NATS message may hold (%d); acknowledge it, or raise the server's max_payload", size, s.maxPayload)
		e.ErrorKind = bus.ErrorTooLarge
		e.Body = nil
	}
	s.round.Add(subject, e)
}

// messageID names a round's i-th message (1-based) by the round's end, its
// place and its content, so a rebuilt round can be checked against what
// the stream holds.
func messageID(end uint64, i int, m *bus.RoundMsg) string {
	return strconv.FormatUint(end, 10) + "." + strconv.Itoa(i) + ":" + m.LastKey + ":" + strconv.FormatUint(uint64(crc32.ChecksumIEEE([]byte(m.Subject))), 36)
}

// flush publishes the round's messages in order and starts a new round.
func (s *session) flush(ctx context.Context) error {
	rd := &s.round
	defer func() { rd.lastFlush = time.Now() }()
	msgs := rd.Msgs()
	n := len(msgs)
	skip := 0
	if rp := s.replay; rp != nil {
		s.replay = nil
		if rp.stored <= n && messageID(rd.end, rp.stored, msgs[rp.stored-1]) == rp.lastID {
			skip = rp.stored
		} else {
			s.log.Warn("an interrupted round routes differently now (the sinks changed?): publishing all of it; some changes may be delivered twice",
				"from_seq", rd.start, "to_seq", rd.end, "stored_id", rp.lastID)
		}
	}
	start, end := strconv.FormatUint(rd.start, 10), strconv.FormatUint(rd.end, 10)
	for i, m := range msgs {
		if i < skip {
			continue
		}
		if err := s.register(ctx, m.Subject); err != nil {
			return err
		}
		s.pub.SetHeader(bus.HeaderInputSeq, start)
		s.pub.SetHeader(bus.HeaderInputEnd, end)
		s.pub.SetHeader(bus.HeaderRound, strconv.Itoa(i+1)+"/"+strconv.Itoa(n))
		s.pub.SetHeader(bus.HeaderEntries, strconv.Itoa(m.Batch.Len()))
		s.pub.SetHeader(bus.HeaderDisabled, strings.Join(rd.disabled, ","))
		if err := s.pub.Publish(ctx, m.Subject, messageID(rd.end, i+1, m), m.Batch.Bytes()); err != nil {
			return err
		}
		s.metrics.Messages.Inc()
	}
	rd.Reset()
	rd.inputs = 0
	return nil
}

// register adds a delivery subject's unit to the units bucket before the
// first message to it, so delivery finds it.
func (s *session) register(ctx context.Context, subject string) error {
	if s.registered[subject] {
		return nil
	}
	src, sink, basin, stream, _, err := bus.ParseDeliverySubject(subject)
	if err != nil {
		return err
	}
	if err := s.units.Register(ctx, bus.UnitRef{Source: src, Sink: sink, Basin: basin, Stream: stream, DeliveryStream: s.cfg.Delivery.Name}); err != nil {
		return err
	}
	if s.registered == nil {
		s.registered = map[string]bool{}
	}
	s.registered[subject] = true
	return nil
}

// route applies the sinks to the changes of one input message.
func (s *session) route(ctx context.Context, msg jetstream.Msg) error {
	_, schema, table, partition, perTable, err := bus.ParseChangeSubject(msg.Subject())
	if err != nil {
		return err
	}
	sinks := s.sinks.Load()
	var tk tableKey
	var idxs []int
	if perTable { // from a capture before batch version 4: one table per message
		tk = newTableKey(schema, table)
		if idxs = sinks.byTable[tk.joined]; len(idxs) == 0 {
			return nil
		}
	}
	r := bus.NewBatchReader(msg.Data())
	in := &s.in
	for r.Next(in) {
		if !perTable {
			if in.Schema == nil {
				return fmt.Errorf("change message on %s: %w: a change does not say its schema (written by a capture of another version?)", msg.Subject(), bus.ErrBadBatch)
			}
			if string(in.Table) != tk.joined || len(in.Schema) != tk.schema {
				tk = s.tableOf(in)
				idxs = sinks.byTable[tk.joined]
			}
			if len(idxs) == 0 {
				continue
			}
		}
		s.routeChange(ctx, sinks, tk, idxs, partition, in)
	}
	if err := r.Err(); err != nil {
		return fmt.Errorf("change message on %s: %w", msg.Subject(), err)
	}
	return nil
}

// tableOf is the table of change e (whose Schema is known), from the
// tables met before when it is one of them.
func (s *session) tableOf(e *bus.Entry) tableKey {
	if tk, ok := s.tables[string(e.Table)]; ok && tk.schema == len(e.Schema) {
		return tk
	}
	tk := newTableKey(string(e.Schema), string(e.Table[len(e.Schema)+1:]))
	if s.tables == nil || len(s.tables) >= maxTablesMet {
		s.tables = map[string]tableKey{}
	}
	s.tables[tk.joined] = tk
	return tk
}

// maxTablesMet bounds tableOf's memory (a database may have any number
// of tables; a reset only costs building the keys again).
const maxTablesMet = 1 << 16

// tableKey names a change's table: as the sinks' tables do
// ("schema.table"), and unambiguously (schema and table apart: quoted
// names may hold dots) for what is decided per table.
type tableKey struct {
	joined, exact string
	schema        int // the schema's length in joined
}

func newTableKey(schema, table string) tableKey {
	return tableKey{schema + "." + table, schema + "\x00" + table, len(schema)}
}

// routeChange applies the sinks of its table to one change.
func (s *session) routeChange(ctx context.Context, sinks *Sinks, tk tableKey, idxs []int, partition string, in *bus.Entry) {
	e := &s.entry
	*e = *in
	body := in.Body
	var span trace.Span
	if telemetry.Enabled() {
		// A process span per change (the messaging conventions), in the
		// producer's trace and linked to its span.
		producer := telemetry.ParseTraceParent(string(in.TraceParent))
		parent := trace.ContextWithRemoteSpanContext(ctx, producer)
		opts := []trace.SpanStartOption{trace.WithSpanKind(trace.SpanKindConsumer),
			trace.WithAttributes(telemetry.Messaging(telemetry.SystemNATS, telemetry.OpProcess, s.cfg.ChangesStream, 0)...),
			trace.WithAttributes(attribute.String("pgs2.source", s.cfg.Source), attribute.String("pgs2.table", string(in.Table)),
				attribute.String("pgs2.idempotency_key", string(in.Key)))}
		if producer.IsValid() {
			opts = append(opts, trace.WithLinks(trace.Link{SpanContext: producer}))
		}
		_, span = s.tracer.Start(parent, telemetry.OpProcess+" "+s.cfg.ChangesStream, opts...)
		defer span.End()
		if tp := telemetry.TraceParent(span.SpanContext()); tp != "" {
			e.TraceParent = []byte(tp)
		}
	}
	var fin *fn.Input
	var finErr error
	parse := func() { // once per change, what the table's sinks' functions read
		if fin == nil && finErr == nil {
			reads, ok := sinks.reads[tk.joined]
			if !ok {
				reads = sinks.readsOf(idxs)
			}
			fin, finErr = fn.ParseInputReads(body, reads)
		}
	}
	upstream := string(in.Error) // capture could not carry the change itself
	for _, i := range idxs {
		sk := sinks.list[i]
		if len(in.Sink) > 0 && string(in.Sink) != sk.Name {
			continue // a backfill's read, for another sink
		}
		if len(s.round.disabled) > 0 && slices.Contains(s.round.disabled, sk.Name) {
			sk.disabled.Inc()
			continue // disabled: nothing for it while it is
		}
		basin, stream, out, failure, keep := sk.Basin, sk.Stream, []byte(nil), "", true
		kind := bus.ErrorFunction
		if upstream != "" {
			out, failure, kind = s.splice(body, sk), upstream, in.ErrorKind
		} else if sk.Functions.Empty() {
			out = s.splice(body, sk)
		} else if sk.Functions.ByTable() {
			// The functions read only the table and action: decided once
			// for each (a routing by table costs nothing per change).
			o, ok := sk.memo.get(tk.exact, in.Action)
			if !ok {
				tin, terr := fn.ParseInputReads(body, sk.Functions.Reads())
				o = s.decide(sk, tin, terr)
				if terr == nil {
					sk.memo.put(tk.exact, in.Action, o)
				}
			}
			basin, stream, failure, keep = o.basin, o.stream, o.failure, o.keep
			if keep {
				out = s.splice(body, sk)
			}
		} else {
			parse()
			basin, stream, out, failure, keep = s.apply(sk, fin, finErr, body)
		}
		if !keep {
			sk.filtered.Inc()
			continue
		}
		e.Body, e.Error, e.ErrorKind = out, []byte(failure), bus.ErrorNone
		if failure != "" {
			e.ErrorKind = kind
			sk.failed.Inc()
			if span != nil {
				telemetry.Fail(span, "function", "sink "+sk.Name+": "+failure)
			}
		} else {
			sk.routed.Inc()
		}
		s.add(bus.DeliverySubject(s.cfg.Source, sk.Name, basin, stream, partition), e)
	}
}

// apply runs a sink's functions. A runtime error or an invalid routing
// result becomes a failure: the original change goes on, marked, to the
// sink's own basin and stream, and delivery parks it with its group.
func (s *session) apply(sk *Sink, in *fn.Input, inErr error, body []byte) (basin, stream string, out []byte, failure string, keep bool) {
	o := s.decide(sk, in, inErr)
	if !o.keep {
		return "", "", nil, "", false
	}
	if o.failure == "" && sk.Functions.HasTransform() {
		b, err := sk.Functions.TransformBody(in)
		if err == nil {
			return o.basin, o.stream, b, "", true
		}
		o = outcome{basin: sk.Basin, stream: sk.Stream, failure: err.Error(), keep: true}
	}
	return o.basin, o.stream, s.splice(body, sk), o.failure, true
}

// decide runs a sink's filter and routing: kept or not, and where to (or
// why not: a failure goes to the sink's own basin and stream).
func (s *session) decide(sk *Sink, in *fn.Input, inErr error) outcome {
	fail := func(err error) outcome {
		return outcome{basin: sk.Basin, stream: sk.Stream, failure: err.Error(), keep: true}
	}
	if inErr != nil {
		return fail(inErr)
	}
	ok, err := sk.Functions.Keep(in)
	if err != nil {
		return fail(err)
	}
	if !ok {
		return outcome{}
	}
	basin, stream := sk.Basin, sk.Stream
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
	return outcome{basin: basin, stream: stream, keep: true}
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
