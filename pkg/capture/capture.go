// Package capture streams a PostgreSQL source's changes into JetStream:
// pgrepl decodes the slot, bus publishes in order, and the slot is confirmed
// only up to transactions JetStream wholly acknowledged.
package capture

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/pgs2/pgs2/pkg/backfill"
	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/config"
	"github.com/pgs2/pgs2/pkg/health"
	"github.com/pgs2/pgs2/pkg/metrics"
	"github.com/pgs2/pgs2/pkg/pgrepl"
	"github.com/pgs2/pgs2/pkg/restart"
	"github.com/pgs2/pgs2/pkg/telemetry"
)

// Config configures a capture.
type Config struct {
	// Source names the source in subjects.
	Source string
	Repl   pgrepl.Config
	Stream bus.ChangesStreamConfig
	// Partitions per table.
	Partitions int
	// StatusInterval is how often the slot position is reported (default 1s).
	StatusInterval time.Duration
	// Window is how many messages may await their PubAck (default 4096).
	Window int
	// ShutdownTimeout bounds the wait for outstanding PubAcks on exit (default 30s).
	ShutdownTimeout time.Duration
	// Linger is how long a round of changes may collect before it is
	// published (default 1ms): larger rounds make larger messages.
	Linger time.Duration
	// Backfill are the backfill defaults.
	Backfill BackfillConfig
}

// Capture runs the replication sessions.
type Capture struct {
	cfg     Config
	js      jetstream.JetStream
	log     *slog.Logger
	state   *health.State
	tracer  trace.Tracer
	traced  bool // a tracer was given: spans even without telemetry.Enabled
	metrics *metrics.Capture
	pub     atomic.Pointer[bus.Publisher]  // the current session's
	hub     *hub                           // between backfill runners and the reader
	stage   atomic.Pointer[backfill.Stage] // staged backfill chunks, once set up
	store   atomic.Pointer[backfill.Store] // backfill jobs, once set up
	// live is the config as last reloaded: its tables and backfill
	// settings apply (cfg keeps the rest as the process started).
	live atomic.Pointer[Config]
	// isActive: this process holds the source's lease (a standby neither
	// prepares the source nor reads it).
	isActive atomic.Bool
	// dec is the current session's decoder (Reload gives it the tables).
	dec atomic.Pointer[pgrepl.Decoder]
	// slot is the slot's state as last read (sampleSlot), lastCommitMs the
	// commit time of the last transaction read: for status requests.
	slot         atomic.Pointer[slotSample]
	lastCommitMs atomic.Int64
	// wrapPublish, when set (a test seam), wraps each session's publish.
	wrapPublish func(publishFunc) publishFunc
	// roundCommits, when set (a test seam), gives each session the number
	// of commits its rounds end at (0: by age).
	roundCommits func() int
	// emit writes a backfill watermark (backfill.Emit; a test seam wraps
	// it).
	emit func(context.Context, *pgx.Conn, backfill.Marker) (uint64, error)
	// endSession ends the current replication session (with its cause).
	endSession atomic.Pointer[context.CancelCauseFunc]
}

// publishFunc publishes one message of a round (bus.Publisher.Publish).
type publishFunc func(ctx context.Context, subject, id string, body []byte) error

// Option configures optional dependencies.
type Option func(*Capture)

// WithLogger sets the logger.
func WithLogger(l *slog.Logger) Option { return func(c *Capture) { c.log = l } }

// WithTracer sets the tracer of the per-transaction spans (default: the
// global provider's).
func WithTracer(t trace.Tracer) Option { return func(c *Capture) { c.tracer, c.traced = t, true } }

// WithMetrics registers capture's metrics in r (nil: none).
func WithMetrics(r prometheus.Registerer) Option {
	return func(c *Capture) {
		if r == nil {
			return
		}
		c.metrics = metrics.NewCapture(metrics.WithSource(r, c.cfg.Source), func() float64 {
			if p := c.pub.Load(); p != nil {
				return float64(p.InFlight())
			}
			return 0
		})
	}
}

// WithHealth reports readiness into s.
func WithHealth(s *health.State) Option { return func(c *Capture) { c.state = s } }

