package s2local

import "net/http"

// appendUnary serves POST /v1/streams/{stream}/records with a JSON or
// protobuf AppendInput.
func (s *Server) appendUnary(w http.ResponseWriter, r *http.Request, basin, name string) {
	if r.Header.Get("s2-encryption-key") != "" {
		writeError(w, errorf(codeNotImplemented, "s2local does not implement stream encryption"))
		return
	}
	ack, e := s.appendBody(r, basin, name)
	if e != nil {
		writeError(w, e)
		return
	}
	if isProto(r.Header.Get("Accept")) {
		var a [96]byte
		writeRaw(w, http.StatusOK, "application/protobuf", encodeAckProto(a[:0], ack), nil)
		return
	}
	writeRaw(w, http.StatusOK, "application/json", []byte(ack.json()), nil)
}

func (s *Server) appendBody(r *http.Request, basin, name string) (appendAck, *apiError) {
	ct := r.Header.Get("Content-Type")
	var f format
	if !isProto(ct) {
		var e *apiError
		if f, e = parseFormat(r.Header.Get("s2-format")); e != nil {
			return appendAck{}, e
		}
	}
	body, release, e := readBody(r)
	if e != nil {
		return appendAck{}, e
	}
	defer release()
	b := getBuilder()
	defer putBuilder(b)
	var req appendRequest
	if isProto(ct) {
		req, e = decodeAppendProto(body, b)
	} else {
		req, e = decodeAppendJSON(body, f, b)
	}
	if e != nil {
		return appendAck{}, e
	}
	return s.appendBatch(basin, name, b, req)
}

// appendBatch validates a decoded batch and appends it.
func (s *Server) appendBatch(basin, name string, b *batchBuilder, req appendRequest) (appendAck, *apiError) {
	if e := b.validate(); e != nil {
		return appendAck{}, e
	}
	if req.hasFence && len(req.fence) > maxFencingTokenLen {
		return appendAck{}, errorf(codeInvalid, "fencing token must not exceed %d bytes in length", maxFencingTokenLen)
	}
	st, e := s.streamFor(basin, name, true)
	if e != nil {
		return appendAck{}, e
	}
	return st.append(b, req, s.opts.Fsync)
}

// appendSession serves an s2s/proto append session: a stream of
// AppendInput frames in, AppendAck frames out, in order. An error ends the
// session with a terminal frame carrying its status and JSON body. Fault
// rules apply to each input.
func (s *Server) appendSession(w http.ResponseWriter, r *http.Request, basin, name string) {
	if r.Header.Get("s2-encryption-key") != "" {
		writeError(w, errorf(codeNotImplemented, "s2local does not implement stream encryption"))
		return
	}
	if _, e := s.streamFor(basin, name, true); e != nil {
		writeError(w, e)
		return
	}
	rc := http.NewResponseController(w)
	_ = rc.EnableFullDuplex() // HTTP/1.1; HTTP/2 is full duplex
	sw := startSession(w, rc)
	fr := newFrameReader(r.Body)
	faulty := s.faults.active()
	for {
		payload, e := fr.next()
		if e == errEndOfFrames {
			return
		}
		if e != nil {
			sw.terminal(e)
			return
		}
		var d faultDecision
		if faulty {
			d = s.faults.decide(basin, name, true)
			if !sleep(r.Context(), d.delay) {
				return
			}
			if d.err != nil && !d.afterEffect {
				sw.terminal(d.err)
				return
			}
		}
		b := getBuilder()
		req, e := decodeAppendProto(payload, b)
		var ack appendAck
		if e == nil {
			ack, e = s.appendBatch(basin, name, b, req)
		}
		putBuilder(b)
		if e == nil && d.err != nil {
			e = d.err
		}
		if e != nil {
			sw.terminal(e)
			return
		}
		var a [96]byte
		if err := sw.message(encodeAckProto(a[:0], ack)); err != nil {
			return
		}
	}
}
