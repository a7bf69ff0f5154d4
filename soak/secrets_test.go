package soak_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/s2-streamstore/s2-sdk-go/s2"

	"github.com/pgs2/pgs2/pkg/natstest"
	"github.com/pgs2/pgs2/pkg/pgtest"
	"github.com/pgs2/pgs2/pkg/proctest"
	"github.com/pgs2/pgs2/pkg/s2local"
	"github.com/pgs2/pgs2/pkg/telemetry/otlptest"
)

// TestSecretsNeverLeak runs the three services with recognisable secrets —
// an S2 token, a NATS password, a Postgres password and an admin token —
// makes S2 answer 401 (a sink with a wrong token) and 500/503 (faults on
// a third sink's appends), the admin API answer 401 (a call without the
// token) and a config error happen, and finds none of the secrets in any
// log line, error, span (attributes, events, status; exported over OTLP),
// metric, admin API answer or pgs2ctl output.
func TestSecretsNeverLeak(t *testing.T) {
	if testing.Short() {
		t.Skip("process test: PostgreSQL, NATS, s2local and three service processes")
	}
	const (
		s2Token  = "S2TOK-4f9a1c77"
		badToken = "BADTOK-c0ffee11"
		natsPW   = "NATSPW-7d21e0aa"
		pgPW     = "PGPW-b3c8e5ff"
		adminTok = "ADMTOK-91aa2f33"
		inlinePW = "INLINEPW-5e5e5e"
	)
	secrets := []string{s2Token, badToken, natsPW, pgPW, adminTok, inlinePW}
	pg := pgtest.New(t)
	pg.MustExec(t, "postgres", "CREATE DATABASE app")
	pg.MustExec(t, "app", "CREATE TABLE users (id int PRIMARY KEY, name text)")
	ns := natstest.NewSecured(t, server.Options{Username: "pgs2", Password: natsPW})
	// S2 answers every append to the flaky sink's stream with a 500 or a
	// 503 (a fraction of the good sink's could leave a run with none).
	faults := s2local.FaultConfig{Rules: []s2local.FaultRule{{Stream: "flaky", AppendsOnly: true, ErrorRate: 1,
		Statuses: []int{http.StatusInternalServerError, http.StatusServiceUnavailable}}}}
	s2srv, err := s2local.New(s2local.Options{DataDir: filepath.Join(t.TempDir(), "s2"), Basins: []string{soakBasin}, Token: s2Token,
		Faults: faults, Logger: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(s2srv)
	defer func() { hs.Close(); s2srv.Close() }()

	t.Setenv("PGS2_SOURCE_PASSWORD", pgPW)
	t.Setenv("PGS2_NATS_PASSWORD", natsPW)
	t.Setenv("PGS2_ADMIN_TOKEN", adminTok)
	t.Setenv("GOOD_S2_TOKEN", s2Token)
	t.Setenv("BAD_S2_TOKEN", badToken)
	traces := otlptest.New(t)
	cfg := filepath.Join(t.TempDir(), "pgs2.yaml")
	writeFile(t, cfg, fmt.Sprintf(`source: {name: app, dsn: %q, tables: [public.users]}
nats: {url: %q, user: pgs2, partitions: 4}
telemetry: {otlp_endpoint: %q}
sinks:
  - {name: good, tables: [public.users], basin: %s, stream: good, endpoint: %q, access_token_env: GOOD_S2_TOKEN, create_stream: true,
     retry: {initial: 20ms, max: 100ms}}
  - {name: bad, tables: [public.users], basin: %s, stream: bad, endpoint: %q, access_token_env: BAD_S2_TOKEN, create_stream: true,
     retry: {initial: 50ms, max: 200ms}}
  - {name: flaky, tables: [public.users], basin: %s, stream: flaky, endpoint: %q, access_token_env: GOOD_S2_TOKEN, create_stream: true,
     retry: {initial: 50ms, max: 200ms}}
`, pg.DSN("app"), ns.ClientURL(), traces.Addr, soakBasin, hs.URL, soakBasin, hs.URL, soakBasin, hs.URL))
	procs := map[string]*proctest.Proc{}
	for _, name := range []string{"capture", "router", "delivery"} {
		procs[name] = proctest.Start(t, proctest.Build(t, servicePath(name)), "--config", cfg, "--log-level", "debug")
	}
	pg.MustExec(t, "app", "INSERT INTO users VALUES (1, 'ada'), (2, 'bo')")

	// The good sink delivers; the bad one fails with S2's 401 and parks.
	sdk := s2.New(s2Token, &s2.ClientOptions{BaseURL: hs.URL + "/v1", MakeBasinBaseURL: func(string) string { return hs.URL + "/v1" }})
	admin := "http://" + procs["delivery"].Addr
	get := func(path, token string) (int, string) {
		req, _ := http.NewRequest("GET", admin+path, nil)
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	var outputs []string
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(100 * time.Millisecond) {
		count := uint64(10)
		start := uint64(0)
		rb, err := sdk.Basin(soakBasin).Stream("good").Read(context.Background(), &s2.ReadOptions{SeqNum: &start, Count: &count})
		_, msgs := get("/v1/sinks/bad/messages", adminTok)
		_, flaky := get("/v1/sinks/flaky/messages", adminTok)
		if err == nil && len(rb.Records) >= 2 && strings.Contains(msgs, "401") &&
			(strings.Contains(strings.ReplaceAll(flaky, " ", ""), `"http_status":500`) ||
				strings.Contains(strings.ReplaceAll(flaky, " ", ""), `"http_status":503`)) {
			outputs = append(outputs, msgs, flaky)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after a minute: good stream %v (%v), bad sink's failures %s, flaky sink's %s", rb, err, msgs, flaky)
		}
	}
	for _, path := range []string{"/v1/status", "/v1/sinks/-/messages", "/v1/backfills"} {
		code, body := get(path, "")
		if code != http.StatusUnauthorized {
			t.Errorf("%s without the token: %d", path, code)
		}
		outputs = append(outputs, body)
		_, body = get(path, adminTok)
		outputs = append(outputs, body)
	}
	for name, p := range procs {
		resp, err := http.Get("http://" + p.Addr + "/metrics")
		if err != nil {
			t.Fatalf("%s /metrics: %v", name, err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		outputs = append(outputs, string(b))
	}
	ctl := proctest.Build(t, servicePath("pgs2ctl"))
	for _, args := range [][]string{{"messages", "list", "--sink", "bad", "--json"}, {"messages", "list"}, {"backfill", "status"}} {
		out, _ := exec.Command(ctl, append([]string{"--admin", procs["delivery"].Addr}, args...)...).CombinedOutput()
		outputs = append(outputs, string(out))
	}
	// A config error with a password inline in the DSN.
	badCfg := filepath.Join(t.TempDir(), "bad.yaml")
	writeFile(t, badCfg, fmt.Sprintf("source: {name: app, dsn: \"postgres://u:%s@127.0.0.1:1/app\", tables: [users], slot: Bad-Slot}\nnats: {url: %q}\n", inlinePW, ns.ClientURL()))
	out, err := exec.Command(proctest.Build(t, servicePath("capture")), "--config", badCfg).CombinedOutput()
	if err == nil {
		t.Fatalf("capture with a bad config did not fail: %s", out)
	}
	outputs = append(outputs, string(out))
	// The spans of every service, the failed appends' among them.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		got := traces.Services()
		if got["pgs2-capture"] > 0 && got["pgs2-router"] > 0 && got["pgs2-delivery"] > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("spans per service: %v, want capture's, router's and delivery's", got)
		}
	}
	outputs = append(outputs, traces.Text())
	for name, p := range procs {
		outputs = append(outputs, p.Output())
		if !strings.Contains(p.Output(), "level=") {
			t.Errorf("%s logged nothing", name)
		}
	}
	all := strings.Join(outputs, "\n")
	if !strings.Contains(all, "401") {
		t.Fatal("no 401 was seen: the test did not make S2 refuse a token")
	}
	if !strings.Contains(all, "500") && !strings.Contains(all, "503") {
		t.Fatal("no 500 or 503 was seen: the test did not make S2 fail appends")
	}
	for _, s := range secrets {
		if i := strings.Index(all, s); i >= 0 {
			t.Errorf("secret %q leaked: …%s…", s, all[max(0, i-200):min(len(all), i+100)])
		}
	}
}