// New returns a capture that publishes through js.
func New(cfg Config, js jetstream.JetStream, opts ...Option) *Capture {
	if cfg.StatusInterval <= 0 {
		cfg.StatusInterval = time.Second
	}
	if cfg.Window <= 0 {
		cfg.Window = 4096
	}
	if cfg.ShutdownTimeout <= 0 {
		cfg.ShutdownTimeout = 30 * time.Second
	}
	if cfg.Linger <= 0 {
		cfg.Linger = time.Millisecond
	}
	if cfg.Backfill.ChunkSize <= 0 {
		cfg.Backfill.ChunkSize = config.DefaultBackfillChunkSize
	}
	if cfg.Backfill.StatementTimeout <= 0 {
		cfg.Backfill.StatementTimeout = 30 * time.Second
	}
	if cfg.Backfill.Replicas <= 0 {
		cfg.Backfill.Replicas = max(cfg.Stream.Replicas, 1)
	}
	c := &Capture{cfg: cfg, js: js, log: slog.Default(), state: health.NewState(), tracer: otel.Tracer("pgs2/capture"), hub: newHub(),
		emit: backfill.Emit}
	c.live.Store(&cfg)
	for _, o := range opts {
		o(c)
	}
	if c.metrics == nil {
		c.metrics = metrics.NewCapture(prometheus.NewRegistry(), func() float64 { return 0 })
	}
	return c
}

// Run prepares the source and streams until ctx ends, reconnecting after
// failures of Postgres or JetStream. It returns nil after a clean shutdown
// and an error when the source cannot be captured as configured.
//
// Of the captures of one source, one is active; the others stand by and
// take over when it is gone (a lease in CapturesBucket): the slot streams
// to one session at a time, and backfill chunks are read by one process.
func (c *Capture) Run(ctx context.Context) error {
	var l *bus.Lease
	err := restart.Until(ctx, sessionRestarts, func(ctx context.Context) (err error) {
		l, err = bus.OpenLease(ctx, c.js, bus.LeaseConfig{Bucket: CapturesBucket, Key: c.cfg.Source, Role: "capture",
			Replicas: c.cfg.Backfill.Replicas, TTL: leaseTTL})
		return err
	}, bus.Permanent, func(err error, wait time.Duration) {
		c.state.SetNotReady(err.Error())
		c.log.Warn("cannot set up the capture lease yet; retrying", "error", err, "retry_in", wait)
	})
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	// A standby reaches the database too: a wrong DSN, password or address
	// stops it now, as it stops an active capture, not when it takes over.
	conn, err := pgrepl.Connect(ctx, c.cfg.Repl)
	if err != nil {
		return err
	}
	_ = conn.Close(ctx)
	sub, err := bus.ServeStatus(c.js.Conn(), bus.StatusSubject("capture"), c.statusNow)
	if err != nil {
		return err
	}
	defer func() { _ = sub.Unsubscribe() }()
	return l.Hold(ctx, c.log, c.state, c.active)
}

// errServerStopping ends a replication session while PostgreSQL shuts
// down. A logical walsender exits only once its client confirmed all it
// sent, and capture confirms no further than a backfill chunk it has not
// recorded; the chunk cannot be finished while the server refuses
// connections, so the server would wait for ever. A new session replays
// from the confirmed position, as after a crash.
var errServerStopping = errors.New("PostgreSQL is shutting down")

// serverStopping ends the current session if err says PostgreSQL is
// shutting down (it refuses connections: SQLSTATE 57P03).
func (c *Capture) serverStopping(err error) {
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "57P03" {
		return
	}
	if end := c.endSession.Load(); end != nil {
		(*end)(fmt.Errorf("%w (%s): the session ends so that it can", errServerStopping, pe.Message))
	}
}

// CapturesBucket holds one key per source whose capture runs (value: the
// active capture's id).
const CapturesBucket = "PGS2_CAPTURES"

// leaseTTL is how long a capture that stopped renewing keeps its source (a
// SIGKILLed one is replaced within seconds: nobody answers its pings).
const leaseTTL = 10 * time.Second

