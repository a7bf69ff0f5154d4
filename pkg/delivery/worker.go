package delivery

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/fn"
	"github.com/pgs2/pgs2/pkg/s2sink"
	"github.com/pgs2/pgs2/pkg/telemetry"
)

// worker delivers one unit.
type worker struct {
	d   *Delivery
	u   Unit
	s   *sink
	st  jetstream.Stream
	log *slog.Logger

	tail   uint64          // the S2 stream's next seq_num, as this writer knows it
	parked map[string]bool // group hashes with parked messages
	// parkedThrough is the last delivery position already parked: on a
	// re-read, parked groups' changes up to it are in the park already.
	parkedThrough bus.DeliveryPos
	// done is the last delivery position S2 holds: on a re-read, changes
	// up to it are skipped.
	done       bus.DeliveryPos
	batch      *s2sink.Batch
	seqs       []bus.DeliveryPos // delivery positions of the batch's records
	entry      bus.Entry
	pending    uint64   // messages the stream holds for the unit beyond the last one read
	traces     []string // their traceparents, when tracing is on
	retries    map[string]*retryState
	retryNow   chan struct{}
	validUntil atomic.Int64 // the lease, in Unix nanoseconds, minus a margin
	token      string       // this process's fencing token
}

// extend moves the lease's end.
func (w *worker) extend(until time.Time) { w.validUntil.Store(until.UnixNano()) }

// owned reports whether the lease still covers the next append.
func (w *worker) owned() error {
	if time.Now().UnixNano() > w.validUntil.Load() {
		return fmt.Errorf("%w: %s not renewed in time", ErrLeaseLost, w.u)
	}
	return nil
}

// retryState is the back-off of one parked group's head.
type retryState struct {
	attempts int
	next     time.Time
}

func newWorker(d *Delivery, u Unit, s *sink, st jetstream.Stream) *worker {
	return &worker{d: d, u: u, s: s, st: st, log: d.log.With("unit", u.String()), token: d.leases.id,
		batch:    s2sink.NewBatch(s.cfg.Batch.MaxRecords, s.cfg.Batch.MaxBytes),
		retries:  map[string]*retryState{},
		retryNow: make(chan struct{}, 1)}
}

func (w *worker) run(ctx context.Context) {
	backoff := 100 * time.Millisecond
	var firstFail time.Time
	attempts := 0
	for {
		started := time.Now()
		err := w.session(ctx)
		if ctx.Err() != nil || errors.Is(err, ErrLeaseLost) {
			if err != nil && ctx.Err() == nil {
				w.log.Warn("stopping", "error", err)
			}
			return
		}
		if time.Since(started) > 30*time.Second {
			backoff = 100 * time.Millisecond
		}
		if s2sink.Classify(err) != nil { // S2 refuses even to tell where we are: visible as blocked
			if firstFail.IsZero() {
				firstFail = time.Now()
			}
			attempts++
			w.recordFailure(ctx, Blocked{Sink: w.u.Sink, Basin: w.u.Basin, Stream: w.u.Stream, Attempts: attempts,
				FirstFailure: firstFail, LastFailure: time.Now(), NextAttempt: time.Now().Add(backoff)}, err)
		}
		w.log.Warn("delivery session ended; restarting", "error", err, "retry_in", backoff)
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 5*time.Second)
	}
}

// errReread means the S2 stream's tail is not what this writer expected
// (another writer, or an operator): read the progress again.
var errReread = errors.New("S2 stream changed under this writer")

