package delivery

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/s2-streamstore/s2-sdk-go/s2"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/restart"
	"github.com/pgs2/pgs2/pkg/s2sink"
	"github.com/pgs2/pgs2/pkg/telemetry"
)

// appender is what a worker needs of S2 (s2sink.Client has it): appends
// with match_seq_num and a fencing token, the tail, and reading records
// back.
type appender interface {
	CreateStream(ctx context.Context, basin, stream string) error
	Fence(ctx context.Context, basin, stream, token string) (uint64, error)
	AppendFenced(ctx context.Context, basin, stream string, b *s2sink.Batch, matchSeqNum *uint64, token *string) (s2sink.Ack, error)
	s2sink.RecordReader
}

// worker delivers one unit.
type worker struct {
	d     *Delivery
	u     Unit
	s     *sink
	s2    appender
	log   *slog.Logger
	parks *unitParks

	tail uint64 // the S2 stream's next seq_num, as this writer knows it
	// sources are the delivery streams the unit's changes come from, one
	// per source (setSources; a change restarts the session).
	mu      sync.Mutex
	sources []source
	resync  chan struct{}
	keys    map[string]string // the session's sources: stream name → key
	// done is the session's resume point, a position per source: entries
	// at or before it are in S2 (or parked) already.
	done bus.Progress
	// read is the last entry read of each source: once the batch is
	// appended, every entry up to it is in S2 or parked (every batch's
	// last record carries it as its resume point).
	read       bus.Progress
	resumeRoom int // what the resume headers add to a batch's last record, at most
	batch      *s2sink.Batch
	seqs       []bus.DeliveryPos // delivery positions of the batch's records
	entry      bus.Entry
	pending    map[string]uint64 // per source: messages its stream holds for the unit beyond the last one read
	traces     []string          // their traceparents, when tracing is on
	retryNow   chan struct{}
	lastFlush  time.Time // when the last batch was appended
	// validUntil ends the worker's lease (Unix nanoseconds) before the
	// process's (a test seam: none by default).
	validUntil atomic.Int64
	token      string // this process's fencing token
	// batchFirstMs, batchLastMs, batchLastKey: commit times and key of the
	// batch's first and last change, for status.
	batchFirstMs, batchLastMs int64
	batchLastKey              []byte
	statMu                    sync.Mutex
	stat                      bus.UnitStatus
}

// status is the unit as this worker knows it (for status requests).
func (w *worker) status() bus.UnitStatus {
	w.statMu.Lock()
	defer w.statMu.Unlock()
	st := w.stat
	st.Sink, st.Basin, st.Stream = w.u.Sink, w.u.Basin, w.u.Stream
	switch {
	case st.State != "":
	case st.Pending == 0 && st.OldestWaitingMs == 0:
		st.State = "idle"
	default:
		st.State = "delivering"
	}
	return st
}

// noteStatus updates the worker's status under its lock.
func (w *worker) noteStatus(f func(st *bus.UnitStatus)) {
	w.statMu.Lock()
	f(&w.stat)
	w.statMu.Unlock()
}

// pendingSum is what the unit's delivery streams hold beyond the last
// message read.
func (w *worker) pendingSum() uint64 {
	var n uint64
	for _, p := range w.pending {
		n += p
	}
	return n
}

// pendingByStream is pendingSum per delivery stream (by name).
func (w *worker) pendingByStream() map[string]uint64 {
	by := make(map[string]uint64, len(w.keys))
	for name, key := range w.keys {
		by[name] = w.pending[key]
	}
	return by
}

// extend moves the lease's end.
func (w *worker) extend(until time.Time) { w.validUntil.Store(until.UnixNano()) }

// owned reports whether the lease still covers the next append.
func (w *worker) owned() error {
	if time.Now().UnixNano() > w.validUntil.Load() {
		return fmt.Errorf("%w: %s not renewed in time", ErrLeaseLost, w.u)
	}
	return w.d.leases.valid()
}

func newWorker(d *Delivery, u Unit, s *sink) *worker {
	w := &worker{d: d, u: u, s: s, s2: s.client, log: d.log.With("unit", u.String()), token: d.leases.id,
		batch:    s2sink.NewBatch(s.cfg.Batch.MaxRecords, s.cfg.Batch.MaxBytes),
		retryNow: make(chan struct{}, 1), resync: make(chan struct{}, 1)}
	w.validUntil.Store(math.MaxInt64)
	w.parks = newUnitParks(d.js, d.parked, u, w.token)
	return w
}

// setSources sets the delivery streams the unit's changes come from; a
// running session that lacks one of them restarts to read it too.
func (w *worker) setSources(l []source) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if slices.Equal(w.sources, l) {
		return
	}
	w.sources = slices.Clone(l)
	select {
	case w.resync <- struct{}{}:
	default:
	}
}

// errResync ends a session whose unit's sources changed (a new source's
// delivery stream has changes for it, or a stream is gone).
var errResync = errors.New("the delivery streams with changes for this unit changed")

// sessionRestarts is the back-off between a worker's sessions.
var sessionRestarts = restart.Policy{Min: 100 * time.Millisecond, Max: 5 * time.Second, ResetAfter: 30 * time.Second}