// active runs the source's capture while this process holds the lease.
func (c *Capture) active(ctx context.Context) error {
	c.isActive.Store(true)
	defer c.isActive.Store(false)
	c.metrics.Active.Set(1)
	defer c.metrics.Active.Set(0)
	sctx, stopSampling := context.WithCancel(ctx)
	sampled := make(chan struct{})
	go func() { defer close(sampled); c.sampleSlot(sctx) }()
	defer func() { stopSampling(); <-sampled }()
	src, err := pgrepl.Prepare(ctx, c.live.Load().Repl) // with the tables of a reload while standing by
	if err != nil {
		return err
	}
	if src.SlotCreated {
		c.log.Info("created replication slot", "slot", c.cfg.Repl.Slot)
	}
	var stream jetstream.Stream
	err = restart.Until(ctx, sessionRestarts, func(ctx context.Context) (err error) {
		stream, err = bus.EnsureChangesStream(ctx, c.js, c.cfg.Stream)
		return err
	}, bus.Permanent, func(err error, wait time.Duration) {
		c.state.SetNotReady(err.Error())
		c.log.Warn("cannot set up the changes stream yet; retrying", "error", err, "retry_in", wait)
	})
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	bctx, stopBackfills := context.WithCancel(ctx)
	backfillsDone := make(chan struct{})
	go func() { defer close(backfillsDone); c.runBackfills(bctx, src.Database) }()
	defer func() { stopBackfills(); <-backfillsDone }()
	var setupErr error
	if src.SlotCreated {
		// A new slot next to changes already captured from this source:
		// what was committed between them is not in the stream.
		if r, err := bus.ResumeChanges(ctx, c.js, c.cfg.Stream.Name, c.cfg.Source); err == nil && r.LastID != "" {
			c.log.Warn("the replication slot was created, but the changes stream already holds changes of this source: "+
				"changes committed after those and before the slot are not captured (the slot was dropped, or PostgreSQL failed over "+
				"to a server without it); backfill the tables (pgs2ctl backfill start --sink …)",
				"slot", c.cfg.Repl.Slot, "stream_through", r.Through.String(), "slot_from", src.ConfirmedFlush.String())
		}
	}
	restart.Loop(ctx, sessionRestarts, func(ctx context.Context) error {
		sctx, end := context.WithCancelCause(ctx)
		defer end(nil)
		c.endSession.Store(&end)
		err := c.session(sctx, stream, src.Database)
		if cause := context.Cause(sctx); ctx.Err() == nil && errors.Is(cause, errServerStopping) {
			return cause
		}
		return err
	}, func(err error, wait time.Duration) bool {
		if errors.Is(err, pgrepl.ErrSetup) {
			setupErr = err
			return false
		}
		if errors.Is(err, pgrepl.ErrTableAdded) {
			c.log.Info("a table added by a reload was published before; a new session reads it", "table", err.Error())
			return true
		}
		c.state.SetNotReady(err.Error())
		c.log.Warn("capture session ended; restarting", "error", err, "retry_in", wait)
		return true
	})
	return setupErr
}

// Reload applies a changed config without a restart of the process: the
// session's decoder takes the tables first, then the tables added to
// source.tables are checked and added to the publication, so their changes
// are captured from the publication's change on; the sinks' tables, their
// initial backfills (created in the background) and source.backfill apply
// to backfills started from then on. Other changes apply after a restart
// of capture. The router must have the new tables first (reload it before
// capture): changes of a table no sink lists are not routed.
func (c *Capture) Reload(ctx context.Context, cfg Config) error {
	old := c.live.Load()
	if cfg.Source != old.Source || cfg.Repl.DSN != old.Repl.DSN || cfg.Repl.Slot != old.Repl.Slot ||
		cfg.Repl.Publication != old.Repl.Publication || cfg.Stream != old.Stream || cfg.Partitions != old.Partitions ||
		fmt.Sprint(cfg.Repl.GroupColumns) != fmt.Sprint(old.Repl.GroupColumns) {
		c.log.Warn("source and nats settings other than tables and backfill apply after a restart of capture")
		cfg.Source, cfg.Repl.DSN, cfg.Repl.Password, cfg.Repl.Slot, cfg.Repl.Publication = old.Source, old.Repl.DSN, old.Repl.Password, old.Repl.Slot, old.Repl.Publication
		cfg.Stream, cfg.Partitions, cfg.Repl.GroupColumns = old.Stream, old.Partitions, old.Repl.GroupColumns
	}
	var added []string
	for _, t := range cfg.Repl.Tables {
		if !slices.Contains(old.Repl.Tables, t) {
			added = append(added, t)
		}
	}
	cfg.Backfill.Replicas = old.Backfill.Replicas
	if cfg.Backfill.ChunkSize <= 0 {
		cfg.Backfill.ChunkSize = old.Backfill.ChunkSize
	}
	if cfg.Backfill.StatementTimeout <= 0 {
		cfg.Backfill.StatementTimeout = old.Backfill.StatementTimeout
	}
	// The decoder has the tables before the publication does: a change
	// published after ALTER PUBLICATION is never decoded as ignored.
	c.live.Store(&cfg)
	if d := c.dec.Load(); d != nil {
		d.SetTables(cfg.Repl.Tables)
	}
	if len(added) > 0 && c.isActive.Load() { // a standby prepares them when it takes over
		if _, err := pgrepl.Prepare(ctx, cfg.Repl); err != nil {
			c.live.Store(old)
			if d := c.dec.Load(); d != nil {
				d.SetTables(old.Repl.Tables)
			}
			return err
		}
		c.log.Info("tables added", "tables", added)
	}
	if store := c.store.Load(); store != nil && len(cfg.Backfill.Initial) > 0 {
		go func() {
			ictx, cancel := context.WithTimeout(ctx, time.Minute)
			defer cancel()
			c.createInitial(ictx, store, cfg.Backfill.Initial)
		}()
	}
	return nil
}

