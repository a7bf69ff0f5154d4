package s2local

import (
	"context"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// readParams are a read's query parameters.
type readParams struct {
	seq, ts, tailOffset *uint64
	clamp               bool
	count, bytes, until *uint64
	wait                *uint64 // seconds
}

const maxUnaryWait = 60 * time.Second

func parseReadParams(r *http.Request) (readParams, *apiError) {
	var p readParams
	q := r.URL.Query()
	for key, dst := range map[string]**uint64{
		"seq_num": &p.seq, "timestamp": &p.ts, "tail_offset": &p.tailOffset,
		"count": &p.count, "bytes": &p.bytes, "until": &p.until, "wait": &p.wait,
	} {
		v := q.Get(key)
		if v == "" {
			continue
		}
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return p, errorf(codeBadQuery, "%s: %q is not a non-negative integer", key, v)
		}
		*dst = &n
	}
	if v := q.Get("clamp"); v != "" {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return p, errorf(codeBadQuery, "clamp: %q is not a boolean", v)
		}
		p.clamp = b
	}
	n := 0
	for _, x := range []*uint64{p.seq, p.ts, p.tailOffset} {
		if x != nil {
			n++
		}
	}
	if n > 1 {
		return p, errorf(codeInvalid, "only one of seq_num, timestamp, or tail_offset can be provided")
	}
	if p.ts != nil && p.until != nil && *p.ts >= *p.until {
		return p, errorf(codeInvalid, "start `timestamp` exceeds or equal to `until`")
	}
	return p, nil
}

// resolveStart finds where a read starts (S2's read_start_seq_num): beyond
// the tail is a 416 unless clamp; at the tail too for a read that may not
// follow (wait for new records).
func resolveStart(v *streamView, p readParams, mayFollow bool, rb *readBufs) (uint64, *apiError) {
	tail := v.tail
	var seq uint64
	byTS := p.ts != nil
	switch {
	case p.seq != nil:
		seq = *p.seq
	case byTS:
	case p.tailOffset != nil:
		seq = tail.seq - min(*p.tailOffset, tail.seq)
	default:
		seq = tail.seq
	}
	if (byTS && *p.ts > tail.ts) || (!byTS && seq > tail.seq) {
		if !p.clamp {
			return 0, unwritten(tail)
		}
		seq, byTS = tail.seq, false
	}
	if !byTS && seq == tail.seq && !mayFollow {
		return 0, unwritten(tail)
	}
	if byTS {
		s, err := v.seqForTimestamp(*p.ts, rb)
		if err != nil {
			return 0, readErr(v.s, err)
		}
		seq = s
	}
	return seq, nil
}

func readErr(s *stream, err error) *apiError {
	if err == errStreamGone {
		return s.notFound()
	}
	return errorf(codeStorage, "read %s/%s: %v", s.basin.name, s.name, err)
}

// read serves GET /v1/streams/{stream}/records: unary (JSON or protobuf),
// server-sent events (Accept: text/event-stream) or an s2s/proto session.
func (s *Server) read(w http.ResponseWriter, r *http.Request, basin, name string) {
	if r.Header.Get("s2-encryption-key") != "" {
		writeError(w, errorf(codeNotImplemented, "s2local does not implement stream encryption"))
		return
	}
	p, e := parseReadParams(r)
	if e != nil {
		writeError(w, e)
		return
	}
	if isS2S(r.Header.Get("Content-Type")) {
		s.streamingRead(w, r, basin, name, p, nil)
		return
	}
	f, e := parseFormat(r.Header.Get("s2-format"))
	if e != nil {
		writeError(w, e)
		return
	}
	if isEventStream(r.Header.Get("Accept")) {
		s.streamingRead(w, r, basin, name, p, &f)
		return
	}
	s.unaryRead(w, r, basin, name, p, f)
}

