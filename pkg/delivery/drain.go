package delivery

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/s2-streamstore/s2-sdk-go/s2"

	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/fn"
	"github.com/pgs2/pgs2/pkg/s2sink"
)

// drainWhileIdle drains parks, a batch at a time, while their retries are
// due and no delivery message is waiting.
func (w *worker) drainWhileIdle(ctx context.Context, msgs <-chan jetstream.Msg) error {
	for len(msgs) == 0 {
		did, err := w.drainOne(ctx)
		if err != nil || !did {
			return err
		}
	}
	return nil
}

// drainOne retries the head of the next parked group whose retry is due:
// as many of its parked messages, in order, as one append takes, then
// removes them from the park. A head that still cannot go waits for its
// back-off (and reaches the dead-letter stream after retry.max_attempts);
// a group whose park is empty flows again. did reports whether it tried.
func (w *worker) drainOne(ctx context.Context) (did bool, err error) {
	group, st := w.parks.nextDue(time.Now())
	if st == nil {
		return false, nil
	}
	maxRecords := w.s.cfg.Batch.MaxRecords
	maxBytes := w.s.cfg.Batch.MaxBytes
	if maxBytes <= 0 || maxBytes > s2sink.MaxBatchBytes {
		maxBytes = s2sink.MaxBatchBytes
	}
	msgs, err := w.parks.head(ctx, group, maxRecords, maxBytes)
	if err != nil {
		return true, err
	}
	if len(msgs) == 0 {
		w.parks.remove(group)
		w.log.Info("group unparked", "group_id", group)
		return true, nil
	}
	var recs []s2.AppendRecord
	var first, last bus.DeliveryPos
	var head *parkedMsg  // the batch's first record's message
	var through uint64   // the last park message the batch accounts for
	var stuck *parkedMsg // the first message that cannot go now
	var stuckErr *s2sink.Error
	bytes := w.resumeRoom
	for _, m := range msgs {
		rec, keep, why := w.parkedRecord(m)
		if why != nil {
			stuck, stuckErr = m, why
			break
		}
		if !keep { // the sink's functions filter it out now: nothing to append
			through = m.seq
			continue
		}
		size := s2sink.MeteredSize(rec.Headers, rec.Body)
		if len(recs) > 0 && (len(recs) >= maxRecords || bytes+size > maxBytes) {
			break
		}
		if len(recs) == 0 {
			first, head = m.pos, m
		}
		recs, bytes, last, through = append(recs, rec), bytes+size, m.pos, m.seq
	}
	if len(recs) > 0 {
		// The batch's last record carries the resume point (every entry
		// read so far is appended or parked: the normal batch is empty
		// here) and which park messages it holds.
		recs[len(recs)-1] = s2sink.WithResume(recs[len(recs)-1], w.read, parkRef(group, through))
		b := s2sink.NewBatch(maxRecords, maxBytes)
		for _, r := range recs {
			if err := b.Add(r); err != nil {
				return true, fmt.Errorf("drain park %s of %s: %w", group, w.u, err)
			}
		}
		e, err := w.append(ctx, b, first, last)
		if err != nil {
			return true, err
		}
		if e != nil { // S2 refuses the append: the head waits
			w.d.metrics.Failures.WithLabelValues(w.u.Sink, e.Class.String(), strconv.Itoa(e.Status), e.Code).Inc()
			return true, w.headFailed(ctx, group, st, head, e)
		}
		w.d.metrics.Records.WithLabelValues(w.u.Sink).Add(float64(len(recs)))
		w.d.metrics.Batches.WithLabelValues(w.u.Sink).Inc()
	}
	if through > 0 {
		if len(recs) == 0 { // filtered out: S2 holds no trace of them
			if err := w.parks.settle(ctx, w.read); err != nil {
				return true, err
			}
		}
		if err := w.parks.purge(ctx, group, through); err != nil {
			return true, err
		}
		st.attempts, st.due = 0, time.Time{} // more may follow at once
		return true, nil
	}
	// The head itself cannot go.
	return true, w.headFailed(ctx, group, st, stuck, stuckErr)
}