// checkStreamBehindWAL refuses a changes stream that holds changes of the
// source past the database's WAL end: they come from another database (a
// new cluster under the same source name, a restore from a backup, a
// failover to a server that had not received them), and every change of
// this database up to their positions would be skipped as stored.
func checkStreamBehindWAL(resume bus.ChangesResume, walText string, cfg Config) error {
	wal, err := pglogrepl.ParseLSN(walText)
	if err != nil {
		return fmt.Errorf("the database's WAL position %q: %w", walText, err)
	}
	last := resume.Through
	if resume.Partial && last.Less(resume.Last) {
		last = resume.Last
	}
	if resume.LastID == "" || last.LSN <= uint64(wal) {
		return nil
	}
	return &pgrepl.SetupError{
		Problem: fmt.Sprintf("changes stream %s holds changes of source %s up to %s, past this database's WAL end %s: "+
			"they were captured from another database — a new cluster, one restored from a backup, or a server that "+
			"took over (failover) without having received them — and capture would skip this database's changes up to "+
			"there as already stored", cfg.Stream.Name, cfg.Source, last, wal),
		Fix: fmt.Sprintf("for another database, give it its own source.name, nats.changes_stream and nats.delivery_stream; "+
			"after a failover that lost those transactions, they are in the stream (and maybe in S2) but no longer in the "+
			"database: let delivery drain the stream, then delete it (nats stream rm %s) and backfill", cfg.Stream.Name),
	}
}

// sessionRestarts is the back-off between sessions (and start-up attempts).
var sessionRestarts = restart.Policy{Min: 100 * time.Millisecond, Max: 5 * time.Second, ResetAfter: 30 * time.Second}

