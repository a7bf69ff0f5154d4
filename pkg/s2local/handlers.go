package s2local

import (
	"encoding/json"
	"net/http"
	"strconv"
)

// Account- and basin-level handlers: basins and streams.

const provisionResultHeader = "s2-provision-result"

// listArgs parses prefix, start_after and limit (default and max 1000).
func listArgs(r *http.Request) (prefix, startAfter string, limit int, e *apiError) {
	q := r.URL.Query()
	prefix, startAfter, limit = q.Get("prefix"), q.Get("start_after"), 1000
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			return "", "", 0, errorf(codeBadQuery, "limit: %q is not a non-negative integer", v)
		}
		if n > 0 && n < 1000 {
			limit = n
		}
	}
	return prefix, startAfter, limit, nil
}

// jsonBody reads a JSON request body; empty is nil.
func jsonBody(r *http.Request) (json.RawMessage, *apiError) {
	body, release, e := readBody(r)
	if e != nil {
		return nil, e
	}
	defer release()
	if len(body) == 0 {
		return nil, nil
	}
	if !json.Valid(body) {
		return nil, errorf(codeBadJSON, "request body is not valid JSON")
	}
	return append(json.RawMessage(nil), body...), nil
}

// requestFields reads a JSON object request body into its fields (nil
// for an empty body).
func requestFields(r *http.Request) (map[string]json.RawMessage, *apiError) {
	raw, e := jsonBody(r)
	if e != nil {
		return nil, e
	}
	return fields(raw, "request")
}

func (s *Server) listBasins(w http.ResponseWriter, r *http.Request) {
	prefix, startAfter, limit, e := listArgs(r)
	if e != nil {
		writeError(w, e)
		return
	}
	basins, more := s.st.listBasins(prefix, startAfter, limit)
	writeJSON(w, http.StatusOK, map[string]any{"basins": basins, "has_more": more}, nil)
}

func (s *Server) createBasin(w http.ResponseWriter, r *http.Request) {
	s.provisionBasin(w, r, "", false)
}

func (s *Server) ensureBasin(w http.ResponseWriter, r *http.Request, name string) {
	s.provisionBasin(w, r, name, true)
}

// provisionBasin serves POST /basins (create) and PUT /basins/{basin}
// (ensure).
func (s *Server) provisionBasin(w http.ResponseWriter, r *http.Request, name string, ensure bool) {
	m, e := requestFields(r)
	if e != nil {
		writeError(w, e)
		return
	}
	if !ensure {
		if name, e = nameField(m, "basin", validBasinName); e != nil {
			writeError(w, e)
			return
		}
	}
	var location *string
	for _, k := range []string{"location", "scope"} {
		if v := m[k]; !isNull(v) {
			var l string
			if e := decodeField(v, &l, k); e != nil {
				writeError(w, e)
				return
			}
			location = &l
		}
	}
	cfg, e := parseBasinConfig(m["config"])
	if e != nil {
		writeError(w, e)
		return
	}
	token := r.Header.Get("s2-request-token")
	if len(token) > 36 {
		writeError(w, errorf(codeBadHeader, "s2-request-token must not exceed 36 bytes"))
		return
	}
	info, result, e := s.st.createBasin(name, cfg, location, token, ensure)
	if e != nil {
		writeError(w, e)
		return
	}
	status := http.StatusCreated
	if ensure && result != provCreated {
		status = http.StatusOK
	}
	writeJSON(w, status, info, map[string]string{provisionResultHeader: result})
}

func (s *Server) getBasinConfig(w http.ResponseWriter, r *http.Request, name string) {
	cfg, e := s.st.basinConfig(name)
	if e != nil {
		writeError(w, e)
		return
	}
	writeJSON(w, http.StatusOK, cfg.apiJSON(), nil)
}

func (s *Server) reconfigureBasin(w http.ResponseWriter, r *http.Request, name string) {
	raw, e := jsonBody(r)
	if e != nil {
		writeError(w, e)
		return
	}
	cfg, e := s.st.reconfigureBasin(name, raw)
	if e != nil {
		writeError(w, e)
		return
	}
	writeJSON(w, http.StatusOK, cfg.apiJSON(), nil)
}

func (s *Server) deleteBasin(w http.ResponseWriter, r *http.Request, name string) {
	if e := s.st.deleteBasin(name); e != nil {
		writeError(w, e)
		return
	}
	w.WriteHeader(http.StatusAccepted)
}

func (s *Server) listStreams(w http.ResponseWriter, r *http.Request, basin string) {
	prefix, startAfter, limit, e := listArgs(r)
	if e != nil {
		writeError(w, e)
		return
	}
	b, e := s.st.getBasin(basin)
	if e != nil {
		writeError(w, e)
		return
	}
	streams, more := b.listStreams(prefix, startAfter, limit)
	writeJSON(w, http.StatusOK, map[string]any{"streams": streams, "has_more": more}, nil)
}

