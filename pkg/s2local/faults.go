package s2local

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// FaultRule injects latency and errors into the S2 API requests it matches.
type FaultRule struct {
	// Basin and Stream limit the rule to one basin and/or stream; empty
	// matches every one (account-level requests match only rules without
	// Basin or Stream).
	Basin  string `json:"basin,omitempty"`
	Stream string `json:"stream,omitempty"`
	// AppendsOnly limits the rule to appends (unary and each input of an
	// append session).
	AppendsOnly bool `json:"appends_only,omitempty"`
	// LatencyMS is added to every matching request, plus a uniformly random
	// 0..JitterMS.
	LatencyMS float64 `json:"latency_ms,omitempty"`
	JitterMS  float64 `json:"jitter_ms,omitempty"`
	// ErrorRate (0..1) of matching requests fail with one of Statuses
	// (chosen uniformly): 408 request_timeout, 429 rate_limited (with the
	// retry-after-ms header, RetryAfterMS, default 200), 500 other,
	// 502 hot_server, 503 unavailable, 504 upstream_timeout.
	ErrorRate    float64 `json:"error_rate,omitempty"`
	Statuses     []int   `json:"statuses,omitempty"`
	RetryAfterMS int64   `json:"retry_after_ms,omitempty"`
	// AfterEffect makes the error follow the request's effect (the append
	// happened; the client sees the error). Default: only for 504.
	AfterEffect *bool `json:"after_effect,omitempty"`
}

// FaultConfig is the fault injection setup: rules and an optional seed for
// a deterministic sequence of random draws.
type FaultConfig struct {
	Seed  *uint64     `json:"seed,omitempty"`
	Rules []FaultRule `json:"rules"`
}

var faultCodes = map[int]string{
	http.StatusRequestTimeout:      codeRequestTimeout,
	http.StatusTooManyRequests:     codeRateLimited,
	http.StatusInternalServerError: codeOther,
	http.StatusBadGateway:          codeHotServer,
	http.StatusServiceUnavailable:  codeUnavailable,
	http.StatusGatewayTimeout:      codeUpstreamTimeout,
}

// Validate checks a fault configuration.
func (c FaultConfig) Validate() error {
	for i, r := range c.Rules {
		if r.ErrorRate < 0 || r.ErrorRate > 1 {
			return fmt.Errorf("rules[%d].error_rate %v: use 0 to 1", i, r.ErrorRate)
		}
		if r.LatencyMS < 0 || r.JitterMS < 0 {
			return fmt.Errorf("rules[%d]: latency_ms and jitter_ms must not be negative", i)
		}
		if r.ErrorRate > 0 && len(r.Statuses) == 0 {
			return fmt.Errorf("rules[%d]: error_rate needs statuses", i)
		}
		for _, st := range r.Statuses {
			if _, ok := faultCodes[st]; !ok {
				return fmt.Errorf("rules[%d]: status %d cannot be injected: use 408, 429, 500, 502, 503 or 504", i, st)
			}
		}
	}
	return nil
}

type faults struct {
	on       atomic.Bool // any rules
	mu       sync.Mutex
	cfg      FaultConfig
	rng      *rand.Rand
	injected map[int]int64
	delayed  int64
}

func newFaults(c FaultConfig) *faults {
	f := &faults{}
	f.set(c)
	return f
}

func (f *faults) set(c FaultConfig) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.cfg = c
	f.on.Store(len(c.Rules) > 0)
	seed := rand.Uint64()
	if c.Seed != nil {
		seed = *c.Seed
	}
	f.rng = rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	f.injected = map[int]int64{}
	f.delayed = 0
}

// faultDecision is what to do to one request.
type faultDecision struct {
	delay       time.Duration
	err         *apiError
	afterEffect bool
}

func (f *faults) decide(basin, stream string, isAppend bool) faultDecision {
	var d faultDecision
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, r := range f.cfg.Rules {
		if (r.Basin != "" && r.Basin != basin) || (r.Stream != "" && r.Stream != stream) || (r.AppendsOnly && !isAppend) {
			continue
		}
		lat := r.LatencyMS
		if r.JitterMS > 0 {
			lat += f.rng.Float64() * r.JitterMS
		}
		d.delay += time.Duration(lat * float64(time.Millisecond))
		if d.err == nil && r.ErrorRate > 0 && f.rng.Float64() < r.ErrorRate {
			st := r.Statuses[f.rng.IntN(len(r.Statuses))]
			e := errorf(faultCodes[st], "injected fault: %d %s", st, http.StatusText(st))
			e.status = st
			if st == http.StatusTooManyRequests {
				e.retryAfterMS = r.RetryAfterMS
				if e.retryAfterMS <= 0 {
					e.retryAfterMS = 200
				}
			}
			d.err = e
			d.afterEffect = st == http.StatusGatewayTimeout
			if r.AfterEffect != nil {
				d.afterEffect = *r.AfterEffect
			}
			f.injected[st]++
		}
	}
	if d.delay > 0 {
		f.delayed++
	}
	return d
}

func (f *faults) active() bool { return f.on.Load() }

// sleep waits d or until ctx ends.
func sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return true
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// serveAdmin serves /admin/faults: GET the config and counters, PUT a new
// config (JSON FaultConfig), DELETE to clear every rule.
func (f *faults) serveAdmin(w http.ResponseWriter, r *http.Request) {
	switch r.Method {
	case http.MethodGet:
	case http.MethodPut, http.MethodPost:
		var c FaultConfig
		dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&c); err != nil {
			writeError(w, errorf(codeBadJSON, "fault config: %v", err))
			return
		}
		if err := c.Validate(); err != nil {
			writeError(w, errorf(codeInvalid, "fault config: %v", err))
			return
		}
		f.set(c)
	case http.MethodDelete:
		f.set(FaultConfig{})
	default:
		writeError(w, &apiError{status: http.StatusMethodNotAllowed, code: codeBadPath, message: "use GET, PUT or DELETE"})
		return
	}
	f.mu.Lock()
	inj := map[string]int64{}
	for st, n := range f.injected {
		inj[strconv.Itoa(st)] = n
	}
	out := struct {
		FaultConfig
		Injected map[string]int64 `json:"injected"`
		Delayed  int64            `json:"delayed"`
	}{f.cfg, inj, f.delayed}
	if out.Rules == nil {
		out.Rules = []FaultRule{}
	}
	f.mu.Unlock()
	writeJSON(w, http.StatusOK, out, nil)
}

// captureWriter buffers a response so that an injected error can replace
// it after the request took effect.
type captureWriter struct {
	header http.Header
	status int
	body   bytes.Buffer
}

func (c *captureWriter) Header() http.Header {
	if c.header == nil {
		c.header = http.Header{}
	}
	return c.header
}

func (c *captureWriter) WriteHeader(status int) {
	if c.status == 0 {
		c.status = status
	}
}

func (c *captureWriter) Write(p []byte) (int, error) {
	if c.status == 0 {
		c.status = http.StatusOK
	}
	return c.body.Write(p)
}

func (c *captureWriter) replay(w http.ResponseWriter) {
	for k, v := range c.header {
		w.Header()[k] = v
	}
	if c.status == 0 {
		c.status = http.StatusOK
	}
	w.WriteHeader(c.status)
	_, _ = w.Write(c.body.Bytes())
}