// session streams from the slot's confirmed position, skipping the changes
// the stream already holds, until an error or ctx ends.
func (c *Capture) session(ctx context.Context, stream jetstream.Stream, db string) (err error) {
	resume, err := bus.ResumeChanges(ctx, c.js, c.cfg.Stream.Name, c.cfg.Source)
	if err != nil {
		return err
	}
	catConn, err := pgrepl.Connect(ctx, c.cfg.Repl)
	if err != nil {
		return err
	}
	defer catConn.Close(context.Background())
	var flushText, walText string
	var serverMs int64
	asked := time.Now()
	if err := catConn.QueryRow(ctx, `SELECT COALESCE(confirmed_flush_lsn::text, '0/0'),
		(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text,
		(extract(epoch FROM clock_timestamp()) * 1000)::bigint
		FROM pg_replication_slots WHERE slot_name = $1`, c.cfg.Repl.Slot).Scan(&flushText, &walText, &serverMs); err != nil {
		return fmt.Errorf("read slot %s: %w", c.cfg.Repl.Slot, err)
	}
	if err := checkStreamBehindWAL(resume, walText, c.cfg); err != nil {
		return err
	}
	// The server's clock against ours (commit times are the server's).
	clockSkew := serverMs - asked.Add(time.Since(asked)/2).UnixMilli()
	confirmed, err := pglogrepl.ParseLSN(flushText)
	if err != nil {
		return fmt.Errorf("slot %s confirmed_flush_lsn %q: %w", c.cfg.Repl.Slot, flushText, err)
	}

	repl, err := pgrepl.ConnectReplication(ctx, c.cfg.Repl)
	if err != nil {
		return err
	}
	defer repl.Close(context.Background())
	err = pglogrepl.StartReplication(ctx, repl, c.cfg.Repl.Slot, 0, pglogrepl.StartReplicationOptions{
		PluginArgs: pgrepl.PluginArgs(c.cfg.Repl.Publication),
	})
	if err != nil {
		return fmt.Errorf("start replication on slot %s: %w", c.cfg.Repl.Slot, err)
	}
	if resume.Partial {
		c.log.Info("streaming", "slot", c.cfg.Repl.Slot, "confirmed_flush", confirmed, "interrupted_round", resume.First.String()+" - "+resume.Last.String(),
			"stored_of_it", len(resume.Stored))
	} else {
		c.log.Info("streaming", "slot", c.cfg.Repl.Slot, "confirmed_flush", confirmed, "resume_after", resume.Through.String())
	}
	c.state.SetReady()

	pub, err := bus.NewPublisher(c.js.Conn(), resume.LastSeq, uint64(confirmed), bus.PublisherOptions{Window: c.cfg.Window})
	if err != nil {
		return err
	}
	c.pub.Store(pub)
	c.metrics.Sessions.Inc()
	maxBody := int(c.js.Conn().MaxPayload()) - 16<<10
	s := &session{Capture: c, repl: repl, pub: pub, publish: pub.Publish, resume: resume, maxBody: maxBody, clockSkew: clockSkew,
		catConn: catConn, db: db, windows: backfill.NewWindows(), ring: backfill.NewRing(0), encoders: map[string]*pgrepl.ReadEncoder{},
		round: bus.NewRound(bus.MaxBatchEntries, min(maxBody, bus.MaxBatchBytes)),
		dec:   pgrepl.NewDecoder(catConn, db, c.live.Load().Repl), subjects: bus.NewChangeSubjects(c.cfg.Source, c.cfg.Partitions)}
	if c.wrapPublish != nil {
		s.publish = c.wrapPublish(s.publish)
	}
	// A reload between NewDecoder and here is not missed: the decoder takes
	// the tables again after it is where Reload finds it.
	c.dec.Store(s.dec)
	s.dec.SetTables(c.live.Load().Repl.Tables)
	if c.roundCommits != nil {
		s.perRound = c.roundCommits()
	}
	if resume.Partial {
		interrupted := resume
		s.completing = &interrupted
	}
	runErr := s.run(ctx)
	if runErr != nil && ctx.Err() == nil {
		s.endSpan(runErr) // failed inside a transaction
	} else {
		s.endSpan(nil) // stopped inside one
	}

	// Publish the round in hand on a clean stop, wait for what is in
	// flight, then confirm what is acknowledged.
	cctx, cancel := context.WithTimeout(context.Background(), c.cfg.ShutdownTimeout)
	defer cancel()
	if ctx.Err() != nil && pub.Err() == nil {
		if err := s.flush(cctx); err != nil {
			c.log.Warn("could not publish the last round on shutdown; it is captured again on the next start", "error", err)
		}
	}
	closeErr := pub.Close(cctx)
	if serr := s.sendStatus(cctx); serr != nil && runErr == nil && ctx.Err() == nil {
		runErr = serr
	}
	if ctx.Err() != nil {
		c.log.Info("capture stopped", "confirmed_lsn", pglogrepl.LSN(pub.Acked()), "published", s.published, "skipped", s.skipped)
		return closeErr
	}
	if runErr == nil {
		runErr = closeErr
	}
	return runErr
}

type session struct {
	*Capture
	repl     *pgconn.PgConn
	pub      *bus.Publisher
	publish  publishFunc // pub.Publish, or a test seam's wrapper
	dec      *pgrepl.Decoder
	subjects *bus.ChangeSubjects
	resume   bus.ChangesResume
	// completing is the interrupted round this session started after, until
	// a round past its last change is published: the rounds until then name
	// themselves as it (its Round-First, and a Round-Last at least its).
	completing *bus.ChangesResume

	// The round being collected: its changes are published together, one
	// message per subject, when it is Linger old at a commit, when no WAL
	// arrives for that long, or when it is full.
	round        *bus.Round
	roundStarted time.Time
	lastFlush    time.Time // when the last round was published
	walAt        time.Time // when WAL last arrived while the round collects
	roundFirst   string    // key of its first change
	roundLast    string    // and of its last
	// pendingCommit is the end LSN of the round's last commit: marked for
	// confirmation once the round is published.
	pendingCommit uint64
	entry         bus.Entry
	table         []byte // "schema.table" of the current change
	commitMs      int64  // of the current transaction
	tp            []byte // its traceparent
	// behind: the transaction being read committed a while ago (a
	// backlog), so rounds grow larger.
	behind bool
	// perRound, when set, ends rounds at their perRound-th commit (a test
	// seam); commits counts the round's.
	perRound, commits int
	// clockSkew is the server's clock minus ours, in ms.
	clockSkew int64

	published, skipped int64
	// maxBody is the largest body the NATS server takes, leaving room for
	// headers (read once: a session ends when the connection does).
	maxBody int

	// The current transaction's span; each of its changes carries its
	// traceparent, so router and delivery continue the trace.
	span        trace.Span
	traceparent string
	txChanges   int
	xid         uint32 // of the current transaction

	// Backfills: the windows of the chunks between their watermarks, the
	// transactions decoded lately, and the tables' read encoders (on the
	// catalog connection).
	catConn  *pgx.Conn
	db       string
	windows  *backfill.Windows
	ring     *backfill.Ring
	encoders map[string]*pgrepl.ReadEncoder
	readTS   []byte
}

