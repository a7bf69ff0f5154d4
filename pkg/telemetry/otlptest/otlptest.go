// Package otlptest is an OTLP/HTTP trace receiver for tests: services
// export to it as to a collector; it keeps each span's service, name and
// attributes, and every request's decoded content for leak checks.
package otlptest

import (
	"compress/gzip"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	collectortrace "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	commonv1 "go.opentelemetry.io/proto/otlp/common/v1"
	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/proto"
)

// Span is one received span.
type Span struct {
	Service string // the resource's service.name
	Name    string
	Attrs   map[string]string // the span's and its resource's attributes, as text
}

// Receiver accepts POST /v1/traces.
type Receiver struct {
	Addr string // host:port, for telemetry.otlp_endpoint
	mu   sync.Mutex
	sp   []Span
	text strings.Builder // every request, as protobuf text: attributes, events, status messages
}

// New starts a receiver, closed at the test's end.
func New(t testing.TB) *Receiver {
	r := &Receiver{}
	srv := httptest.NewServer(http.HandlerFunc(r.serve))
	t.Cleanup(srv.Close)
	r.Addr = srv.Listener.Addr().String()
	return r
}

func (r *Receiver) serve(w http.ResponseWriter, req *http.Request) {
	if req.Method != http.MethodPost || req.URL.Path != "/v1/traces" {
		http.NotFound(w, req)
		return
	}
	var body io.Reader = req.Body
	if req.Header.Get("Content-Encoding") == "gzip" {
		zr, err := gzip.NewReader(req.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		body = zr
	}
	b, err := io.ReadAll(body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	var m collectortrace.ExportTraceServiceRequest
	if err := proto.Unmarshal(b, &m); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	r.mu.Lock()
	r.text.WriteString(prototext.Format(&m))
	for _, rs := range m.ResourceSpans {
		res := attrs(rs.GetResource().GetAttributes())
		for _, ss := range rs.ScopeSpans {
			for _, s := range ss.Spans {
				a := attrs(s.Attributes)
				for k, v := range res {
					a[k] = v
				}
				r.sp = append(r.sp, Span{Service: res["service.name"], Name: s.Name, Attrs: a})
			}
		}
	}
	r.mu.Unlock()
	out, _ := proto.Marshal(&collectortrace.ExportTraceServiceResponse{})
	w.Header().Set("Content-Type", "application/x-protobuf")
	_, _ = w.Write(out)
}

func attrs(kvs []*commonv1.KeyValue) map[string]string {
	m := map[string]string{}
	for _, kv := range kvs {
		if _, ok := kv.Value.GetValue().(*commonv1.AnyValue_StringValue); ok {
			m[kv.Key] = kv.Value.GetStringValue()
		} else {
			m[kv.Key] = strings.TrimSpace(prototext.Format(kv.Value))
		}
	}
	return m
}

// Spans returns the spans received so far.
func (r *Receiver) Spans() []Span {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Span(nil), r.sp...)
}

// Services returns the service names that sent spans.
func (r *Receiver) Services() map[string]int {
	m := map[string]int{}
	for _, s := range r.Spans() {
		m[s.Service]++
	}
	return m
}

// Text is everything received, as protobuf text (for a search for secrets).
func (r *Receiver) Text() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.text.String()
}