func (s *Server) unaryRead(w http.ResponseWriter, r *http.Request, basin, name string, p readParams, f format) {
	st, e := s.streamFor(basin, name, false)
	if e != nil {
		writeError(w, e)
		return
	}
	lim := readLimit{count: maxReadRecords, bytes: maxReadBytes}
	if p.count != nil {
		lim.count = int64(min(*p.count, maxReadRecords))
	}
	if p.bytes != nil {
		lim.bytes = int64(min(*p.bytes, maxReadBytes))
	}
	if p.until != nil {
		lim.until, lim.hasUntil = *p.until, true
	}
	var wait time.Duration
	if p.wait != nil {
		wait = min(time.Duration(min(*p.wait, 3600))*time.Second, maxUnaryWait)
	}
	mayFollow := wait > 0
	var rb readBufs
	defer rb.release()
	v, e := st.view(mayFollow)
	if e != nil {
		writeError(w, e)
		return
	}
	start, e := resolveStart(&v, p, mayFollow, &rb)
	if e != nil {
		writeError(w, e)
		return
	}
	recs, next, done, err := v.collect(start, lim, &rb, nil)
	if err != nil {
		writeError(w, readErr(st, err))
		return
	}
	if len(recs) == 0 && !done && mayFollow {
		// Long poll: wait for the first new records.
		timer := time.NewTimer(wait)
		defer timer.Stop()
	wait:
		for len(recs) == 0 {
			select {
			case <-v.notify:
			case <-timer.C:
				break wait
			case <-r.Context().Done():
				return
			}
			if v, e = st.view(true); e != nil {
				writeError(w, e)
				return
			}
			if recs, next, done, err = v.collect(start, lim, &rb, nil); err != nil {
				writeError(w, readErr(st, err))
				return
			}
			if done {
				break
			}
		}
	}
	var tail *position
	if next >= v.tail.seq {
		tail = &v.tail
	}
	if isProto(r.Header.Get("Accept")) {
		buf := make([]byte, 0, 256+len(recs)*32+int(v.bytesOf(recs)))
		for _, rr := range recs {
			buf = appendRecordProto(buf, rr.seq, rr.rec)
		}
		if tail != nil {
			buf = appendTailProto(buf, *tail)
		}
		writeRaw(w, http.StatusOK, "application/protobuf", buf, nil)
		return
	}
	buf := appendReadBatchJSON(make([]byte, 0, 256+len(recs)*64+int(v.bytesOf(recs))), f, recs, tail)
	writeRaw(w, http.StatusOK, "application/json", buf, nil)
}

func (v *streamView) bytesOf(recs []recordRef) int64 {
	var n int64
	for _, r := range recs {
		n += int64(len(r.rec.rest))
	}
	return n
}

// readEmitter writes a streaming read: server-sent events or s2s frames.
type readEmitter interface {
	batch(recs []recordRef, tail position, count, bytes int64) error
	heartbeat(tail position) error
	fail(e *apiError)
	end()
}

// streamingRead serves a read session (S2's read_session): catch up from
// the start, then follow the tail with heartbeats, until the count, bytes
// or until limit, the wait between records, or the client ends it. With
// sse == nil it speaks s2s/proto, else server-sent events in that format.
func (s *Server) streamingRead(w http.ResponseWriter, r *http.Request, basin, name string, p readParams, sse *format) {
	if sse != nil {
		if v := r.Header.Get("Last-Event-ID"); v != "" {
			parts := strings.SplitN(v, ",", 3)
			var nums [3]uint64
			for i := range nums {
				var err error
				if len(parts) != 3 {
					err = strconv.ErrSyntax
				} else {
					nums[i], err = strconv.ParseUint(parts[i], 10, 64)
				}
				if err != nil {
					writeError(w, errorf(codeBadHeader, "Last-Event-ID: %q is not seq_num,count,bytes", v))
					return
				}
			}
			seq := nums[0] + 1
			p.seq, p.ts, p.tailOffset = &seq, nil, nil
			if p.count != nil {
				c := *p.count - min(*p.count, nums[1])
				p.count = &c
			}
			if p.bytes != nil {
				b := *p.bytes - min(*p.bytes, nums[2])
				p.bytes = &b
			}
		}
	}
	st, e := s.streamFor(basin, name, false)
	if e != nil {
		writeError(w, e)
		return
	}
	lim := readLimit{count: -1, bytes: -1}
	if p.count != nil {
		lim.count = int64(min(*p.count, 1<<62))
	}
	if p.bytes != nil {
		lim.bytes = int64(min(*p.bytes, 1<<62))
	}
	if p.until != nil {
		lim.until, lim.hasUntil = *p.until, true
	}
	unbounded := lim.count < 0 && lim.bytes < 0 && !lim.hasUntil
	mayFollow := unbounded || (p.wait != nil && *p.wait > 0)
	var waitFor time.Duration = -1 // none
	if p.wait != nil {
		waitFor = time.Duration(min(*p.wait, 1<<30)) * time.Second
	}
	var rb readBufs
	defer rb.release()
	v, e := st.view(true)
	if e != nil {
		writeError(w, e)
		return
	}
	from, e := resolveStart(&v, p, mayFollow, &rb)
	if e != nil {
		writeError(w, e)
		return
	}
	rc := http.NewResponseController(w)
	var em readEmitter
	if sse != nil {
		em = startSSE(w, rc, *sse)
	} else {
		em = &s2sReadEmitter{sw: startSession(w, rc)}
	}
	s.follow(r.Context(), st, v, from, lim, mayFollow, waitFor, em, &rb)
}

func heartbeatGap() time.Duration { return 5*time.Second + rand.N(10*time.Second) }