func (s *session) sendStatus(ctx context.Context) error {
	for _, id := range s.hub.released() {
		s.windows.Release(id)
	}
	acked := s.pub.Acked()
	if hold, ok := s.windows.Hold(); ok && hold < acked {
		acked = hold // a backfill chunk's rows are not yet recorded: replay its window after a restart
	}
	lsn := pglogrepl.LSN(acked)
	err := pglogrepl.SendStandbyStatusUpdate(ctx, s.repl, pglogrepl.StandbyStatusUpdate{
		WALWritePosition: lsn, WALFlushPosition: lsn, WALApplyPosition: lsn,
	})
	if err != nil {
		return fmt.Errorf("send standby status: %w", err)
	}
	s.metrics.ConfirmedLSN.Set(float64(lsn))
	return nil
}

func (s *session) run(ctx context.Context) error {
	// Reads time out at the next status update through the socket's read
	// deadline: pgconn then keeps the connection, and no context is watched
	// per message. Cancellation sets the deadline to now.
	conn := s.repl.Conn()
	defer context.AfterFunc(ctx, func() { _ = conn.SetReadDeadline(time.Now()) })()
	defer conn.SetReadDeadline(time.Time{})
	next := time.Now().Add(s.cfg.StatusInterval)
	deadline := next
	_ = conn.SetReadDeadline(deadline)
	for {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		now := time.Now()
		if !now.Before(next) {
			if err := s.sendStatus(ctx); err != nil {
				return err
			}
			next = now.Add(s.cfg.StatusInterval)
		}
		want := next
		if s.round.Entries() > 0 {
			if due := s.walAt.Add(s.cfg.Linger); due.Before(want) {
				want = due
			}
		}
		if !want.Equal(deadline) {
			deadline = want
			_ = conn.SetReadDeadline(deadline)
		}
		msg, err := s.repl.ReceiveMessage(context.Background())
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if pgconn.Timeout(err) {
				// A deadline that passed while this process was busy times
				// out at once: publish only after Linger without WAL.
				if s.round.Entries() > 0 && time.Since(s.walAt) >= s.cfg.Linger {
					if err := s.flush(ctx); err != nil {
						return err
					}
				}
				continue
			}
			return fmt.Errorf("receive replication message: %w", err)
		}
		if s.round.Entries() > 0 {
			s.walAt = time.Now()
		}
		if err := s.pub.Err(); err != nil {
			return err
		}
		switch m := msg.(type) {
		case *pgproto3.CopyData:
			if len(m.Data) == 0 {
				continue
			}
			switch m.Data[0] {
			case pglogrepl.PrimaryKeepaliveMessageByteID:
				k, err := pglogrepl.ParsePrimaryKeepaliveMessage(m.Data[1:])
				if err != nil {
					return fmt.Errorf("parse keepalive: %w", err)
				}
				if !s.dec.InTx() && s.round.Entries() == 0 && s.pendingCommit == 0 {
					s.pub.MarkIdle(uint64(k.ServerWALEnd))
				}
				s.metrics.ServerLSN.Set(float64(k.ServerWALEnd))
				if k.ReplyRequested {
					next = time.Now()
				}
			case pglogrepl.XLogDataByteID:
				x, err := pglogrepl.ParseXLogData(m.Data[1:])
				if err != nil {
					return fmt.Errorf("parse xlog data: %w", err)
				}
				if err := s.handle(ctx, x.WALData); err != nil {
					return err
				}
			}
		case *pgproto3.ErrorResponse:
			return fmt.Errorf("replication error: %s (SQLSTATE %s)", m.Message, m.Code)
		}
	}
}

