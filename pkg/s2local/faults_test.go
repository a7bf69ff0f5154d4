package s2local_test

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/s2-streamstore/s2-sdk-go/s2"

	"github.com/pgs2/pgs2/pkg/s2local"
)

// TestFaultFlags: bin/s2local's fault flags, here 503 on every append to
// one stream after 50 ms.
func TestFaultFlags(t *testing.T) {
	ctx := context.Background()
	p := startProc(t, "--fault-error-rate", "1", "--fault-statuses", "503", "--fault-appends-only",
		"--fault-stream", "faulty", "--fault-latency", "50ms", "--fault-seed", "1")
	c := newSDK(p.base, "")
	if _, err := c.Basins.Create(ctx, s2.CreateBasinArgs{Basin: testBasin}); err != nil {
		t.Fatal(err)
	}
	b := c.Basin(testBasin)
	faulty, healthy := mustCreateStream(t, b, "faulty"), mustCreateStream(t, b, "healthy")
	start := time.Now()
	_, err := faulty.Append(ctx, &s2.AppendInput{Records: []s2.AppendRecord{{Body: []byte("x")}}})
	wantS2Error(t, err, http.StatusServiceUnavailable, "unavailable")
	if d := time.Since(start); d < 50*time.Millisecond {
		t.Fatalf("fault came after %v, want ≥ 50ms", d)
	}
	if _, err := healthy.Append(ctx, &s2.AppendInput{Records: []s2.AppendRecord{{Body: []byte("x")}}}); err != nil {
		t.Fatal(err)
	}
	// Reads of the faulty stream are not affected; nothing was appended.
	if tail, err := faulty.CheckTail(ctx); err != nil || tail.Tail.SeqNum != 0 {
		t.Fatalf("tail %+v %v", tail, err)
	}
	if code := p.stop(t); code != 0 {
		t.Fatalf("exit %d", code)
	}
}