func (s *Server) createStream(w http.ResponseWriter, r *http.Request, basin string) {
	m, e := requestFields(r)
	if e != nil {
		writeError(w, e)
		return
	}
	name, e := nameField(m, "stream", validStreamName)
	if e != nil {
		writeError(w, e)
		return
	}
	s.provisionStream(w, r, basin, name, m["config"], modeCreate)
}

func (s *Server) ensureStream(w http.ResponseWriter, r *http.Request, basin, name string) {
	raw, e := jsonBody(r)
	if e != nil {
		writeError(w, e)
		return
	}
	s.provisionStream(w, r, basin, name, raw, modeEnsure)
}

func (s *Server) provisionStream(w http.ResponseWriter, r *http.Request, basin, name string, rawCfg json.RawMessage, mode provisionMode) {
	o, e := parseStreamConfig(rawCfg)
	if e != nil {
		writeError(w, e)
		return
	}
	token := r.Header.Get("s2-request-token")
	if len(token) > 36 {
		writeError(w, errorf(codeBadHeader, "s2-request-token must not exceed 36 bytes"))
		return
	}
	b, e := s.st.getBasin(basin)
	if e != nil {
		writeError(w, e)
		return
	}
	st, result, e := s.st.createStream(b, name, o, token, mode)
	if e != nil {
		writeError(w, e)
		return
	}
	status := http.StatusCreated
	if mode == modeEnsure && result != provCreated {
		status = http.StatusOK
	}
	writeJSON(w, status, st.info(), map[string]string{provisionResultHeader: result})
}

func (s *Server) lookupStream(basin, name string) (*basin, *stream, *apiError) {
	b, e := s.st.getBasin(basin)
	if e != nil {
		return nil, nil, e
	}
	st, e := b.getStream(name)
	return b, st, e
}

func (s *Server) getStreamConfig(w http.ResponseWriter, r *http.Request, basin, name string) {
	_, st, e := s.lookupStream(basin, name)
	if e == nil {
		var cfg streamConfig
		if cfg, e = s.st.streamConfig(st); e == nil {
			writeJSON(w, http.StatusOK, cfg.apiJSON(), nil)
			return
		}
	}
	writeError(w, e)
}

func (s *Server) reconfigureStream(w http.ResponseWriter, r *http.Request, basin, name string) {
	raw, e := jsonBody(r)
	if e != nil {
		writeError(w, e)
		return
	}
	b, st, e := s.lookupStream(basin, name)
	if e == nil {
		var cfg streamConfig
		if cfg, e = s.st.reconfigureStream(b, st, raw); e == nil {
			writeJSON(w, http.StatusOK, cfg.apiJSON(), nil)
			return
		}
	}
	writeError(w, e)
}

func (s *Server) deleteStream(w http.ResponseWriter, r *http.Request, basin, name string) {
	b, e := s.st.getBasin(basin)
	if e == nil {
		e = s.st.deleteStream(b, name)
	}
	if e != nil {
		writeError(w, e)
		return
	}
	w.WriteHeader(http.StatusAccepted)
}

// streamFor finds a stream for an append or a read, creating it when the
// basin says so (create_stream_on_append / create_stream_on_read).
func (s *Server) streamFor(basin, name string, forAppend bool) (*stream, *apiError) {
	b, e := s.st.getBasin(basin)
	if e != nil {
		return nil, e
	}
	st, e := b.getStream(name)
	if e == nil {
		return st, nil
	}
	b.mu.RLock()
	auto := (forAppend && b.cfg.CreateOnAppend) || (!forAppend && b.cfg.CreateOnRead)
	b.mu.RUnlock()
	if !auto {
		return nil, e
	}
	st, _, e = s.st.createStream(b, name, optStreamConfig{}, "", modeAuto)
	return st, e
}

func (s *Server) checkTail(w http.ResponseWriter, r *http.Request, basin, name string) {
	st, e := s.streamFor(basin, name, false)
	if e == nil {
		var tail position
		if tail, e = st.tailPos(); e == nil {
			writeRaw(w, http.StatusOK, "application/json", []byte(`{"tail":`+tail.json()+`}`), nil)
			return
		}
	}
	writeError(w, e)
}

// nameField reads a required name field of a JSON request and checks it.
func nameField(m map[string]json.RawMessage, field string, valid func(string) error) (string, *apiError) {
	if isNull(m[field]) {
		return "", errorf(codeBadJSON, "missing field `%s`", field)
	}
	var name string
	if e := decodeField(m[field], &name, field); e != nil {
		return "", e
	}
	if err := valid(name); err != nil {
		return "", errorf(codeBadJSON, "%s: %v", field, err)
	}
	return name, nil
}
