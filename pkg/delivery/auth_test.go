package delivery_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
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
	admin.RequireTokens(map[string]string{token: ""})
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

// TestOperatorTokens: with a token per operator (PGS2_ADMIN_TOKENS_FILE),
// the audit records the operator the token proves, whoever the request
// says it is; the shared token still works, its caller's name recorded as
// declared (it cannot pass for an operator with a token). A
// malformed or ambiguous file is refused naming its line, never a token.
func TestOperatorTokens(t *testing.T) {
	const adaTok, boTok, shared = "ada-token-0123456789", "bo-token-9876543210", "shared-token-abcdefgh"
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	t.Setenv("PGS2_ADMIN_TOKEN", shared)
	t.Setenv("PGS2_ADMIN_TOKENS_FILE", write("tokens", "# operators\nada "+adaTok+"\n\nbo  "+boTok+"\n"))
	tokens, err := service.AdminTokens()
	if err != nil {
		t.Fatal(err)
	}
	_, js := natstest.New(t).Connect(t)
	admin, err := delivery.NewAdmin(context.Background(), js, 1)
	if err != nil {
		t.Fatal(err)
	}
	admin.RequireTokens(tokens)
	admin.SetSinks([]config.Sink{{Name: "s", Tables: []string{"public.t"}}})
	mux := http.NewServeMux()
	admin.Register(mux)
	api := httptest.NewServer(mux)
	defer api.Close()
	call := func(method, path, token, body string) (int, string) {
		req, _ := http.NewRequest(method, api.URL+path, strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := call("POST", "/v1/backfills", boTok, `{"sink":"s","id":"b1","operator":"mallory"}`); code != 201 || !strings.Contains(body, `"bo"`) {
		t.Fatalf("start with bo's token: %d %s", code, body)
	}
	if code, body := call("POST", "/v1/backfills/b1/pause", adaTok, `{"operator":"bo"}`); code != 200 {
		t.Fatalf("pause with ada's token: %d %s", code, body)
	}
	if code, body := call("POST", "/v1/backfills/b1/resume", shared, `{"operator":"carol"}`); code != 200 {
		t.Fatalf("resume with the shared token: %d %s", code, body)
	}
	if code, _ := call("GET", "/v1/status", "bo-token-guess-000000", ""); code != 401 {
		t.Errorf("an unknown token: %d, want 401", code)
	}
	_, audit := call("GET", "/v1/sinks/s/audit", adaTok, "")
	var recs struct {
		Records []struct{ Operator, Action string }
	}
	if err := json.Unmarshal([]byte(audit), &recs); err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, r := range recs.Records {
		got = append(got, r.Operator+": "+r.Action)
	}
	if want := "bo: backfill start, ada: backfill pause, carol (declared, shared token): backfill resume"; strings.Join(got, ", ") != want {
		t.Errorf("audit: %s, want %s", strings.Join(got, ", "), want)
	}
	// The same audit through pgs2ctl, and a retry of a whole sink.
	addr := strings.TrimPrefix(api.URL, "http://")
	var out, errOut bytes.Buffer
	if code := ctl.Run(context.Background(), []string{"--admin", addr, "messages", "audit", "--sink", "s"}, &out, &errOut); code != 0 ||
		!strings.Contains(out.String(), "backfill pause") || !strings.Contains(out.String(), "ada") {
		t.Errorf("pgs2ctl messages audit: %d %s %s", code, out.String(), errOut.String())
	}
	out.Reset()
	if code := ctl.Run(context.Background(), []string{"--admin", addr, "messages", "retry", "--sink", "s"}, &out, &errOut); code != 0 ||
		!strings.Contains(out.String(), "every failed message of sink s") {
		t.Errorf("pgs2ctl messages retry --sink s: %d %s %s", code, out.String(), errOut.String())
	}
	if strings.Contains(audit, "mallory") {
		t.Errorf("the audit believed a declared name over the token's:\n%s", audit)
	}

	for name, content := range map[string]string{
		"one field":   "ada\n",
		"short":       "ada short-tok\n",
		"duplicate":   "ada " + adaTok + "\nbo " + adaTok + "\n",
		"same name":   "ada " + adaTok + "\nada " + boTok + "\n",
		"bad name":    "ada/x " + adaTok + "\n",
		"no operator": "# nobody\n",
	} {
		t.Setenv("PGS2_ADMIN_TOKENS_FILE", write(strings.ReplaceAll(name, " ", "-"), content))
		_, err := service.AdminTokens()
		if err == nil {
			t.Errorf("%s: accepted", name)
			continue
		}
		if strings.Contains(err.Error(), adaTok) || strings.Contains(err.Error(), boTok) || strings.Contains(err.Error(), "short-tok") {
			t.Errorf("%s: the error holds a token: %v", name, err)
		}
	}
}
