// Package health serves /healthz (the process runs) and /readyz (the
// service does its work) for every pgs2 service.
package health

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"time"
)

// State is a service's readiness, safe for concurrent use.
type State struct {
	mu      sync.Mutex
	ready   bool
	standby bool
	reason  string
}

// NewState returns a state that is not ready yet.
func NewState() *State { return &State{reason: "starting"} }

// SetReady marks the service ready.
func (s *State) SetReady() {
	s.mu.Lock()
	s.ready, s.standby, s.reason = true, false, ""
	s.mu.Unlock()
}

// SetStandby marks the service ready as a standby: it runs, can reach what
// it needs, and waits to take over from the active process that reason
// names. /readyz answers 200 (a rolling deploy or a compose health check
// counts a standby as up) with reason in the body.
func (s *State) SetStandby(reason string) {
	s.mu.Lock()
	s.ready, s.standby, s.reason = true, true, reason
	s.mu.Unlock()
}

// Standby reports whether the service is a standby, and for whom.
func (s *State) Standby() (bool, string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.standby, s.reason
}

// SetNotReady marks the service not ready, with the reason /readyz reports.
func (s *State) SetNotReady(reason string) {
	s.mu.Lock()
	s.ready, s.standby, s.reason = false, false, reason
	s.mu.Unlock()
}

// Ready returns readiness and the reason when not ready (a standby is
// ready).
func (s *State) Ready() (bool, string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.standby {
		return true, ""
	}
	return s.ready, s.reason
}

// Handler serves /healthz and /readyz.
func (s *State) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if ok, reason := s.Ready(); !ok {
			http.Error(w, "not ready: "+reason, http.StatusServiceUnavailable)
			return
		}
		if standby, reason := s.Standby(); standby {
			fmt.Fprintln(w, "ready, "+reason)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	return mux
}

// Serve listens on addr and serves h until ctx ends. An empty addr serves
// nothing.
func Serve(ctx context.Context, addr string, h http.Handler) error {
	if addr == "" {
		<-ctx.Done()
		return nil
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listen on %s for health endpoints: %w (choose another --http-addr)", addr, err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// Probe asks the server listening on addr (a --http-addr: a wildcard host
// means this machine) whether it is ready: exit status 0 when /readyz
// answers 200, else 1 with the reason on stderr. Container images without a
// shell or curl use it as their health check (`capture --probe`).
func Probe(addr string, stderr io.Writer) int {
	host, port, err := net.SplitHostPort(addr)
	if err != nil || addr == "" {
		fmt.Fprintf(stderr, "probe: --http-addr %q is not host:port\n", addr)
		return 1
	}
	if ip := net.ParseIP(host); host == "" || ip != nil && ip.IsUnspecified() {
		host = "127.0.0.1"
	}
	c := &http.Client{Timeout: 3 * time.Second}
	resp, err := c.Get("http://" + net.JoinHostPort(host, port) + "/readyz")
	if err != nil {
		fmt.Fprintf(stderr, "probe: %v\n", err)
		return 1
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		fmt.Fprintf(stderr, "probe: not ready: %s %s\n", resp.Status, b)
		return 1
	}
	return 0
}
