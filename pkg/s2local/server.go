package s2local

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/klauspost/compress/zstd"
)

// Options configure a Server.
type Options struct {
	// DataDir holds the data; empty keeps everything in memory.
	DataDir string
	// Token, when set, is the only access token accepted
	// (Authorization: Bearer <token>); else any token or none is.
	Token string
	// Fsync makes every acknowledged append durable against machine
	// crashes (fdatasync before the ack); without it an acknowledged append
	// survives a crash of the server process (SIGKILL), not of the machine.
	Fsync bool
	// Faults is the initial fault injection setup.
	Faults FaultConfig
	// Basins are created at start when missing (existing ones are kept).
	Basins []string
	// Logger receives the server's logs (default slog.Default()).
	Logger *slog.Logger
}

// Server is a local S2-compatible server. It is an http.Handler.
type Server struct {
	opts   Options
	log    *slog.Logger
	st     *store
	faults *faults

	baseCtx    context.Context
	cancelBase context.CancelFunc
	closeOnce  sync.Once
}

// New opens (or creates) the data directory, recovering every stream, and
// returns a server ready to serve.
func New(o Options) (*Server, error) {
	if err := o.Faults.Validate(); err != nil {
		return nil, err
	}
	lg := o.Logger
	if lg == nil {
		lg = slog.Default()
	}
	st, err := newStore(o.DataDir, o.Fsync, lg.Info)
	if err != nil {
		return nil, err
	}
	for _, name := range o.Basins {
		if err := validBasinName(name); err != nil {
			_ = st.close()
			return nil, fmt.Errorf("basin %q: %w", name, err)
		}
		if _, _, e := st.createBasin(name, basinConfig{}, nil, "", false); e != nil && e.code != codeResourceExists {
			_ = st.close()
			return nil, fmt.Errorf("create basin %q: %s", name, e.message)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Server{opts: o, log: lg, st: st, faults: newFaults(o.Faults), baseCtx: ctx, cancelBase: cancel}, nil
}

// SetFaults replaces the fault injection setup.
func (s *Server) SetFaults(c FaultConfig) error {
	if err := c.Validate(); err != nil {
		return err
	}
	s.faults.set(c)
	return nil
}

// Close ends open sessions and long polls and closes the store, syncing
// every log.
func (s *Server) Close() error {
	var err error
	s.closeOnce.Do(func() {
		s.cancelBase()
		err = s.st.close()
	})
	return err
}

// Serve serves on ln until ctx ends, then shuts down gracefully: open
// sessions and long polls end, in-flight requests finish (for at most
// 10 s). It does not close the store (see Close).
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	var p http.Protocols
	p.SetHTTP1(true)
	p.SetUnencryptedHTTP2(true) // the SDK's sessions use h2c
	srv := &http.Server{
		Handler:           s,
		Protocols:         &p,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       5 * time.Minute,
		HTTP2:             &http.HTTP2Config{MaxReceiveBufferPerStream: 4 << 20, MaxReceiveBufferPerConnection: 16 << 20, MaxReadFrameSize: 1 << 20},
		BaseContext:       func(net.Listener) context.Context { return s.baseCtx },
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	done := make(chan error, 1)
	go func() {
		select {
		case <-ctx.Done():
		case <-s.baseCtx.Done():
		}
		s.cancelBase()
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		done <- srv.Shutdown(sctx)
	}()
	err := srv.Serve(ln)
	if errors.Is(err, http.ErrServerClosed) {
		return <-done
	}
	return err
}

// --- routing ------------------------------------------------------------------

type route struct {
	basin, stream string
	append        bool
}

// ServeHTTP routes S2's API v1 (in direct-endpoint mode), /health and
// /admin/faults.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	p := r.URL.EscapedPath()
	switch {
	case p == "/health" || p == "/healthz" || p == "/readyz":
		w.Header().Set("Content-Type", "text/plain")
		_, _ = io.WriteString(w, "ok\n")
	case p == "/admin/faults":
		if !s.authorized(r) {
			writeError(w, errorf(codeAuthn, "missing or invalid access token"))
			return
		}
		s.faults.serveAdmin(w, r)
	case strings.HasPrefix(p, "/v1/"):
		if !s.authorized(r) {
			writeError(w, errorf(codeAuthn, "missing or invalid access token"))
			return
		}
		s.serveV1(w, r, p[len("/v1/"):])
	default:
		writeError(w, &apiError{status: http.StatusNotFound, code: codeBadPath, message: "no such endpoint: the S2 API is under /v1"})
	}
}

func (s *Server) authorized(r *http.Request) bool {
	if s.opts.Token == "" {
		return true
	}
	h := r.Header.Get("Authorization")
	const prefix = "Bearer "
	if len(h) < len(prefix) || !strings.EqualFold(h[:len(prefix)], prefix) {
		return false
	}
	return subtle.ConstantTimeCompare([]byte(strings.TrimSpace(h[len(prefix):])), []byte(s.opts.Token)) == 1
}

func notAllowed(w http.ResponseWriter, allow string) {
	w.Header().Set("Allow", allow)
	writeError(w, &apiError{status: http.StatusMethodNotAllowed, code: codeBadPath, message: "method not allowed; use " + allow})
}

func (s *Server) serveV1(w http.ResponseWriter, r *http.Request, p string) {
	raw := strings.Split(p, "/")
	segs := make([]string, len(raw))
	for i, x := range raw {
		u, err := url.PathUnescape(x)
		if err != nil {
			writeError(w, errorf(codeBadPath, "bad path segment %q: %v", x, err))
			return
		}
		segs[i] = u
	}
	switch segs[0] {
	case "basins":
		s.routeBasins(w, r, segs)
	case "streams":
		s.routeStreams(w, r, segs)
	case "access-tokens", "metrics", "locations":
		writeError(w, errorf(codeNotImplemented, "s2local does not implement /v1/%s", segs[0]))
	default:
		writeError(w, &apiError{status: http.StatusNotFound, code: codeBadPath, message: "no such endpoint: /v1/" + p})
	}
}

func (s *Server) routeBasins(w http.ResponseWriter, r *http.Request, segs []string) {
	switch len(segs) {
	case 1:
		switch r.Method {
		case http.MethodGet:
			s.withFaults(w, r, route{}, s.listBasins)
		case http.MethodPost:
			s.withFaults(w, r, route{}, s.createBasin)
		default:
			notAllowed(w, "GET, POST")
		}
	case 2:
		name := segs[1]
		if err := validBasinName(name); err != nil {
			writeError(w, errorf(codeBadPath, "%v", err))
			return
		}
		rt := route{basin: name}
		h := func(f func(http.ResponseWriter, *http.Request, string)) {
			s.withFaults(w, r, rt, func(w http.ResponseWriter, r *http.Request) { f(w, r, name) })
		}
		switch r.Method {
		case http.MethodGet:
			h(s.getBasinConfig)
		case http.MethodPut:
			h(s.ensureBasin)
		case http.MethodPatch:
			h(s.reconfigureBasin)
		case http.MethodDelete:
			h(s.deleteBasin)
		default:
			notAllowed(w, "GET, PUT, PATCH, DELETE")
		}
	default:
		writeError(w, &apiError{status: http.StatusNotFound, code: codeBadPath, message: "no such endpoint"})
	}
}

// basinOf finds the basin of a basin-scoped request: the s2-basin header
// (direct endpoints, as s2-lite), else the first label of a host such as
// <basin>.b.s2.dev.
func basinOf(r *http.Request) (string, *apiError) {
	name := r.Header.Get("s2-basin")
	if name == "" {
		host := r.Host
		if h, _, err := net.SplitHostPort(host); err == nil {
			host = h
		}
		if i := strings.IndexByte(host, '.'); i > 0 && validBasinName(host[:i]) == nil {
			return host[:i], nil
		}
		return "", errorf(codeBadHeader, "missing s2-basin header: basin-scoped requests (/v1/streams…) name their basin in it")
	}
	if err := validBasinName(name); err != nil {
		return "", errorf(codeBadHeader, "s2-basin: %v", err)
	}
	return name, nil
}

func (s *Server) routeStreams(w http.ResponseWriter, r *http.Request, segs []string) {
	basin, e := basinOf(r)
	if e != nil {
		writeError(w, e)
		return
	}
	if len(segs) == 1 {
		rt := route{basin: basin}
		switch r.Method {
		case http.MethodGet:
			s.withFaults(w, r, rt, func(w http.ResponseWriter, r *http.Request) { s.listStreams(w, r, basin) })
		case http.MethodPost:
			s.withFaults(w, r, rt, func(w http.ResponseWriter, r *http.Request) { s.createStream(w, r, basin) })
		default:
			notAllowed(w, "GET, POST")
		}
		return
	}
	name := segs[1]
	if err := validStreamName(name); err != nil {
		writeError(w, errorf(codeBadPath, "%v", err))
		return
	}
	rt := route{basin: basin, stream: name}
	h := func(f func(http.ResponseWriter, *http.Request, string, string)) {
		s.withFaults(w, r, rt, func(w http.ResponseWriter, r *http.Request) { f(w, r, basin, name) })
	}
	switch {
	case len(segs) == 2:
		switch r.Method {
		case http.MethodGet:
			h(s.getStreamConfig)
		case http.MethodPut:
			h(s.ensureStream)
		case http.MethodPatch:
			h(s.reconfigureStream)
		case http.MethodDelete:
			h(s.deleteStream)
		default:
			notAllowed(w, "GET, PUT, PATCH, DELETE")
		}
	case len(segs) == 3 && segs[2] == "records":
		switch r.Method {
		case http.MethodGet:
			h(s.read)
		case http.MethodPost:
			if isS2S(r.Header.Get("Content-Type")) {
				// Faults apply to each input of the session.
				s.appendSession(w, r, basin, name)
				return
			}
			rt.append = true
			s.withFaults(w, r, rt, func(w http.ResponseWriter, r *http.Request) { s.appendUnary(w, r, basin, name) })
		default:
			notAllowed(w, "GET, POST")
		}
	case len(segs) == 4 && segs[2] == "records" && segs[3] == "tail":
		if r.Method != http.MethodGet {
			notAllowed(w, "GET")
			return
		}
		h(s.checkTail)
	default:
		writeError(w, &apiError{status: http.StatusNotFound, code: codeBadPath, message: "no such endpoint"})
	}
}

// withFaults runs h under the fault rules that match rt.
func (s *Server) withFaults(w http.ResponseWriter, r *http.Request, rt route, h http.HandlerFunc) {
	if !s.faults.active() {
		h(w, r)
		return
	}
	d := s.faults.decide(rt.basin, rt.stream, rt.append)
	if !sleep(r.Context(), d.delay) {
		return
	}
	switch {
	case d.err == nil:
		h(w, r)
	case !d.afterEffect || r.Method == http.MethodGet:
		// A read has no effect to follow (and may stream).
		writeError(w, d.err)
	default:
		var c captureWriter
		h(&c, r)
		if c.status >= 200 && c.status < 300 {
			writeError(w, d.err)
			return
		}
		c.replay(w)
	}
}

// --- helpers ---------------------------------------------------------------------

func writeJSON(w http.ResponseWriter, status int, v any, header map[string]string) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(v)
	writeRaw(w, status, "application/json", buf.Bytes(), header)
}