func (w *worker) run(ctx context.Context) {
	var firstFail time.Time
	attempts := 0
	restart.Loop(ctx, sessionRestarts, w.session, func(err error, wait time.Duration) bool {
		if errors.Is(err, ErrLeaseLost) {
			w.log.Warn("stopping", "error", err)
			return false
		}
		if errors.Is(err, errResync) {
			w.log.Info("reading another source", "error", err)
			return true
		}
		if s2sink.Classify(err) != nil { // S2 refuses even to tell where we are: visible as blocked
			if firstFail.IsZero() {
				firstFail = time.Now()
			}
			attempts++
			w.recordFailure(ctx, Blocked{Sink: w.u.Sink, Basin: w.u.Basin, Stream: w.u.Stream, Attempts: attempts,
				FirstFailure: firstFail, LastFailure: time.Now(), NextAttempt: time.Now().Add(wait)}, err)
		}
		w.log.Warn("delivery session ended; restarting", "error", err, "retry_in", wait)
		return true
	})
}

// errReread means the S2 stream's tail is not what this writer expected
// (another writer, or an operator): read the progress again.
var errReread = errors.New("S2 stream changed under this writer")

func (w *worker) session(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx) // ends the reader with the session
	defer cancel()
	// A failed append of the last session left its batch: the entries
	// are read again.
	w.batch.Reset()
	w.seqs, w.traces = w.seqs[:0], w.traces[:0]
	c := w.s2
	// Attach to the shared readers before waiting for a start slot and
	// S2: while thousands of sessions start (a backlog routed to 10,000
	// new streams), their messages wait in feeds instead of passing the
	// readers, which would leave each unit to catch up on a consumer of
	// its own (a scan of the stream each).
	pre := w.preattach()
	defer pre.leave(w.u)
	// Sessions start a few at a time: thousands of units starting at once
	// (a takeover) would queue more JetStream API requests than the server
	// answers within their timeout, and every one would start again.
	release, err := w.d.startSlot(ctx)
	if err != nil {
		return err
	}
	defer release()
	// Fence the stream with this process's token: a previous owner that
	// still holds messages can no longer append them.
	if err := w.owned(); err != nil {
		return err
	}
	_, err = c.Fence(ctx, w.u.Basin, w.u.Stream, w.token)
	if notFound(err) && w.s.cfg.CreateStream { // created when first missing, not at every session
		if err := c.CreateStream(ctx, w.u.Basin, w.u.Stream); err != nil {
			return err
		}
		_, err = c.Fence(ctx, w.u.Basin, w.u.Stream, w.token)
	}
	// A missing stream cannot be fenced: go on unfenced, so its appends
	// fail visibly (and reach the dead-letter stream after
	// retry.max_attempts); once it exists the first append meets the fence
	// mismatch and the next session fences it.
	if err != nil && !notFound(err) {
		return err
	}
	res, err := s2sink.FindResume(ctx, c, w.u.Basin, w.u.Stream)
	if notFound(err) {
		res, err = s2sink.Resume{}, nil
	}
	if err != nil {
		return err
	}
	w.clearFailure(ctx) // S2 answers again (a failure recorded by an earlier worker goes too)
	// Claim the unit's parks (later publishes by an earlier owner are
	// refused from here on) and learn which groups are parked.
	if err := w.parks.open(ctx, res.Park); err != nil {
		return err
	}
	// Every change up to the last one parked is in S2 or in a park too: a
	// change is parked only once every change read before it is appended.
	w.tail, w.done = res.Tail, res.Through.Clone()
	w.done.Merge(w.parks.through)
	w.read = w.done.Clone()
	w.mu.Lock()
	select { // this session reads them all (under the lock: a later change signals again)
	case <-w.resync:
	default:
	}
	sources := slices.Clone(w.sources)
	w.mu.Unlock()
	w.keys, w.pending = map[string]string{}, map[string]uint64{}
	keys := make([]string, 0, len(sources)+len(w.done))
	for _, src := range sources {
		w.keys[src.name] = src.key
		keys = append(keys, src.key)
	}
	for k := range w.done { // positions of a stream gone still go on
		if !slices.Contains(keys, k) {
			keys = append(keys, k)
		}
	}
	w.resumeRoom = s2sink.ResumeRoom(keys, parkRefRoom)
	w.batch.Reserve(s2sink.ResumeRoom(keys, 0))
	// A few messages between the readers and the batch (each may hold
	// many changes; the feeds hold the rest): a channel's buffer is
	// allocated whole, and 10,000 idle units held 160 MB in buffers of
	// MaxRecords.
	msgs := make(chan jetstream.Msg, sessionMessages)
	readErr := make(chan error, len(sources))
	for _, src := range sources {
		if err := w.read1(ctx, src, msgs, readErr, pre.take(src.key)); err != nil {
			return err
		}
	}
	release()
	w.log.Debug("delivering", "after", w.done, "s2_tail", res.Tail, "parked_groups", w.parks.count())

	linger := w.s.cfg.Batch.Linger.D()
	drainTick := time.NewTicker(100 * time.Millisecond)
	defer drainTick.Stop()
	for {
		var m jetstream.Msg
		var drain <-chan time.Time // idle units wake for nothing (a blocked-on ticker only)
		if w.parks.count() > 0 {
			drain = drainTick.C
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-readErr:
			return fmt.Errorf("read %s: %w", w.u, err)
		case <-w.resync:
			return errResync
		case <-drain:
			if err := w.drainWhileIdle(ctx, msgs); err != nil {
				return err
			}
			continue
		case <-w.retryNow:
			w.parks.dueNow()
			if err := w.drainWhileIdle(ctx, msgs); err != nil {
				return err
			}
			continue
		case m = <-msgs:
		}
		timer := time.NewTimer(linger)
	fill:
		for {
			if full, err := w.add(ctx, m); err != nil {
				timer.Stop()
				return err
			} else if full {
				break
			}
			// The stream holds nothing more for this unit now: append at
			// once if this was the router round's last message (and the
			// last append is idleGap old: many small rounds still make
			// batches), else after a short gap for the rest of the round
			// (its messages to other partitions may not be stored yet),
			// not after the whole linger. What arrives while the append
			// runs makes the next batch.
			var idle <-chan time.Time
			if w.pendingNone() && len(msgs) == 0 {
				if roundEnds(m) && time.Since(w.lastFlush) >= idleGap {
					break fill
				}
				idle = time.After(min(idleGap, linger))
			}
			select {
			case m = <-msgs:
			case <-timer.C:
				break fill
			case <-idle:
				break fill
			case <-ctx.Done():
				timer.Stop()
				return ctx.Err()
			}
		}
		timer.Stop()
		if err := w.flush(ctx); err != nil {
			return err
		}
		// A draining park takes one batch per batch of the unit's other
		// changes: they keep at least half of the appends.
		if _, err := w.drainOne(ctx); err != nil {
			return err
		}
	}
}