// endSpan ends the transaction's span, failed when err is set.
func (s *session) endSpan(err error) {
	if s.span == nil {
		return
	}
	s.span.SetAttributes(telemetry.BatchCount(s.txChanges))
	if err != nil {
		telemetry.Fail(s.span, errorType(err), err.Error())
	}
	s.span.End()
	s.span, s.traceparent = nil, ""
	s.tp = s.tp[:0]
}

// errorType names a failed publish for error.type: a JetStream error
// code, a timeout, or "publish".
func errorType(err error) string {
	var apiErr *jetstream.APIError
	switch {
	case errors.As(err, &apiErr):
		return "jetstream_" + strconv.Itoa(int(apiErr.ErrorCode))
	case errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	}
	return "publish"
}

func (s *session) handle(ctx context.Context, data []byte) error {
	ev, err := s.dec.Decode(ctx, data)
	if err != nil {
		return err
	}
	switch ev.Kind {
	case pgrepl.EventBegin:
		// A publish span per transaction (the messaging conventions): its
		// changes carry its context, so router and delivery continue it.
		if s.traced || telemetry.Enabled() { // no per-transaction work otherwise
			_, s.span = s.tracer.Start(ctx, telemetry.OpPublish+" "+s.cfg.Stream.Name, trace.WithSpanKind(trace.SpanKindProducer),
				trace.WithAttributes(telemetry.Messaging(telemetry.SystemNATS, telemetry.OpPublish, s.cfg.Stream.Name, 0)...),
				trace.WithAttributes(attribute.String("pgs2.source", s.cfg.Stream.Source), attribute.Int64("pgs2.xid", int64(ev.Xid)),
					attribute.String("pgs2.commit_lsn", pglogrepl.LSN(ev.LSN).String())))
			s.traceparent = telemetry.TraceParent(s.span.SpanContext())
			s.tp = append(s.tp[:0], s.traceparent...)
		}
		s.commitMs = ev.CommitMs
		s.xid = ev.Xid
		// Committed long ago (by the server's clock): reading a backlog.
		// (XLogData's WAL end cannot tell: a logical walsender sends the
		// record's own LSN.)
		s.behind = time.Now().UnixMilli()+s.clockSkew-ev.CommitMs > backlogAge.Milliseconds()
		s.txChanges = 0
	case pgrepl.EventRow:
		if err := s.row(ctx, &ev.Row); err != nil || ev.Moved == nil {
			return err
		}
		return s.row(ctx, ev.Moved) // the insert half of a row moving to another group
	case pgrepl.EventCommit:
		s.ring.Add(s.xid)
		if s.round.Entries() == 0 {
			s.pub.Mark(ev.LSN) // its changes (if any) are published
		} else {
			s.pendingCommit = ev.LSN
			s.commits++
			// Publish at a commit once the round is Linger old, or at once
			// when nothing published is waiting for its ack and the last
			// round is Linger old (a live transaction gains nothing by
			// waiting; many small ones still make rounds of Linger); while
			// far behind the server's WAL, let it grow (larger messages).
			age := time.Since(s.roundStarted)
			if s.perRound > 0 && s.commits >= s.perRound ||
				s.perRound == 0 && !s.behind && (age >= s.cfg.Linger || s.pub.InFlight() == 0 && time.Since(s.lastFlush) >= s.cfg.Linger) ||
				s.perRound == 0 && s.behind && age >= bus.MaxRoundAge {
				if err := s.flush(ctx); err != nil {
					s.endSpan(err)
					return err
				}
			}
		}
		s.metrics.Transactions.Inc()
		s.metrics.Changes.Add(float64(s.txChanges))
		s.lastCommitMs.Store(s.commitMs)
		s.endSpan(nil)
	case pgrepl.EventMessage:
		s.metrics.Messages.Inc()
		if ev.Message.Invalid != "" {
			s.log.Warn("ignored a transaction annotation", "reason", ev.Message.Invalid, "commit_lsn", pglogrepl.LSN(s.dec.CommitLSN()))
		}
		if ev.Message.Prefix == backfill.Prefix && !ev.Message.Transactional {
			return s.onMarker(ctx, ev.Message.Content, ev.LSN)
		}
	case pgrepl.EventTruncate:
		s.metrics.Truncates.Inc()
		s.log.Warn("TRUNCATE is not captured as changes; sinks keep the rows they already received", "tables", ev.Tables)
	}
	return nil
}