func (w *worker) session(ctx context.Context) error {
	c := w.s.client
	if w.s.cfg.CreateStream {
		if err := c.CreateStream(ctx, w.u.Basin, w.u.Stream); err != nil {
			return err
		}
	}
	// Fence the stream with this process's token: a previous owner that
	// still holds messages can no longer append them.
	if err := w.owned(); err != nil {
		return err
	}
	// A missing stream cannot be fenced: go on unfenced, so its appends
	// fail visibly (and reach the dead-letter stream after
	// retry.max_attempts); once it exists the first append meets the fence
	// mismatch and the next session fences it.
	if _, err := c.Fence(ctx, w.u.Basin, w.u.Stream, w.token); err != nil && !notFound(err) {
		return err
	}
	pos, tail, found, err := c.Progress(ctx, w.u.Basin, w.u.Stream)
	if notFound(err) {
		pos, tail, found, err = bus.DeliveryPos{}, 0, false, nil
	}
	if err != nil {
		return err
	}
	w.clearFailure(ctx) // S2 answers again (a failure recorded by an earlier worker goes too)
	w.tail, w.done = tail, pos
	if err := w.loadParks(ctx); err != nil {
		return err
	}
	occ := jetstream.OrderedConsumerConfig{FilterSubjects: []string{bus.DeliveryStreamFilter(w.u.Sink, w.u.Basin, w.u.Stream)}}
	if found { // from the message of the last change S2 holds: its later changes may be missing
		occ.DeliverPolicy, occ.OptStartSeq = jetstream.DeliverByStartSequencePolicy, pos.Seq
	}
	cons, err := w.d.js.OrderedConsumer(ctx, w.d.cfg.DeliveryStream, occ)
	if err != nil {
		return fmt.Errorf("read %s: %w", w.u, err)
	}
	it, err := cons.Messages(jetstream.PullMaxMessages(2 * w.s.cfg.Batch.MaxRecords))
	if err != nil {
		return fmt.Errorf("read %s: %w", w.u, err)
	}
	defer it.Stop()
	msgs := make(chan jetstream.Msg, w.s.cfg.Batch.MaxRecords)
	readErr := make(chan error, 1)
	go func() {
		defer close(msgs)
		for {
			m, err := it.Next()
			if err != nil {
				readErr <- err
				return
			}
			select {
			case msgs <- m:
			case <-ctx.Done():
				return
			}
		}
	}()
	w.log.Debug("delivering", "after", pos, "s2_tail", tail)

	linger := w.s.cfg.Batch.Linger.D()
	drainTick := time.NewTicker(100 * time.Millisecond)
	defer drainTick.Stop()
	sub, err := w.d.js.Conn().Subscribe(RetrySubject(w.u), func(*nats.Msg) { w.RetryNow() })
	if err != nil {
		return fmt.Errorf("subscribe to retries of %s: %w", w.u, err)
	}
	defer sub.Unsubscribe()
	for {
		var m jetstream.Msg
		var ok bool
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-drainTick.C:
			if err := w.drain(ctx); err != nil {
				return err
			}
			continue
		case <-w.retryNow:
			for _, r := range w.retries {
				r.next = time.Time{}
			}
			if err := w.drain(ctx); err != nil {
				return err
			}
			continue
		case m, ok = <-msgs:
		}
		if !ok {
			return fmt.Errorf("read %s: %w", w.u, <-readErr)
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
			// The stream holds nothing more for this unit: wait only for
			// the rest of a burst (a router round), not the whole linger.
			var idle <-chan time.Time
			if w.pending == 0 && len(msgs) == 0 {
				idle = time.After(min(idleGap, linger))
			}
			select {
			case m, ok = <-msgs:
				if !ok {
					break fill
				}
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
		if !ok {
			return fmt.Errorf("read %s: %w", w.u, <-readErr)
		}
	}
}

// idleGap ends a batch's linger early once the unit's stream has nothing
// more and no message arrived for this long.
const idleGap = time.Millisecond

// add puts a delivery message's changes into the batch, or parks them.
// full reports that the batch must be flushed.
func (w *worker) add(ctx context.Context, m jetstream.Msg) (full bool, err error) {
	md, err := m.Metadata()
	if err != nil {
		return false, err
	}
	seq := md.Sequence.Stream
	w.pending = md.NumPending
	r := bus.NewBatchReader(m.Data())
	e := &w.entry
	for idx := 0; r.Next(e); idx++ {
		pos := bus.DeliveryPos{Seq: seq, Idx: idx}
		if !w.done.Less(pos) {
			continue // in S2 already
		}
		if err := w.addEntry(ctx, m.Subject(), pos, e); err != nil {
			return false, err
		}
	}
	if err := r.Err(); err != nil {
		// Not a batch this build reads: park it whole, visible, rather than
		// stall the stream or drop it.
		*e = bus.Entry{CommitMs: -1, Body: m.Data()}
		pos := bus.DeliveryPos{Seq: seq, Idx: 1 << 30}
		if w.done.Less(pos) {
			return false, w.park(ctx, m.Subject(), pos, e, groupHash(""), fmt.Sprintf("delivery message %d: %v", seq, err), nil)
		}
	}
	return w.batch.Len() >= w.s.cfg.Batch.MaxRecords, nil
}

// addEntry puts one change into the batch (flushing it when full), or
// parks it.
func (w *worker) addEntry(ctx context.Context, subject string, pos bus.DeliveryPos, e *bus.Entry) error {
	group := groupHash(string(e.Group))
	if w.parked[group] {
		if !w.parkedThrough.Less(pos) {
			return nil // parked before a restart
		}
		return w.park(ctx, subject, pos, e, group, "an earlier change of this group is parked", nil)
	}
	if len(e.Error) > 0 {
		return w.park(ctx, subject, pos, e, group, string(e.Error), nil)
	}
	rec := s2sink.Record(e, e.Body, pos)
	switch err := w.batch.Add(rec); {
	case errors.Is(err, s2sink.ErrRecordTooLarge):
		return w.park(ctx, subject, pos, e, group, err.Error(), nil)
	case errors.Is(err, s2sink.ErrBatchFull):
		if err := w.flush(ctx); err != nil {
			return err
		}
		return w.addEntry(ctx, subject, pos, e)
	case err != nil:
		return err
	}
	w.seqs = append(w.seqs, pos)
	if telemetry.Enabled() {
		w.traces = append(w.traces, string(e.TraceParent))
	}
	if w.batch.Len() >= w.s.cfg.Batch.MaxRecords {
		return w.flush(ctx)
	}
	return nil
}

// flush appends the batch, retrying with back-off until S2 takes it.
// match_seq_num makes a retry after an append that took effect (a timeout,
// a 5xx) detectable: S2 then reports the tail we would have reached.
func (w *worker) flush(ctx context.Context) error {
	n := uint64(w.batch.Len())
	if n == 0 {
		return nil
	}
	if telemetry.Enabled() {
		var links []trace.Link
		for _, tp := range w.traces {
			if sc := telemetry.ParseTraceParent(tp); sc.IsValid() && len(links) < 128 {
				links = append(links, trace.Link{SpanContext: sc})
			}
		}
		var span trace.Span
		ctx, span = w.d.tracer.Start(ctx, "s2 append", trace.WithSpanKind(trace.SpanKindProducer), trace.WithLinks(links...),
			trace.WithAttributes(attribute.String("pgs2.unit", w.u.String()), attribute.Int("pgs2.records", int(n))))
		defer span.End()
	}
	defer func() { w.traces = w.traces[:0] }()
	var firstFail time.Time
	defer func() {
		if !firstFail.IsZero() {
			w.clearFailure(context.WithoutCancel(ctx))
		}
	}()
	for attempt := 1; ; attempt++ {
		if err := w.owned(); err != nil {
			return err
		}
		expected := w.tail
		start := time.Now()
		ack, err := w.s.client.AppendFenced(ctx, w.u.Basin, w.u.Stream, w.batch, &expected, &w.token)
		if err == nil {
			w.tail = ack.End
			w.d.metrics.AppendTime.WithLabelValues(w.u.Sink).Observe(time.Since(start).Seconds())
			w.d.metrics.Batches.WithLabelValues(w.u.Sink).Inc()
			w.d.metrics.Records.WithLabelValues(w.u.Sink).Add(float64(n))
			break
		}
		e := s2sink.Classify(err)
		if e != nil {
			w.d.metrics.Failures.WithLabelValues(w.u.Sink, e.Class.String()).Inc()
		}
		if e != nil && e.Class == s2sink.FencingMismatch {
			return fmt.Errorf("%w: another process fenced %s", ErrLeaseLost, w.u)
		}
		if e != nil && e.Class == s2sink.SeqNumMismatch {
			if e.Tail == expected+n { // the earlier attempt landed
				w.tail = e.Tail
				break
			}
			return fmt.Errorf("%w: expected tail %d, S2 has %d", errReread, expected, e.Tail)
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if firstFail.IsZero() {
			firstFail = time.Now()
		}
		if max := w.s.cfg.Retry.MaxAttempts; max > 0 && attempt >= max {
			if err := w.deadLetterBatch(ctx, err, attempt); err != nil {
				return err
			}
			break
		}
		delay := w.backoff(attempt, e)
		w.log.Warn("append failed; retrying", "error", err, "attempt", attempt, "failing_since", firstFail, "retry_in", delay)
		w.recordFailure(ctx, Blocked{Sink: w.u.Sink, Basin: w.u.Basin, Stream: w.u.Stream, HeadSeq: w.seqs[0].Seq, Records: int(n),
			Attempts: attempt, FirstFailure: firstFail, LastFailure: time.Now(), NextAttempt: time.Now().Add(delay)}, err)
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
	w.batch.Reset()
	w.seqs = w.seqs[:0]
	return nil
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

// groupHash names a group in park subjects.
func groupHash(group string) string {
	return strconv.Itoa(bus.Partition([]byte(group), 1<<30))
}

// park moves a change to the unit's park. Records of other groups in the
// current batch are appended first, so the park never runs ahead of S2
// (progress on restart is the S2 stream's, plus what the park holds).
func (w *worker) park(ctx context.Context, subject string, pos bus.DeliveryPos, e *bus.Entry, group, reason string, s2err *s2sink.Error) error {
	if err := w.flush(ctx); err != nil {
		return err
	}
	h := entryHeader(e)
	h.Set(bus.HeaderMsgID, "park:"+pos.String())
	h.Set(HeaderDeliverySeq, pos.String())
	h.Set(HeaderParkReason, reason)
	h.Set(HeaderParkedAt, time.Now().UTC().Format(time.RFC3339Nano))
	h.Set(HeaderSubject, subject)
	if s2err != nil {
		h.Set(HeaderS2Status, strconv.Itoa(s2err.Status))
		h.Set(HeaderS2Code, s2err.Code)
	}
	subj := ParkSubject(w.u, group)
	if _, err := w.d.js.PublishMsg(ctx, &nats.Msg{Subject: subj, Header: h, Data: e.Body}); err != nil {
		return fmt.Errorf("park change %s of %s: %w", pos, w.u, err)
	}
	w.d.metrics.Parked.WithLabelValues(w.u.Sink).Inc()
	if !w.parked[group] {
		w.log.Warn("group parked", "group", string(e.Group), "position", pos, "reason", reason)
	}
	w.parked[group] = true
	w.parkedThrough = pos
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
	if e.CommitMs >= 0 {
		h.Set(bus.HeaderCommitMs, strconv.FormatInt(e.CommitMs, 10))
	}
	return h
}

// headerEntry is entryHeader's inverse.
func headerEntry(h nats.Header, body []byte) *bus.Entry {
	e := &bus.Entry{Key: []byte(h.Get(bus.HeaderKey)), Group: []byte(h.Get(bus.HeaderGroup)), Action: []byte(h.Get(bus.HeaderAction)),
		Table: []byte(h.Get(bus.HeaderTable)), TraceParent: []byte(h.Get(bus.HeaderTraceParent)), Error: []byte(h.Get(bus.HeaderError)),
		CommitMs: -1, Body: body}
	if ms, err := strconv.ParseInt(h.Get(bus.HeaderCommitMs), 10, 64); err == nil {
		e.CommitMs = ms
	}
	return e
}

// loadParks learns which groups of the unit are parked and up to which
// delivery sequence.
func (w *worker) loadParks(ctx context.Context) error {
	w.parked = map[string]bool{}
	w.parkedThrough = bus.DeliveryPos{}
	ps, err := w.d.js.Stream(ctx, ParkedStream)
	if err != nil {
		return fmt.Errorf("park stream %s: %w", ParkedStream, err)
	}
	filter := ParkFilter(w.u)
	info, err := ps.Info(ctx, jetstream.WithSubjectFilter(filter))
	if err != nil {
		return fmt.Errorf("list parked groups of %s: %w", w.u, err)
	}
	for subj, n := range info.State.Subjects {
		if _, group, ok := parseParkSubject(subj); ok && n > 0 {
			w.parked[group] = true
		}
	}
	if len(w.parked) == 0 {
		return nil
	}
	last, err := ps.GetLastMsgForSubject(ctx, filter)
	if err != nil {
		return fmt.Errorf("last parked message of %s: %w", w.u, err)
	}
	w.parkedThrough, err = bus.ParseDeliveryPos(last.Header.Get(HeaderDeliverySeq))
	if err != nil {
		return fmt.Errorf("last parked message of %s: %w", w.u, err)
	}
	return nil
}

// RetryNow makes the worker retry its parked groups at once.
func (w *worker) RetryNow() {
	select {
	case w.retryNow <- struct{}{}:
	default:
	}
}

// drain retries the head of each parked group whose back-off has passed;
// a head that goes through is removed from the park and the next one is
// tried; a group whose park is empty flows again.
func (w *worker) drain(ctx context.Context) error {
	if len(w.parked) == 0 {
		return nil
	}
	ps, err := w.d.js.Stream(ctx, ParkedStream)
	if err != nil {
		return fmt.Errorf("park stream: %w", err)
	}
	for g := range w.parked {
		r := w.retries[g]
		if r == nil {
			r = &retryState{next: time.Now().Add(w.s.cfg.Retry.Initial.D())}
			w.retries[g] = r
		}
		if time.Now().Before(r.next) {
			continue
		}
		for {
			head, err := ps.GetMsg(ctx, 1, jetstream.WithGetMsgSubject(ParkSubject(w.u, g)))
			if errors.Is(err, jetstream.ErrMsgNotFound) {
				delete(w.parked, g)
				delete(w.retries, g)
				w.log.Info("group unparked", "group_hash", g)
				break
			}
			if err != nil {
				return fmt.Errorf("head of park %s: %w", g, err)
			}
			done, e, err := w.tryHead(ctx, head)
			if err != nil {
				return err
			}
			if !done {
				r.attempts++
				if max := w.s.cfg.Retry.MaxAttempts; max > 0 && r.attempts >= max {
					reason := head.Header.Get(HeaderParkReason)
					if e != nil {
						reason = e.Error()
					}
					if err := w.deadLetter(ctx, head.Header, head.Data, reason, r.attempts); err != nil {
						return err
					}
				} else {
					r.next = time.Now().Add(w.backoff(r.attempts, e))
					break
				}
			}
			if err := ps.DeleteMsg(ctx, head.Sequence); err != nil {
				return fmt.Errorf("remove delivered message %d from the park: %w", head.Sequence, err)
			}
			r.attempts = 0
		}
	}
	return nil
}

// tryHead appends a parked message if it can go now.
func (w *worker) tryHead(ctx context.Context, head *jetstream.RawStreamMsg) (done bool, e *s2sink.Error, err error) {
	body := head.Data
	if reason := head.Header.Get(bus.HeaderError); reason != "" {
		if !strings.HasPrefix(reason, `sink "`) {
			return false, nil, nil // capture could not carry it: an operator acknowledges it
		}
		// The router's functions failed on it: run the sink's functions as
		// they are now (fixed, one hopes).
		out, keep, err := w.rerun(body)
		if err != nil {
			w.log.Debug("functions still fail on a parked message", "error", err)
			return false, nil, nil
		}
		if !keep {
			return true, nil, nil // filtered out now: nothing to append
		}
		body = out
	}
	pos, _ := bus.ParseDeliveryPos(head.Header.Get(HeaderDeliverySeq))
	b := s2sink.NewBatch(1, 0)
	if err := b.Add(s2sink.Record(headerEntry(head.Header, nil), body, pos)); err != nil {
		return false, nil, nil // too large: stays until acknowledged
	}
	if err := w.owned(); err != nil {
		return false, nil, err
	}
	expected := w.tail
	ack, aerr := w.s.client.AppendFenced(ctx, w.u.Basin, w.u.Stream, b, &expected, &w.token)
	if aerr == nil {
		w.tail = ack.End
		return true, nil, nil
	}
	e = s2sink.Classify(aerr)
	if e != nil && e.Class == s2sink.FencingMismatch {
		return false, nil, fmt.Errorf("%w: another process fenced %s", ErrLeaseLost, w.u)
	}
	if e != nil && e.Class == s2sink.SeqNumMismatch {
		if e.Tail == expected+1 {
			w.tail = e.Tail
			return true, nil, nil
		}
		return false, nil, fmt.Errorf("%w: expected tail %d, S2 has %d", errReread, expected, e.Tail)
	}
	return false, e, nil
}

// deadLetterBatch moves the failing batch to the dead-letter stream after
// retry.max_attempts, with its last error, and lets the unit go on.
func (w *worker) deadLetterBatch(ctx context.Context, cause error, attempts int) error {
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
	w.log.Error("moved a batch to the dead-letter stream after retry.max_attempts", "records", w.batch.Len(), "error", cause)
	return nil
}

// deadLetter publishes one message to the dead-letter stream.
func (w *worker) deadLetter(ctx context.Context, h nats.Header, body []byte, reason string, attempts int) error {
	dh := nats.Header{}
	for k, v := range h {
		if k != bus.HeaderMsgID && k != bus.HeaderExpectedLastID {
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

// rerun applies the sink's functions to a parked change. A routing result
// other than this unit cannot be appended here (one writer per stream):
// the message stays for an operator.
func (w *worker) rerun(body []byte) (out []byte, keep bool, err error) {
	f := w.s.fns.Load()
	in, err := fn.ParseInput(body)
	if err != nil {
		return nil, false, err
	}
	if keep, err = f.Keep(in); err != nil || !keep {
		return nil, false, err
	}
	basin, stream, err := f.Route(in)
	if err != nil {
		return nil, false, err
	}
	if (basin != "" && basin != w.u.Basin) || (stream != "" && stream != w.u.Stream) {
		return nil, false, fmt.Errorf("routes to %s/%s now, not %s/%s", basin, stream, w.u.Basin, w.u.Stream)
	}
	if !f.HasTransform() {
		return body, true, nil
	}
	out, err = f.TransformBody(in)
	return out, err == nil, err
}