// sessionMessages is how many messages wait between a session's readers
// and its batch.
const sessionMessages = 64

// idleGap ends a batch's linger early once the unit's stream has nothing
// more and no message arrived for this long.
const idleGap = time.Millisecond

// roundEnds reports whether m is the last message of its router round
// (Pgs2-Round i/n with i == n).
func roundEnds(m jetstream.Msg) bool {
	i, n, err := bus.ParseRound(m.Headers().Get(bus.HeaderRound))
	return err == nil && i > 0 && i == n
}

// parkRefRoom is the longest parkRef: a group id and a sequence.
const parkRefRoom = 32 + 1 + 20

// read1 starts reading the unit's messages of one source's delivery
// stream, from the message of the last change handled (its later changes
// may not be), into msgs: with its own consumer until it has caught up,
// then from the process's shared reader (fanout) while it keeps up. With
// pre, a feed attached before the session began, it reads from the feed
// at once when the feed holds every message wanted, and else on its own
// only up to the feed's position. The reader ends with the session.
func (w *worker) read1(ctx context.Context, src source, msgs chan<- jetstream.Msg, readErr chan<- error, pre *preFeed) error {
	var from uint64 // the first sequence wanted (0: the stream's first)
	if pos, ok := w.done[src.key]; ok {
		from = pos.Seq
	} else {
		from = w.firstSeq(ctx, src, pre)
	}
	var own *ownReader
	var f *feed
	var at uint64 // f's position when attached
	var upTo bool // own reads up to at, then f
	switch {
	case pre != nil && from > pre.at: // it holds them all
		f = pre.f
	case w.d.fan != nil:
		// The shared reader has not read past it yet, or still holds what
		// it passed: no catching up (this feed replaces pre's).
		if f = w.d.fan.attachAhead(ctx, src, w.u, from); f != nil && pre != nil {
			pre.f.leave(src, w.u)
		} else if f == nil && pre != nil {
			f, at, upTo = pre.f, pre.at, true // on its own up to pre's position
		}
	}
	if f == nil || upTo {
		var err error
		if own, err = w.ownReader(ctx, src, from); err != nil {
			if f != nil {
				f.leave(src, w.u)
			}
			return err
		}
	}
	go func() {
		err := w.readLoop(ctx, src, own, f, at, from, msgs)
		if err != nil && ctx.Err() == nil {
			readErr <- fmt.Errorf("%s: %w", src.name, err)
		}
	}()
	return nil
}

// firstSeq is where a unit without a position in src starts: at its first
// message there (which the stream's leader finds in its subject index),
// or, with none yet, after pre's position (every message up to it is on
// the leader: later ones go into pre). 0 (the stream's first) when it
// cannot tell.
func (w *worker) firstSeq(ctx context.Context, src source, pre *preFeed) uint64 {
	m, err := bus.LeaderNextMsg(ctx, w.d.js, src.name, 1, unitFilter(src, w.u))
	switch {
	case err == nil:
		return m.Sequence
	case errors.Is(err, jetstream.ErrMsgNotFound) && pre != nil:
		return pre.at + 1
	}
	return 0
}

// preFeed is a feed attached before the session began, at position at.
type preFeed struct {
	src source
	f   *feed
	at  uint64
}