// row adds a decoded change to the round, unless the stream has it.
func (s *session) row(ctx context.Context, r *pgrepl.Row) error {
	s.table = append(append(append(s.table[:0], r.Schema...), '.'), r.Table...)
	if s.windows.Tracking(s.table) { // a backfill chunk's window is open: its rows of this key are older
		s.windows.Observe(s.table, r.PK, r.OldPK)
	}
	if s.resume.Skip(r.Pos, r.Key) { // already in the stream
		s.skipped++
		s.metrics.Skipped.Inc()
		return nil
	}
	e := &s.entry
	*e = bus.Entry{Key: r.Key, Group: r.Group, Action: []byte(r.Action), Table: s.table, Schema: s.table[:len(r.Schema)], CommitMs: s.commitMs, TraceParent: s.tp, Body: r.Body}
	s.txChanges++
	return s.add(ctx, r, e)
}

// add puts change r (as entry e) into the round, publishing the round when
// it is full.
func (s *session) add(ctx context.Context, r *pgrepl.Row, e *bus.Entry) error {
	if e.Size() > s.maxBody {
		// Too large for this NATS server: publish a stub in its place,
		// marked, so delivery parks it visibly (its group waits) instead
		// of the whole capture stalling on it.
		reason := fmt.Sprintf("the change is %d bytes, more than the NATS server's max_payload allows (%d); raise max_payload", len(r.Body), s.maxBody+16<<10)
		e.Body, e.Error, e.ErrorKind = oversizedStub(r, reason), []byte(reason), bus.ErrorTooLarge
		s.log.Error("change too large for NATS; published a stub that delivery parks", "table", string(e.Table), "key", string(r.Key), "bytes", len(r.Body))
	}
	if s.round.Entries() == 0 {
		s.roundStarted, s.roundFirst = time.Now(), string(r.Key)
		s.walAt = s.roundStarted
		if s.completing != nil && !s.resume.Partial {
			s.completing = nil // this round starts past the interrupted one
		}
		if s.completing != nil { // completes an interrupted round: named as it, so a cut here is read back with it
			s.roundFirst = s.completing.First.Key()
		}
	}
	s.roundLast = string(r.Key)
	if s.completing != nil && r.Pos.Less(s.completing.Last) {
		s.roundLast = s.completing.Last.Key()
	}
	s.round.Add(s.subjects.Subject(r.Group), e)
	s.published++
	if s.round.Entries() >= maxRoundEntries || s.round.Bytes() >= bus.MaxRoundBytes {
		return s.flush(ctx)
	}
	return nil
}

// Round limits (bus has the ones router shares).
const (
	maxRoundEntries = 8192
	// A round may grow to bus.MaxRoundAge while catching up: reading
	// transactions committed more than backlogAge ago.
	backlogAge = 500 * time.Millisecond
)

// flush publishes the round: one message per subject (more when one
// filled up), each with Pgs2-Msg-Id = its last change's key, then marks
// the round's last commit for confirmation.
func (s *session) flush(ctx context.Context) error {
	s.lastFlush = time.Now()
	msgs := s.round.Msgs()
	n := strconv.Itoa(len(msgs))
	for i, m := range msgs {
		s.pub.SetHeader(bus.HeaderRound, strconv.Itoa(i+1)+"/"+n)
		s.pub.SetHeader(bus.HeaderRoundFirst, s.roundFirst)
		s.pub.SetHeader(bus.HeaderRoundLast, s.roundLast)
		s.pub.SetHeader(bus.HeaderEntries, strconv.Itoa(m.Batch.Len()))
		if err := s.publish(ctx, m.Subject, m.LastKey, m.Batch.Bytes()); err != nil {
			return err
		}
	}
	s.round.Reset()
	s.commits = 0
	if len(msgs) > 0 && !s.resume.Partial {
		// Past the interrupted round: its changes are all stored now.
		// (Until then every round is named as it, so that a cut in any of
		// them is read back with all of them.)
		s.completing = nil
	}
	if s.pendingCommit != 0 {
		s.pub.Mark(s.pendingCommit)
		s.pendingCommit = 0
	}
	return nil
}

// oversizedStub stands in for a change too large to publish: its identity
// and the reason, in the message format's shape.
func oversizedStub(r *pgrepl.Row, reason string) []byte {
	b, _ := json.Marshal(map[string]any{
		"record": nil, "changes": nil, "action": r.Action, "error": reason,
		"metadata": map[string]any{"table_schema": r.Schema, "table_name": r.Table, "commit_lsn": r.Pos.LSN,
			"commit_idx": r.Pos.Idx, "idempotency_key": string(r.Key), "record_pks": json.RawMessage(r.Group)},
	})
	return b
}