func (s *Server) follow(ctx context.Context, st *stream, v streamView, from uint64, lim readLimit, mayFollow bool, waitFor time.Duration, em readEmitter, rb *readBufs) {
	var count, bytes int64 // delivered
	var deadline time.Time // zero: none armed
	following := false
	hb := time.NewTimer(heartbeatGap())
	defer hb.Stop()
	var recs []recordRef
	for {
		remaining := lim
		if lim.count >= 0 {
			remaining.count = lim.count - count
		}
		if lim.bytes >= 0 {
			remaining.bytes = lim.bytes - bytes
		}
		if remaining.count == 0 || remaining.bytes == 0 {
			em.end()
			return
		}
		var next uint64
		var done bool
		var err error
		recs, next, done, err = v.collect(from, remaining, rb, recs[:0])
		if err != nil {
			em.fail(readErr(st, err))
			return
		}
		from = max(from, next) // next also skips a trimmed prefix
		if len(recs) > 0 {
			for _, rr := range recs {
				bytes += int64(rr.rec.metered)
			}
			count += int64(len(recs))
			if em.batch(recs, v.tail, count, bytes) != nil {
				return
			}
			rb.release()
			deadline = time.Time{}
			if !hb.Stop() {
				select {
				case <-hb.C:
				default:
				}
			}
			hb.Reset(heartbeatGap())
		}
		if done {
			em.end()
			return
		}
		if from < v.tail.seq {
			if v, err = s.refresh(st); err != nil {
				em.fail(readErr(st, err))
				return
			}
			continue
		}
		// Caught up with the tail.
		if !mayFollow {
			em.end()
			return
		}
		var deadlineC <-chan time.Time
		var dt *time.Timer
		if waitFor >= 0 {
			if deadline.IsZero() {
				deadline = time.Now().Add(waitFor)
			}
			left := time.Until(deadline)
			if left <= 0 {
				em.end()
				return
			}
			dt = time.NewTimer(left)
			deadlineC = dt.C
		}
		if !following {
			following = true
			if em.heartbeat(v.tail) != nil {
				return
			}
		}
		select {
		case <-v.notify:
		case <-hb.C:
			if em.heartbeat(v.tail) != nil {
				return
			}
			hb.Reset(heartbeatGap())
		case <-deadlineC:
			em.end()
			return
		case <-ctx.Done():
			return
		}
		if dt != nil {
			dt.Stop()
		}
		if v, err = s.refresh(st); err != nil {
			em.fail(readErr(st, err))
			return
		}
	}
}

func (s *Server) refresh(st *stream) (streamView, error) {
	v, e := st.view(true)
	if e != nil {
		return v, errStreamGone
	}
	return v, nil
}

// --- emitters ------------------------------------------------------------------

type s2sReadEmitter struct {
	sw  *sessionWriter
	buf []byte
}

func (e *s2sReadEmitter) batch(recs []recordRef, tail position, _, _ int64) error {
	e.buf = e.buf[:0]
	for _, rr := range recs {
		e.buf = appendRecordProto(e.buf, rr.seq, rr.rec)
	}
	e.buf = appendTailProto(e.buf, tail)
	return e.sw.message(e.buf)
}

func (e *s2sReadEmitter) heartbeat(tail position) error {
	e.buf = appendTailProto(e.buf[:0], tail)
	return e.sw.message(e.buf)
}

func (e *s2sReadEmitter) fail(err *apiError) { e.sw.terminal(err) }
func (e *s2sReadEmitter) end()               {}

type sseEmitter struct {
	w   http.ResponseWriter
	rc  *http.ResponseController
	f   format
	buf []byte
}

func startSSE(w http.ResponseWriter, rc *http.ResponseController, f format) *sseEmitter {
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache, no-transform")
	h.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	_ = rc.Flush()
	return &sseEmitter{w: w, rc: rc, f: f}
}

func (e *sseEmitter) send() error {
	if _, err := e.w.Write(e.buf); err != nil {
		return err
	}
	return e.rc.Flush()
}

func (e *sseEmitter) batch(recs []recordRef, tail position, count, bytes int64) error {
	e.buf = append(e.buf[:0], "event: batch\nid: "...)
	e.buf = strconv.AppendUint(e.buf, recs[len(recs)-1].seq, 10)
	e.buf = append(e.buf, ',')
	e.buf = strconv.AppendInt(e.buf, count, 10)
	e.buf = append(e.buf, ',')
	e.buf = strconv.AppendInt(e.buf, bytes, 10)
	e.buf = append(e.buf, "\ndata: "...)
	e.buf = appendReadBatchJSON(e.buf, e.f, recs, &tail)
	e.buf = append(e.buf, "\n\n"...)
	return e.send()
}

func (e *sseEmitter) heartbeat(tail position) error {
	e.buf = append(e.buf[:0], `event: ping`+"\n"+`data: {"timestamp":`...)
	e.buf = strconv.AppendUint(e.buf, nowMillis(), 10)
	e.buf = append(e.buf, `,"tail":`...)
	e.buf = append(e.buf, tail.json()...)
	e.buf = append(e.buf, "}\n\n"...)
	return e.send()
}

func (e *sseEmitter) fail(err *apiError) {
	e.buf = append(e.buf[:0], "event: error\ndata: "...)
	e.buf = append(e.buf, err.bodyBytes()...)
	e.buf = append(e.buf, "\n\n"...)
	_ = e.send()
}

func (e *sseEmitter) end() {
	e.buf = append(e.buf[:0], "data: [DONE]\n\n"...)
	_ = e.send()
}