// preFeeds are a session's feeds by source key, until read1 takes them.
type preFeeds map[string]*preFeed

// preattach attaches the unit to its sources' running shared readers (a
// reader is started by a session that knows where to start it).
func (w *worker) preattach() preFeeds {
	if w.d.fan == nil {
		return nil
	}
	w.mu.Lock()
	sources := slices.Clone(w.sources)
	w.mu.Unlock()
	pre := preFeeds{}
	for _, src := range sources {
		if f, at, ok := w.d.fan.attachRunning(src, w.u); ok {
			pre[src.key] = &preFeed{src: src, f: f, at: at}
		}
	}
	return pre
}

// take hands over a source's feed (nil when there is none).
func (p preFeeds) take(key string) *preFeed {
	f := p[key]
	delete(p, key)
	return f
}

// leave detaches the feeds not taken.
func (p preFeeds) leave(u Unit) {
	for _, f := range p {
		f.f.leave(f.src, u)
	}
}

// ownReader is a consumer of the unit's messages of one source from
// sequence from on (0: the first).
type ownReader struct {
	cons jetstream.Consumer
	it   jetstream.MessagesContext
}

func (w *worker) ownReader(ctx context.Context, src source, from uint64) (*ownReader, error) {
	occ := jetstream.OrderedConsumerConfig{FilterSubjects: []string{unitFilter(src, w.u)},
		InactiveThreshold: bus.OrderedInactive}
	if from > 0 {
		occ.DeliverPolicy, occ.OptStartSeq = jetstream.DeliverByStartSequencePolicy, from
	}
	cons, err := w.d.js.OrderedConsumer(ctx, src.name, occ)
	if err != nil {
		return nil, fmt.Errorf("read %s from %s: %w", w.u, src.name, err)
	}
	it, err := cons.Messages(jetstream.PullMaxMessages(2 * w.s.cfg.Batch.MaxRecords))
	if err != nil {
		bus.DropConsumer(w.d.js, src.name, cons)
		return nil, fmt.Errorf("read %s from %s: %w", w.u, src.name, err)
	}
	return &ownReader{cons: cons, it: it}, nil
}

func (o *ownReader) close(js jetstream.JetStream, stream string) {
	o.it.Stop()
	bus.DropConsumer(js, stream, o.cons)
}

