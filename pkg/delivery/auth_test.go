package delivery_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/pgs2/pgs2/pkg/config"
	"github.com/pgs2/pgs2/pkg/ctl"
	"github.com/pgs2/pgs2/pkg/delivery"
	"github.com/pgs2/pgs2/pkg/health"
	"github.com/pgs2/pgs2/pkg/natstest"
	"github.com/pgs2/pgs2/pkg/service"
)

// TestAdminToken: with a token, every call of the admin API needs it
// (401 without, naming neither the token nor its value), pgs2ctl sends it
// from PGS2_ADMIN_TOKEN, and the health endpoints stay open.
func TestAdminToken(t *testing.T) {
	const token = "s3cret-admin-token-7f"
	_, js := natstest.New(t).Connect(t)
	admin, err := delivery.NewAdmin(context.Background(), js, 1)
	if err != nil {
		t.Fatal(err)
	}
	admin.RequireToken(token)
	admin.SetSinks([]config.Sink{{Name: "s", Tables: []string{"public.t"}}})
	mux := http.NewServeMux()
	mux.Handle("/healthz", health.NewState().Handler())
	admin.Register(mux)
	api := httptest.NewServer(mux)
	defer api.Close()
	for _, c := range []struct {
		method, path, auth string
		want               int
	}{
		{"GET", "/v1/status", "", 401},
		{"GET", "/v1/status", "Bearer wrong", 401},
		{"GET", "/v1/status", token, 401}, // not a bearer
		{"POST", "/v1/backfills", "", 401},
		{"GET", "/v1/sinks/s/messages", "Bearer " + token[:len(token)-1], 401},
		{"GET", "/v1/status", "Bearer " + token, 200},
		{"GET", "/v1/backfills", "Bearer " + token, 200},
		{"GET", "/healthz", "", 200},
	} {
		req, _ := http.NewRequest(c.method, api.URL+c.path, strings.NewReader("{}"))
		if c.auth != "" {
			req.Header.Set("Authorization", c.auth)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != c.want && !(c.want == 200 && resp.StatusCode == 503) {
			t.Errorf("%s %s with %q: %d %s, want %d", c.method, c.path, c.auth, resp.StatusCode, body, c.want)
		}
		if bytes.Contains(body, []byte(token)) || bytes.Contains(body, []byte(token[:8])) {
			t.Errorf("%s %s: the answer holds the token: %s", c.method, c.path, body)
		}
	}
	addr := strings.TrimPrefix(api.URL, "http://")
	var out, errOut bytes.Buffer
	if code := ctl.Run(context.Background(), []string{"--admin", addr, "backfill", "status"}, &out, &errOut); code != 1 || !strings.Contains(errOut.String(), "needs its token") {
		t.Errorf("pgs2ctl without the token: exit %d: %s%s", code, out.String(), errOut.String())
	}
	t.Setenv("PGS2_ADMIN_TOKEN", token)
	out.Reset()
	errOut.Reset()
	if code := ctl.Run(context.Background(), []string{"--admin", addr, "backfill", "status"}, &out, &errOut); code != 0 || strings.Contains(out.String()+errOut.String(), token) {
		t.Errorf("pgs2ctl with PGS2_ADMIN_TOKEN: exit %d: %s%s", code, out.String(), errOut.String())
	}
}

// TestAdminOpenAddressNeedsToken: delivery refuses to serve the admin API
// beyond loopback without a token, as a usage error, before it connects.
func TestAdminOpenAddressNeedsToken(t *testing.T) {
	t.Setenv("PGS2_ADMIN_TOKEN", "")
	t.Setenv("PGS2_ADMIN_TOKEN_FILE", "")
	cfg := &config.Config{NATS: config.NATS{URL: "nats://127.0.0.1:1"}}
	env := service.Env{Config: cfg, Log: slog.New(slog.NewTextHandler(io.Discard, nil)), Health: health.NewState(), HTTPAddr: "0.0.0.0:9103"}
	err := delivery.Main(context.Background(), env)
	if !errors.Is(err, service.ErrUsage) || !strings.Contains(err.Error(), "PGS2_ADMIN_TOKEN") || !strings.Contains(err.Error(), "127.0.0.1") {
		t.Fatalf("open address without a token: %v", err)
	}
	for addr, loop := range map[string]bool{"127.0.0.1:9103": true, "localhost:1": true, "[::1]:9": true, "0.0.0.0:9103": false, ":9103": false, "10.0.0.5:1": false} {
		if service.Loopback(addr) != loop {
			t.Errorf("Loopback(%q) = %v", addr, !loop)
		}
	}
}