func writeRaw(w http.ResponseWriter, status int, contentType string, body []byte, header map[string]string) {
	h := w.Header()
	h.Set("Content-Type", contentType)
	h.Set("Content-Length", strconv.Itoa(len(body)))
	for k, v := range header {
		h.Set(k, v)
	}
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

// mediaType is the first media type of a Content-Type or Accept value,
// lower-cased, without parameters.
func mediaType(v string) string {
	if i := strings.IndexByte(v, ','); i >= 0 {
		v = v[:i]
	}
	if i := strings.IndexByte(v, ';'); i >= 0 {
		v = v[:i]
	}
	return strings.ToLower(strings.TrimSpace(v))
}

func isProto(v string) bool {
	m := mediaType(v)
	return m == "application/protobuf" || m == "application/x-protobuf"
}

func isS2S(v string) bool { return mediaType(v) == "s2s/proto" }

func isEventStream(v string) bool { return mediaType(v) == "text/event-stream" }

// maxBodyBytes bounds a request body (a 1 MiB batch as base64 JSON with
// escapes fits).
const maxBodyBytes = 32 << 20

var bodyPool = sync.Pool{New: func() any { b := make([]byte, 0, 64<<10); return &b }}

// readBody reads a request body (decoding Content-Encoding gzip or zstd)
// into a pooled buffer; release returns it.
func readBody(r *http.Request) (body []byte, release func(), e *apiError) {
	p := bodyPool.Get().(*[]byte)
	buf := (*p)[:0]
	release = func() {
		if cap(buf) <= 8<<20 {
			*p = buf[:0]
			bodyPool.Put(p)
		}
	}
	if n := r.ContentLength; n > maxBodyBytes {
		release()
		return nil, nil, errorf(codeInvalid, "request body of %d bytes is too large", n)
	} else if n > 0 && int64(cap(buf)) < n {
		buf = make([]byte, 0, n)
	}
	for {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)]
		}
		n, err := r.Body.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if len(buf) > maxBodyBytes {
			release()
			return nil, nil, errorf(codeInvalid, "request body is too large")
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			release()
			return nil, nil, errorf(codeBadFrame, "read request body: %v", err)
		}
	}
	switch enc := strings.ToLower(strings.TrimSpace(r.Header.Get("Content-Encoding"))); enc {
	case "", "identity":
		return buf, release, nil
	case "gzip", "zstd":
		out, err := decompress(enc, buf)
		release()
		if err != nil {
			return nil, nil, errorf(codeBadHeader, "Content-Encoding %s: %v", enc, err)
		}
		return out, func() {}, nil
	default:
		release()
		return nil, nil, errorf(codeBadHeader, "unsupported Content-Encoding %q: use gzip or zstd", enc)
	}
}

var (
	zstdOnce sync.Once
	zstdDec  *zstd.Decoder
)

func decompress(enc string, data []byte) ([]byte, error) {
	switch enc {
	case "gzip":
		zr, err := gzip.NewReader(bytes.NewReader(data))
		if err != nil {
			return nil, err
		}
		out, err := io.ReadAll(io.LimitReader(zr, maxBodyBytes+1))
		if err == nil && len(out) > maxBodyBytes {
			err = errors.New("decompressed body too large")
		}
		return out, err
	case "zstd":
		zstdOnce.Do(func() {
			zstdDec, _ = zstd.NewReader(nil, zstd.WithDecoderConcurrency(0), zstd.WithDecoderMaxMemory(maxBodyBytes))
		})
		return zstdDec.DecodeAll(data, nil)
	}
	return nil, errors.New("unknown encoding " + enc)
}