// readLoop forwards the unit's messages of one source from sequence from
// on into msgs in order, each once: from own until it has caught up and
// the unit is attached to the shared reader, then from the feed until it
// is detached, then from a new consumer after the last message
// forwarded, and so on. It starts with own (and f, attached at position
// at, to switch to once past it), or with f alone.
func (w *worker) readLoop(ctx context.Context, src source, own *ownReader, f *feed, at, from uint64, msgs chan<- jetstream.Msg) error {
	var last uint64 // the last sequence forwarded
	if from > 0 {
		last = from - 1
	}
	send := func(m jetstream.Msg, seq uint64) error {
		select {
		case msgs <- m:
			last = seq
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	defer func() {
		if own != nil {
			own.close(w.d.js, src.name)
		}
	}()
	attachNow := f == nil // a first read attaches at once; after a detach, once caught up
	for {
		if own == nil { // read from the feed until it was detached
			err := w.readFeed(ctx, f, &last, send)
			f.leave(src, w.u)
			if err != nil {
				return err
			}
			// Detached: on its own again, after the last message forwarded.
			if own, err = w.ownReader(ctx, src, last+1); err != nil {
				return err
			}
			f, attachNow = nil, false
		}
		var err error
		if f, err = w.readOwn(ctx, src, own, &last, send, f, at, attachNow); err != nil {
			return err
		}
		own.close(w.d.js, src.name)
		own = nil
	}
}

// readOwn forwards own's messages until the unit is attached to the
// shared reader (f, attached at position at; else at once if attachNow,
// or once it has caught up: a unit whose feed was detached for falling
// behind would fill the next one as fast, and make and drop a consumer
// each time) and own delivers its first message past the attach
// position: the feed holds that one and every later one, and own has
// delivered every earlier one (an ordered consumer skips none); it
// returns the feed.
func (w *worker) readOwn(ctx context.Context, src source, own *ownReader, last *uint64, send func(jetstream.Msg, uint64) error, f *feed, at uint64, attachNow bool) (*feed, error) {
	stop := context.AfterFunc(ctx, func() { own.it.Stop() })
	defer stop()
	attach := func() {
		if w.d.fan == nil {
			return
		}
		var err error
		if f, at, err = w.d.fan.attach(ctx, src, w.u); err != nil {
			f = nil // reading on its own
		}
	}
	leave := func() {
		if f != nil {
			f.leave(src, w.u)
			f = nil
		}
	}
	if f == nil && attachNow {
		attach()
	}
	for {
		m, err := own.it.Next()
		if err != nil {
			leave()
			return nil, err
		}
		md, err := m.Metadata()
		if err != nil {
			leave()
			return nil, err
		}
		if f != nil {
			select {
			case <-f.gone: // it fell behind the feed: on its own for now
				leave()
			default:
			}
		}
		if f != nil && md.Sequence.Stream > at {
			return f, nil // the feed has it and everything after it
		}
		if err := send(m, md.Sequence.Stream); err != nil {
			leave()
			return nil, err
		}
		if md.NumPending == 0 && f == nil {
			// Caught up: attach; the next message past the attach
			// switches it. (Not sooner: nothing pending by its consumer's
			// info did not prove that every earlier message had been
			// delivered, and lost messages.)
			attach()
		}
	}
}

// readFeed forwards the feed's messages after *last until the feed is
// detached and empty.
func (w *worker) readFeed(ctx context.Context, f *feed, last *uint64, send func(jetstream.Msg, uint64) error) error {
	for {
		if m, rest, ok := f.pop(); ok {
			fm, err := f.take(m, rest)
			if err != nil {
				return err
			}
			md, _ := fm.Metadata()
			if md.Sequence.Stream <= *last {
				continue // read on its own already
			}
			if err := send(fm, md.Sequence.Stream); err != nil {
				return err
			}
			continue
		}
		select {
		case <-f.ready:
		case <-f.gone: // nothing is queued after this: what is queued still goes
			if f.queued() == 0 {
				return nil
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// pendingNone reports whether no source's stream holds more for the unit.
func (w *worker) pendingNone() bool {
	for _, n := range w.pending {
		if n > 0 {
			return false
		}
	}
	return true
}

// add puts a delivery message's changes into the batch, or parks them.
// full reports that the batch must be flushed.
func (w *worker) add(ctx context.Context, m jetstream.Msg) (full bool, err error) {
	md, err := m.Metadata()
	if err != nil {
		return false, err
	}
	seq := md.Sequence.Stream
	key, ok := w.keys[md.Stream]
	if !ok {
		return false, fmt.Errorf("a message of stream %s, not one of the unit's sources", md.Stream)
	}
	w.pending[key] = md.NumPending
	r := bus.NewBatchReader(m.Data())
	e := &w.entry
	for idx := 0; r.Next(e); idx++ {
		pos := bus.DeliveryPos{Stream: key, Seq: seq, Idx: idx}
		if w.done.Covers(pos) {
			continue // in S2 already
		}
		if err := w.addEntry(ctx, m.Subject(), pos, e); err != nil {
			return false, err
		}
		w.read[key] = pos
	}
	if err := r.Err(); errors.Is(err, bus.ErrNewerBatch) {
		// A newer router wrote it: stop here (the session retries) until
		// this process is upgraded; parking it would let its groups' later
		// changes overtake it. What came before it goes to S2 first.
		if ferr := w.flush(ctx); ferr != nil {
			return false, ferr
		}
		return false, fmt.Errorf("delivery message %d of %s: %w", seq, md.Stream, err)
	} else if err != nil {
		// Not a batch this build reads: park it whole, visible, rather than
		// stall the stream or drop it.
		*e = bus.Entry{CommitMs: -1, Body: m.Data()}
		pos := bus.DeliveryPos{Stream: key, Seq: seq, Idx: bus.WholeMessage}
		if !w.done.Covers(pos) {
			if err := w.park(ctx, m.Subject(), pos, e, groupID(md.Stream, nil, nil), parkFailed, fmt.Sprintf("delivery message %d of %s: %v", seq, md.Stream, err), nil); err != nil {
				return false, err
			}
			w.read[key] = pos
		}
	}
	return w.batch.Len() >= w.s.cfg.Batch.MaxRecords, nil
}

// addEntry puts one change into the batch (flushing it when full), or
// parks it.
func (w *worker) addEntry(ctx context.Context, subject string, pos bus.DeliveryPos, e *bus.Entry) error {
	group := groupID(bus.KeyName(pos.Stream), e.Table, e.Group)
	if w.parks.has(group) {
		return w.park(ctx, subject, pos, e, group, parkBehind, "an earlier change of this group is parked", nil)
	}
	if len(e.Error) > 0 {
		return w.park(ctx, subject, pos, e, group, parkFailed, string(e.Error), nil)
	}
	rec := s2sink.Record(e, e.Body, pos)
	switch err := w.batch.Add(rec); {
	case errors.Is(err, s2sink.ErrRecordTooLarge):
		return w.park(ctx, subject, pos, e, group, parkFailed, err.Error(), nil)
	case errors.Is(err, s2sink.ErrBatchFull):
		if err := w.flush(ctx); err != nil {
			return err
		}
		return w.addEntry(ctx, subject, pos, e)
	case err != nil:
		return err
	}
	if w.batch.Len() == 1 {
		w.batchFirstMs = e.CommitMs
	}
	w.batchLastMs, w.batchLastKey = e.CommitMs, append(w.batchLastKey[:0], e.Key...)
	w.seqs = append(w.seqs, pos)
	w.read[pos.Stream] = pos // in the batch: a flush now seals it with this record counted
	if telemetry.Enabled() {
		w.traces = append(w.traces, string(e.TraceParent))
	}
	if w.batch.Len() >= w.s.cfg.Batch.MaxRecords {
		return w.flush(ctx)
	}
	return nil
}

// allOneTrace reports whether every link (at least one) is of the first
// one's trace.
func allOneTrace(links []trace.Link) bool {
	for _, l := range links[1:] {
		if l.SpanContext.TraceID() != links[0].SpanContext.TraceID() {
			return false
		}
	}
	return true
}

// errorType is a failed append's error.type: S2's error code, else its
// HTTP status, else the failure's class (a timeout, the network).
func errorType(e *s2sink.Error) string {
	switch {
	case e.Code != "":
		return e.Code
	case e.Status != 0:
		return strconv.Itoa(e.Status)
	}
	return e.Class.String()
}

// flush appends the batch, retrying with back-off until S2 takes it.
// match_seq_num makes a retry after an append that took effect (a timeout,
// a 5xx) detectable: S2 then reports another tail, and reading the records
// there back tells whether they are this batch.
func (w *worker) flush(ctx context.Context) error {
	n := uint64(w.batch.Len())
	if n == 0 {
		return nil
	}
	defer func() { w.lastFlush = time.Now() }()
	// A send span per attempt (the messaging conventions), linked to each
	// change's process span; a batch of one change's trace (or one
	// transaction's) continues that trace.
	var startSpan func(attempt int) trace.Span
	if telemetry.Enabled() {
		var links []trace.Link
		for _, tp := range w.traces {
			if sc := telemetry.ParseTraceParent(tp); sc.IsValid() && len(links) < 128 {
				links = append(links, trace.Link{SpanContext: sc})
			}
		}
		parent := ctx
		if len(links) > 0 && allOneTrace(links) {
			parent = trace.ContextWithRemoteSpanContext(ctx, links[0].SpanContext)
		}
		startSpan = func(attempt int) trace.Span {
			_, span := w.d.tracer.Start(parent, telemetry.OpSend+" "+w.u.Stream, trace.WithSpanKind(trace.SpanKindProducer), trace.WithLinks(links...),
				trace.WithAttributes(telemetry.Messaging(telemetry.SystemS2, telemetry.OpSend, w.u.Stream, int(n))...),
				trace.WithAttributes(attribute.String("pgs2.sink", w.u.Sink), attribute.String("pgs2.basin", w.u.Basin), attribute.Int("pgs2.attempt", attempt)))
			return span
		}
	}
	defer func() { w.traces = w.traces[:0] }()
	pending, by, parked := w.pendingSum(), w.pendingByStream(), w.parks.count()
	w.noteStatus(func(st *bus.UnitStatus) {
		st.Pending, st.PendingBy, st.ParkedGroups, st.OldestWaitingMs = pending, by, parked, max(w.batchFirstMs, 1)
	})
	// The batch's last record carries the resume point: every change read
	// so far is in the batch or parked.
	if err := w.batch.Seal(s2sink.ThroughHeader(w.read)); err != nil {
		return err
	}
	var firstFail time.Time
	defer func() {
		if !firstFail.IsZero() {
			w.clearFailure(context.WithoutCancel(ctx))
		}
	}()
	for attempt := 1; ; attempt++ {
		start := time.Now()
		var span trace.Span
		logCtx := ctx // the attempt's span, for the log's trace_id
		if startSpan != nil {
			span = startSpan(attempt)
			logCtx = trace.ContextWithSpan(ctx, span)
		}
		e, err := w.append(ctx, w.batch, w.seqs[0], w.seqs[n-1])
		if span != nil {
			switch {
			case err != nil:
				telemetry.Fail(span, "stopped", err.Error())
			case e != nil:
				telemetry.Fail(span, errorType(e), e.Error())
			}
			span.End()
		}
		if err != nil {
			return err
		}
		if e == nil {
			w.d.metrics.AppendTime.WithLabelValues(w.u.Sink).Observe(time.Since(start).Seconds())
			if w.batchFirstMs > 0 {
				w.d.metrics.CommitToAck.WithLabelValues(w.u.Sink).Observe(max(0, time.Since(time.UnixMilli(w.batchFirstMs)).Seconds()))
			}
			w.d.metrics.Batches.WithLabelValues(w.u.Sink).Inc()
			w.d.metrics.Records.WithLabelValues(w.u.Sink).Add(float64(n))
			break
		}
		w.d.metrics.Failures.WithLabelValues(w.u.Sink, e.Class.String(), strconv.Itoa(e.Status), e.Code).Inc()
		w.noteStatus(func(st *bus.UnitStatus) { st.State, st.LastError = "blocked", e.Error() })
		if firstFail.IsZero() {
			firstFail = time.Now()
		}
		if max := w.s.cfg.Retry.MaxAttempts; max > 0 && attempt >= max {
			if err := w.deadLetterBatch(ctx, e, attempt); err != nil {
				return err
			}
			break
		}
		delay := w.backoff(attempt, e)
		w.log.WarnContext(logCtx, "append failed; retrying", "error", e, "attempt", attempt, "failing_since", firstFail, "retry_in", delay)
		w.recordFailure(ctx, Blocked{Sink: w.u.Sink, Basin: w.u.Basin, Stream: w.u.Stream, HeadSeq: w.seqs[0].Seq, Records: int(n),
			Attempts: attempt, FirstFailure: firstFail, LastFailure: time.Now(), NextAttempt: time.Now().Add(delay)}, e)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-w.retryNow:
		case <-time.After(delay):
		}
	}
	if !firstFail.IsZero() {
		w.log.Info("append succeeded after failures", "failing_for", time.Since(firstFail).Round(time.Millisecond))
	}
	key := string(w.batchLastKey)
	w.noteStatus(func(st *bus.UnitStatus) {
		st.State, st.LastError, st.OldestWaitingMs = "", "", 0
		st.LastCommitMs, st.LastKey, st.LastAppend = w.batchLastMs, key, time.Now()
	})
	w.batch.Reset()
	w.seqs = w.seqs[:0]
	return nil
}

// append makes one attempt to append b, whose records came from the
// delivery positions first to last, at the writer's tail. It returns the
// S2 failure to retry after (nil: b is in the stream), or an error that
// ends the session: ErrLeaseLost when another process fenced the stream,
// errReread when the stream's tail is not this writer's.
func (w *worker) append(ctx context.Context, b *s2sink.Batch, first, last bus.DeliveryPos) (*s2sink.Error, error) {
	if err := w.owned(); err != nil {
		return nil, err
	}
	n := uint64(b.Len())
	expected := w.tail
	ack, err := w.s2.AppendFenced(ctx, w.u.Basin, w.u.Stream, b, &expected, &w.token)
	if err == nil {
		w.tail = ack.End
		return nil, nil
	}
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	e := s2sink.Classify(err)
	switch {
	case e == nil:
		return nil, err
	case e.Class == s2sink.FencingMismatch:
		return nil, fmt.Errorf("%w: another process fenced %s", ErrLeaseLost, w.u)
	case e.Class == s2sink.SeqNumMismatch:
		// An earlier attempt may have landed (a timeout, a 5xx that took
		// effect), or another writer appended: read the records back.
		if e.Tail >= expected+n {
			landed, rerr := w.holds(ctx, expected, n, first, last)
			if rerr != nil {
				return nil, rerr
			}
			if landed {
				w.tail = expected + n
				return nil, nil
			}
		}
		return nil, fmt.Errorf("%w: expected tail %d, S2 has %d", errReread, expected, e.Tail)
	}
	return e, nil
}

// holds reports whether the n records at seq_num from on are a batch this
// writer appended, of the delivery positions first to last.
func (w *worker) holds(ctx context.Context, from, n uint64, first, last bus.DeliveryPos) (bool, error) {
	for _, probe := range []struct {
		seq uint64
		pos bus.DeliveryPos
	}{{from, first}, {from + n - 1, last}} {
		recs, err := w.s2.Read(ctx, w.u.Basin, w.u.Stream, probe.seq, 1)
		if err != nil {
			return false, err
		}
		if len(recs) == 0 || recs[0].SeqNum != probe.seq || recordPos(&recs[0]) != probe.pos.String() {
			return false, nil
		}
	}
	return true, nil
}

// recordPos is a record's pgs2-seq header ("" when it has none).
func recordPos(r *s2.SequencedRecord) string {
	for _, h := range r.Headers {
		if string(h.Name) == s2sink.HeaderSeq {
			return string(h.Value)
		}
	}
	return ""
}

// backoff is exponential from retry.initial to retry.max with full jitter
// in its upper half, and never shorter than S2's retry-after-ms.
func (w *worker) backoff(attempt int, e *s2sink.Error) time.Duration {
	initial, maxD := w.s.cfg.Retry.Initial.D(), w.s.cfg.Retry.Max.D()
	if e != nil && e.Class == s2sink.RetrySoon && attempt <= 3 {
		initial = min(initial, 100*time.Millisecond) // transient: start quick
	}
	d := initial
	for i := 1; i < attempt && d < maxD; i++ {
		d *= 2
	}
	d = min(d, maxD)
	d = d/2 + time.Duration(rand.Int64N(int64(d/2)+1))
	if e != nil && e.RetryAfter > d {
		d = e.RetryAfter
	}
	return d
}

// park moves a change to its group's park. Records of other groups in the
// current batch are appended first, so the park never runs ahead of S2
// (progress on restart is the S2 stream's, plus what the park holds).
func (w *worker) park(ctx context.Context, subject string, pos bus.DeliveryPos, e *bus.Entry, group string, kind parkKind, reason string, s2err *s2sink.Error) error {
	if err := w.flush(ctx); err != nil {
		return err
	}
	if err := w.owned(); err != nil {
		return err
	}
	// Every change read before it is appended (the flush above) or
	// parked: the unit's progress goes with the message.
	through := w.read.Clone()
	through.Advance(pos)
	h := entryHeader(e)
	h.Set(bus.HeaderMsgID, "park:"+w.u.String()+":"+pos.String())
	h.Set(HeaderDeliverySeq, pos.String())
	h.Set(HeaderThrough, through.String())
	h.Set(HeaderParkKind, string(kind))
	h.Set(HeaderParkReason, reason)
	h.Set(HeaderParkedAt, time.Now().UTC().Format(time.RFC3339Nano))
	h.Set(HeaderSubject, subject)
	if s2err != nil {
		h.Set(HeaderS2Status, strconv.Itoa(s2err.Status))
		h.Set(HeaderS2Code, s2err.Code)
	}
	if err := w.parks.publish(ctx, group, h, e.Body); err != nil {
		return fmt.Errorf("park change %s of %s: %w", pos, w.u, err)
	}
	w.d.metrics.Parked.WithLabelValues(w.u.Sink).Inc()
	if !w.parks.has(group) {
		w.log.Warn("group parked", "group", string(e.Group), "table", string(e.Table), "position", pos, "reason", reason)
	}
	w.parks.add(group, through, w.s.cfg.Retry.Initial.D())
	return nil
}

// entryHeader carries a change's fields as headers, outside its batch.
func entryHeader(e *bus.Entry) nats.Header {
	h := nats.Header{}
	set := func(name string, v []byte) {
		if len(v) > 0 {
			h.Set(name, string(v))
		}
	}
	set(bus.HeaderKey, e.Key)
	set(bus.HeaderGroup, e.Group)
	set(bus.HeaderAction, e.Action)
	set(bus.HeaderTable, e.Table)
	set(bus.HeaderTraceParent, e.TraceParent)
	set(bus.HeaderError, e.Error)
	if e.ErrorKind != bus.ErrorNone {
		h.Set(bus.HeaderErrorKind, e.ErrorKind.String())
	}
	if e.CommitMs >= 0 {
		h.Set(bus.HeaderCommitMs, strconv.FormatInt(e.CommitMs, 10))
	}
	return h
}

// headerEntry is entryHeader's inverse.
func headerEntry(h nats.Header, body []byte) *bus.Entry {
	e := &bus.Entry{Key: []byte(h.Get(bus.HeaderKey)), Group: []byte(h.Get(bus.HeaderGroup)), Action: []byte(h.Get(bus.HeaderAction)),
		Table: []byte(h.Get(bus.HeaderTable)), TraceParent: []byte(h.Get(bus.HeaderTraceParent)), Error: []byte(h.Get(bus.HeaderError)),
		ErrorKind: bus.ParseErrorKind(h.Get(bus.HeaderErrorKind)), CommitMs: -1, Body: body}
	if len(e.Error) > 0 && e.ErrorKind == bus.ErrorNone {
		e.ErrorKind = bus.ErrorUnknown // parked by a version that did not record the kind
	}
	if ms, err := strconv.ParseInt(h.Get(bus.HeaderCommitMs), 10, 64); err == nil {
		e.CommitMs = ms
	}
	return e
}

// RetryNow makes the worker retry its parked groups at once.
func (w *worker) RetryNow() {
	select {
	case w.retryNow <- struct{}{}:
	default:
	}
}

// deadLetterBatch moves the failing batch to the dead-letter stream after
// retry.max_attempts, with its last error, and lets the unit go on.
func (w *worker) deadLetterBatch(ctx context.Context, cause error, attempts int) error {
	// Dead letters first (idempotent: Nats-Msg-Id), then the progress:
	// a session that fails in between publishes them again, rather than
	// resume past changes that reached neither S2 nor the dead-letter
	// stream. The owner check keeps a stale owner out (settle is
	// conditional too).
	if err := w.parks.checkOwner(ctx); err != nil {
		return err
	}
	for i, r := range w.batch.Records() {
		h := nats.Header{}
		for _, hd := range r.Headers {
			h.Set("S2-"+string(hd.Name), string(hd.Value))
		}
		h.Set(HeaderDeliverySeq, w.seqs[i].String())
		if err := w.deadLetter(ctx, h, r.Body, cause.Error(), attempts); err != nil {
			return err
		}
	}
	// The batch holds every change read up to w.read that is not parked.
	if err := w.parks.settle(ctx, w.read); err != nil {
		return err
	}
	w.log.Error("moved a batch to the dead-letter stream after retry.max_attempts", "records", w.batch.Len(), "error", cause)
	return nil
}

// deadLetter publishes one message to the dead-letter stream.
func (w *worker) deadLetter(ctx context.Context, h nats.Header, body []byte, reason string, attempts int) error {
	dh := nats.Header{}
	for k, v := range h {
		if !strings.HasPrefix(k, "Nats-") { // the park's own (ids, expected sequences)
			dh[k] = v
		}
	}
	dh.Set(HeaderParkReason, reason)
	dh.Set(HeaderAttempts, strconv.Itoa(attempts))
	dh.Set(HeaderParkedAt, time.Now().UTC().Format(time.RFC3339Nano))
	dh.Set(bus.HeaderMsgID, "dead:"+w.u.String()+":"+dh.Get(HeaderDeliverySeq))
	subj := DeadSubject(w.u)
	if _, err := w.d.js.PublishMsg(ctx, &nats.Msg{Subject: subj, Header: dh, Data: body}); err != nil {
		return fmt.Errorf("dead-letter a message of %s: %w", w.u, err)
	}
	w.d.metrics.DeadLetters.WithLabelValues(w.u.Sink).Inc()
	return nil
}

func notFound(err error) bool {
	e := s2sink.Classify(err)
	return e != nil && e.Status == 404
}