// headFailed counts a failed retry of a park's head: it waits for its
// back-off, or reaches the dead-letter stream after retry.max_attempts
// (and the group goes on).
func (w *worker) headFailed(ctx context.Context, group string, st *parkedGroup, head *parkedMsg, e *s2sink.Error) error {
	st.attempts++
	if max := w.s.cfg.Retry.MaxAttempts; max > 0 && st.attempts >= max {
		reason := head.header.Get(HeaderParkReason)
		if e != nil && e != errStuck {
			reason = e.Error()
		}
		// Dead letter, then progress (see deadLetterBatch).
		if err := w.parks.checkOwner(ctx); err != nil {
			return err
		}
		if err := w.deadLetter(ctx, head.header, head.body, reason, st.attempts); err != nil {
			return err
		}
		if err := w.parks.settle(ctx, w.read); err != nil {
			return err
		}
		st.attempts, st.due = 0, time.Time{}
		return w.parks.purge(ctx, group, head.seq)
	}
	st.due = time.Now().Add(w.backoff(st.attempts, e))
	return nil
}

// parkedMsg is a message read from a park.
type parkedMsg struct {
	seq    uint64 // in the park stream
	pos    bus.DeliveryPos
	header nats.Header
	body   []byte
}

// errStuck marks a parked message that cannot be appended as it is (an
// operator acknowledges it, or a fixed function lets it through).
var errStuck = &s2sink.Error{Op: "retry a parked message", Class: s2sink.RetryUntilFixed}

// parkedRecord builds the S2 record of a parked message if it can go now:
// keep=false when the sink's functions filter it out now; why is set when
// it cannot go.
func (w *worker) parkedRecord(m *parkedMsg) (rec s2.AppendRecord, keep bool, why *s2sink.Error) {
	e := headerEntry(m.header, nil)
	body := m.body
	switch e.ErrorKind {
	case bus.ErrorNone:
	case bus.ErrorFunction:
		// The router's functions failed on it: run the sink's functions
		// as they are now (fixed, one hopes).
		out, keep, err := w.rerun(body)
		if err != nil {
			w.log.Debug("functions still fail on a parked message", "error", err)
			return rec, false, &s2sink.Error{Op: "retry a parked message", Class: s2sink.RetryUntilFixed, Message: err.Error()}
		}
		if !keep {
			return rec, false, nil
		}
		body = out
	default: // capture or the router could not carry it: an operator acknowledges it
		return rec, false, errStuck
	}
	rec = s2sink.Record(e, body, m.pos)
	if size := s2sink.MeteredSize(rec.Headers, rec.Body) + w.resumeRoom; size > s2sink.MaxBatchBytes {
		return rec, false, errStuck // too large: stays until acknowledged
	}
	return rec, true, nil
}

// head reads up to max messages (and about maxBytes) of a group's park,
// oldest first.
func (p *unitParks) head(ctx context.Context, group string, max, maxBytes int) ([]*parkedMsg, error) {
	subj := ParkSubject(p.u, group)
	var out []*parkedMsg
	bytes := 0
	for seq := uint64(1); len(out) < max && bytes < maxBytes; {
		m, err := bus.LeaderNextMsg(ctx, p.js, ParkedStream, seq, subj) // not a replica's: one behind says the park is empty
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("head of park %s of %s: %w", group, p.u, err)
		}
		pos, err := bus.ParseDeliveryPos(m.Header.Get(HeaderDeliverySeq))
		if err != nil {
			return nil, fmt.Errorf("parked message %d of %s was parked by an earlier pgs2 (%w): empty the parks with that build before upgrading, or acknowledge it (pgs2ctl messages ack)",
				m.Sequence, p.u, err)
		}
		out = append(out, &parkedMsg{seq: m.Sequence, pos: pos, header: m.Header, body: m.Data})
		bytes += len(m.Data)
		seq = m.Sequence + 1
	}
	return out, nil
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