func TestFaultAdmin(t *testing.T) {
	ctx := context.Background()
	b, base := setup(t, s2local.Options{Token: "tok"})
	s := mustCreateStream(t, b, "s")
	auth := "Authorization: Bearer tok"
	put := func(cfg string) {
		t.Helper()
		r := do(t, "PUT", base+"/admin/faults", []byte(cfg), auth)
		if r.status != http.StatusOK {
			t.Fatalf("PUT /admin/faults %s: %d %s", cfg, r.status, r.body)
		}
	}
	wantError(t, do(t, "PUT", base+"/admin/faults", []byte(`{"rules":[]}`)), http.StatusUnauthorized, "authn")
	wantError(t, do(t, "PUT", base+"/admin/faults", []byte(`{"rules":[{"error_rate":1,"statuses":[418]}]}`), auth), http.StatusUnprocessableEntity, "invalid")
	one := &s2.AppendInput{Records: []s2.AppendRecord{{Body: []byte("x")}}}

	// 429 with retry-after-ms, before the append takes effect.
	put(`{"rules":[{"appends_only":true,"error_rate":1,"statuses":[429],"retry_after_ms":1234}]}`)
	r := do(t, "POST", base+"/v1/streams/s/records", []byte(`{"records":[{"body":"x"}]}`), auth, basinHdr)
	wantError(t, r, http.StatusTooManyRequests, "rate_limited")
	if r.header.Get("retry-after-ms") != "1234" {
		t.Fatalf("retry-after-ms %q", r.header.Get("retry-after-ms"))
	}
	_, err := s.Append(ctx, one)
	wantS2Error(t, err, http.StatusTooManyRequests, "rate_limited")
	if tail, err := s.CheckTail(ctx); err != nil || tail.Tail.SeqNum != 0 {
		t.Fatalf("tail after 429s: %+v %v", tail, err)
	}

	// 504 comes after the append took effect.
	put(`{"rules":[{"stream":"s","appends_only":true,"error_rate":1,"statuses":[504]}]}`)
	_, err = s.Append(ctx, one)
	wantS2Error(t, err, http.StatusGatewayTimeout, "upstream_timeout")
	if tail, err := s.CheckTail(ctx); err != nil || tail.Tail.SeqNum != 1 {
		t.Fatalf("tail after a 504: %+v %v", tail, err)
	}
	// 500 with after_effect as well; 408 and 503 before it.
	put(`{"rules":[{"appends_only":true,"error_rate":1,"statuses":[500],"after_effect":true}]}`)
	_, err = s.Append(ctx, one)
	wantS2Error(t, err, http.StatusInternalServerError, "other")
	put(`{"rules":[{"appends_only":true,"error_rate":1,"statuses":[408,503]}]}`)
	for range 4 {
		_, err = s.Append(ctx, one)
		var se *s2.S2Error
		if !errors.As(err, &se) || (se.Status != 408 && se.Status != 503) {
			t.Fatalf("want 408 or 503, got %v", err)
		}
	}
	if tail, err := s.CheckTail(ctx); err != nil || tail.Tail.SeqNum != 2 {
		t.Fatalf("tail: %+v %v", tail, err)
	}
	r = do(t, "GET", base+"/admin/faults", nil, auth)
	// Draws are random: all four may be one status, so a count may be absent.
	injected, _ := r.json(t)["injected"].(map[string]any)
	n408, _ := injected["408"].(float64)
	n503, _ := injected["503"].(float64)
	if n408+n503 != 4 {
		t.Fatalf("GET /admin/faults: %s", r.body)
	}

	// Latency on every request of one basin.
	put(`{"rules":[{"basin":"` + testBasin + `","latency_ms":80,"jitter_ms":20}]}`)
	start := time.Now()
	if _, err := s.CheckTail(ctx); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < 80*time.Millisecond || d > 2*time.Second {
		t.Fatalf("latency %v", d)
	}

	// In an append session every input draws: the session ends with the
	// error in a terminal frame.
	put(`{"rules":[{"appends_only":true,"error_rate":1,"statuses":[503]}]}`)
	as, err := s.AppendSession(ctx, &s2.AppendSessionOptions{RetryConfig: &s2.RetryConfig{MaxAttempts: 1}})
	if err != nil {
		t.Fatal(err)
	}
	f, err := as.Submit(one)
	if err == nil {
		var ticket *s2.BatchSubmitTicket
		if ticket, err = f.Wait(ctx); err == nil {
			_, err = ticket.Ack(ctx)
		}
	}
	// The SDK reports it as "max attempts exhausted", with the status in
	// the message.
	if err == nil || !strings.Contains(err.Error(), "unavailable") || !strings.Contains(err.Error(), "HTTP 503") {
		t.Fatalf("session error %v", err)
	}
	as.Close()

	// DELETE clears.
	if r := do(t, "DELETE", base+"/admin/faults", nil, auth); r.status != http.StatusOK || !strings.Contains(string(r.body), `"rules":[]`) {
		t.Fatalf("DELETE: %d %s", r.status, r.body)
	}
	if _, err := s.Append(ctx, one); err != nil {
		t.Fatal(err)
	}
}

// TestFaultSeed: the same seed gives the same sequence of faults.
func TestFaultSeed(t *testing.T) {
	ctx := context.Background()
	srv, base := startServer(t, s2local.Options{})
	c := newSDK(base, "")
	if _, err := c.Basins.Create(ctx, s2.CreateBasinArgs{Basin: testBasin}); err != nil {
		t.Fatal(err)
	}
	s := mustCreateStream(t, c.Basin(testBasin), "s")
	seed := uint64(42)
	run := func() string {
		if err := srv.SetFaults(s2local.FaultConfig{Seed: &seed, Rules: []s2local.FaultRule{{AppendsOnly: true, ErrorRate: 0.5, Statuses: []int{429, 503}}}}); err != nil {
			t.Fatal(err)
		}
		var out strings.Builder
		for range 32 {
			_, err := s.Append(ctx, &s2.AppendInput{Records: []s2.AppendRecord{{Body: []byte("x")}}})
			var se *s2.S2Error
			switch {
			case err == nil:
				out.WriteByte('.')
			case errors.As(err, &se):
				out.WriteString(map[int]string{429: "R", 503: "U"}[se.Status])
			default:
				t.Fatal(err)
			}
		}
		return out.String()
	}
	a, b := run(), run()
	if a != b || !strings.Contains(a, ".") || !strings.Contains(a, "R") || !strings.Contains(a, "U") {
		t.Fatalf("sequences %s and %s", a, b)
	}
}
