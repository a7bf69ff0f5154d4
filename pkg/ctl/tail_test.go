package ctl_test

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/s2-streamstore/s2-sdk-go/s2"

	"github.com/pgs2/pgs2/pkg/ctl"
	"github.com/pgs2/pgs2/pkg/pgtest"
	"github.com/pgs2/pgs2/pkg/proctest"
)

const (
	token  = "tail-test-token"
	basin  = "tail-basin"
	stream = "events"
)

// s2server runs bin/s2local (as a process) with a token and returns its URL.
func s2server(t *testing.T) string {
	t.Helper()
	bin := proctest.Build(t, "../../services/s2local")
	port, err := pgtest.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	url := "http://127.0.0.1:" + strconv.Itoa(port)
	var logb proctest.Buffer
	cmd := exec.Command(bin, "--addr", "127.0.0.1:"+strconv.Itoa(port), "--data-dir", t.TempDir(), "--token", token)
	cmd.Stdout, cmd.Stderr = &logb, &logb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			t.Logf("s2local log:\n%s", logb.String())
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		if resp, err := http.Get(url + "/health"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("s2local not healthy after 30s:\n%s", logb.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	return url
}

func sdk(url string) *s2.Client {
	base := url + "/v1"
	return s2.New(token, &s2.ClientOptions{BaseURL: base, MakeBasinBaseURL: func(string) string { return base }})
}

func appendRecords(t *testing.T, c *s2.Client, recs ...s2.AppendRecord) {
	t.Helper()
	_, err := c.Basin(basin).Stream(stream).Append(context.Background(), &s2.AppendInput{Records: recs})
	if err != nil {
		t.Fatalf("append: %v", err)
	}
}

// setup starts s2local with a stream holding: 0 a JSON record, 1 a fence
// command record, 2 a text record, 3 a JSON record.
func setup(t *testing.T) (string, *s2.Client) {
	t.Helper()
	url := s2server(t)
	c := sdk(url)
	ctx := context.Background()
	if _, err := c.Basins.Create(ctx, s2.CreateBasinArgs{Basin: basin}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Basin(basin).Streams.Create(ctx, s2.CreateStreamArgs{Stream: stream}); err != nil {
		t.Fatal(err)
	}
	appendRecords(t, c, s2.AppendRecord{Headers: []s2.Header{s2.NewHeader("action", "insert")}, Body: []byte(`{"id": 1, "name": "a"}`)})
	appendRecords(t, c, s2.AppendRecord{Headers: []s2.Header{{Name: []byte{}, Value: []byte("fence")}}, Body: []byte("tok-1")})
	appendRecords(t, c, s2.AppendRecord{Body: []byte("plain text")},
		s2.AppendRecord{Headers: []s2.Header{s2.NewHeader("action", "update"), s2.NewHeader("table", "public.users")}, Body: []byte(`{"id":2}`)})
	return url, c
}

type tailRecord struct {
	SeqNum    uint64          `json:"seq_num"`
	Timestamp uint64          `json:"timestamp"`
	Headers   [][2]string     `json:"headers"`
	Body      json.RawMessage `json:"body"`
}

func run(t *testing.T, ctx context.Context, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	code = ctl.Run(ctx, args, &out, &errb)
	return code, out.String(), errb.String()
}

func parseLines(t *testing.T, out string) []tailRecord {
	t.Helper()
	var recs []tailRecord
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if line == "" {
			continue
		}
		var r tailRecord
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatalf("not a JSON line: %q: %v", line, err)
		}
		recs = append(recs, r)
	}
	return recs
}

func seqs(recs []tailRecord) []uint64 {
	var s []uint64
	for _, r := range recs {
		s = append(s, r.SeqNum)
	}
	return s
}

func TestTailJSON(t *testing.T) {
	url, _ := setup(t)
	t.Setenv("S2_ACCESS_TOKEN", token)
	code, out, errs := run(t, context.Background(), "tail", basin+"/"+stream, "--endpoint", url, "--json", "--no-follow")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errs)
	}
	recs := parseLines(t, out)
	if got := seqs(recs); len(got) != 3 || got[0] != 0 || got[1] != 2 || got[2] != 3 {
		t.Fatalf("seq_nums %v, want [0 2 3] (the fence skipped)\n%s", got, out)
	}
	if string(recs[0].Body) != `{"id":1,"name":"a"}` {
		t.Errorf("JSON body = %s, want the object", recs[0].Body)
	}
	if string(recs[1].Body) != `"plain text"` {
		t.Errorf("text body = %s, want a JSON string", recs[1].Body)
	}
	if h := recs[2].Headers; len(h) != 2 || h[0] != [2]string{"action", "update"} || h[1] != [2]string{"table", "public.users"} {
		t.Errorf("headers = %v", h)
	}
	if recs[0].Timestamp == 0 {
		t.Error("no timestamp")
	}

	// Flags before "--", the stream after it.
	code, out2, errs := run(t, context.Background(), "tail", "--json", "--no-follow", "--endpoint", url, "--", basin+"/"+stream)
	if code != 0 || out2 != out {
		t.Fatalf("with --: exit %d: %s\n%s", code, errs, out2)
	}

	// --commands shows the fence.
	_, out, _ = run(t, context.Background(), "tail", "--json", "--no-follow", "--commands", "--endpoint", url, basin+"/"+stream)
	if got := seqs(parseLines(t, out)); len(got) != 4 {
		t.Fatalf("--commands: seq_nums %v, want 4 records", got)
	}
}

func TestTailText(t *testing.T) {
	url, _ := setup(t)
	t.Setenv("S2_ACCESS_TOKEN", token)
	code, out, errs := run(t, context.Background(), "tail", basin+"/"+stream, "--endpoint", url, "--no-follow")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errs)
	}
	for _, want := range []string{"seq_num 0  timestamp ", "  action: insert\n", "{\n  \"id\": 1,\n  \"name\": \"a\"\n}", "plain text", "  table: public.users\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "tok-1") || strings.Contains(out, "seq_num 1 ") {
		t.Errorf("the fence command record was printed:\n%s", out)
	}
}

func TestTailSeqAndCount(t *testing.T) {
	url, _ := setup(t)
	t.Setenv("S2_ACCESS_TOKEN", token)
	_, out, errs := run(t, context.Background(), "tail", basin+"/"+stream, "--endpoint", url, "--json", "--seq", "2", "--no-follow")
	if got := seqs(parseLines(t, out)); len(got) != 2 || got[0] != 2 || got[1] != 3 {
		t.Fatalf("--seq 2: seq_nums %v, want [2 3]; stderr %s", got, errs)
	}
	// --count stops a following tail (no --no-follow) once enough arrived.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	code, out, errs := run(t, ctx, "tail", basin+"/"+stream, "--endpoint", url, "--json", "--count", "2")
	if code != 0 || ctx.Err() != nil {
		t.Fatalf("--count 2: exit %d, ctx %v: %s", code, ctx.Err(), errs)
	}
	if got := seqs(parseLines(t, out)); len(got) != 2 || got[0] != 0 || got[1] != 2 {
		t.Fatalf("--count 2: seq_nums %v, want [0 2]", got)
	}
	// Beyond the tail.
	code, _, errs = run(t, context.Background(), "tail", basin+"/"+stream, "--endpoint", url, "--seq", "99", "--no-follow")
	if code != 1 || !strings.Contains(errs, "beyond the tail") {
		t.Fatalf("--seq 99: exit %d: %s", code, errs)
	}
}

func TestTailFollowFromTail(t *testing.T) {
	url, c := setup(t)
	t.Setenv("S2_ACCESS_TOKEN", token)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	type result struct {
		code        int
		out, stderr string
	}
	res := make(chan result, 1)
	go func() {
		var out, errb bytes.Buffer
		code := ctl.Run(ctx, []string{"tail", basin + "/" + stream, "--endpoint", url, "--json", "--from-tail", "--count", "2"}, &out, &errb)
		res <- result{code, out.String(), errb.String()}
	}()
	// Append until the tail has seen two records appended after it started.
	var r result
	for i := 0; ; i++ {
		appendRecords(t, c, s2.AppendRecord{Body: []byte(`{"live":` + strconv.Itoa(i) + `}`)})
		select {
		case r = <-res:
		case <-time.After(300 * time.Millisecond):
			continue
		}
		break
	}
	if r.code != 0 {
		t.Fatalf("exit %d: %s", r.code, r.stderr)
	}
	recs := parseLines(t, r.out)
	if len(recs) != 2 || recs[0].SeqNum < 4 || recs[1].SeqNum != recs[0].SeqNum+1 {
		t.Fatalf("--from-tail printed %v, want two consecutive records from seq_num 4 on", seqs(recs))
	}
	if !strings.HasPrefix(string(recs[0].Body), `{"live":`) {
		t.Fatalf("body %s", recs[0].Body)
	}
}

func TestTailFollowUntilCancelled(t *testing.T) {
	url, c := setup(t)
	t.Setenv("S2_ACCESS_TOKEN", token)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out proctest.Buffer
	done := make(chan int, 1)
	go func() {
		var errb bytes.Buffer
		done <- ctl.Run(ctx, []string{"tail", basin + "/" + stream, "--endpoint", url, "--json"}, &out, &errb)
	}()
	appendRecords(t, c, s2.AppendRecord{Body: []byte(`{"late":true}`)})
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(out.String(), `"late":true`) {
		if time.Now().After(deadline) {
			t.Fatalf("the appended record did not show up:\n%s", out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	cancel() // Ctrl-C
	select {
	case code := <-done:
		if code != 0 {
			t.Fatalf("exit %d after cancel, want 0", code)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("tail did not stop when cancelled")
	}
	if got := seqs(parseLines(t, out.String())); len(got) != 4 || got[3] != 4 {
		t.Fatalf("seq_nums %v, want [0 2 3 4]", got)
	}
}

func TestTailErrors(t *testing.T) {
	url, _ := setup(t)

	// A refused token: a clear message that names the variable, not the token.
	t.Setenv("S2_ACCESS_TOKEN", "wrong-secret-value")
	code, _, errs := run(t, context.Background(), "tail", basin+"/"+stream, "--endpoint", url, "--no-follow")
	if code != 1 || !strings.Contains(errs, "refused the access token") || !strings.Contains(errs, "401") || !strings.Contains(errs, "S2_ACCESS_TOKEN") {
		t.Fatalf("wrong token: exit %d: %s", code, errs)
	}
	if strings.Contains(errs, "wrong-secret-value") {
		t.Fatalf("the token was printed: %s", errs)
	}
	// The same refused in follow mode.
	code, _, errs = run(t, context.Background(), "tail", basin+"/"+stream, "--endpoint", url)
	if code != 1 || !strings.Contains(errs, "refused the access token") {
		t.Fatalf("wrong token, follow: exit %d: %s", code, errs)
	}
	// --token-env names another variable.
	t.Setenv("MY_S2_TOKEN", token)
	if code, _, errs = run(t, context.Background(), "tail", basin+"/"+stream, "--endpoint", url, "--no-follow", "--token-env", "MY_S2_TOKEN"); code != 0 {
		t.Fatalf("--token-env: exit %d: %s", code, errs)
	}

	// An unreachable endpoint.
	t.Setenv("S2_ACCESS_TOKEN", token)
	port, _ := pgtest.FreePort()
	dead := "http://127.0.0.1:" + strconv.Itoa(port)
	code, _, errs = run(t, context.Background(), "tail", basin+"/"+stream, "--endpoint", dead)
	if code != 1 || !strings.Contains(errs, "cannot reach S2 at "+dead) {
		t.Fatalf("unreachable: exit %d: %s", code, errs)
	}

	// A stream that does not exist.
	code, _, errs = run(t, context.Background(), "tail", basin+"/nope", "--endpoint", url, "--no-follow")
	if code != 1 || !strings.Contains(errs, "not found") {
		t.Fatalf("missing stream: exit %d: %s", code, errs)
	}

	// Usage mistakes exit 2.
	for _, args := range [][]string{
		{"tail"},
		{"tail", "no-slash"},
		{"tail", basin + "/" + stream, "--seq", "1", "--from-tail"},
		{"tail", basin + "/" + stream, "--endpoint", "ftp://x"},
		{"tail", basin + "/" + stream, "--bogus"},
	} {
		if code, _, errs := run(t, context.Background(), args...); code != 2 {
			t.Errorf("%q: exit %d, want 2: %s", args, code, errs)
		}
	}
}

func TestTailEnvironmentAndConfig(t *testing.T) {
	url, _ := setup(t)

	// The SDK's variables.
	t.Setenv("S2_ACCESS_TOKEN", token)
	t.Setenv("S2_ACCOUNT_ENDPOINT", url)
	t.Setenv("S2_BASIN_ENDPOINT", url)
	code, out, errs := run(t, context.Background(), "tail", basin+"/"+stream, "--json", "--no-follow")
	if code != 0 || len(parseLines(t, out)) != 3 {
		t.Fatalf("S2_*_ENDPOINT: exit %d: %s\n%s", code, errs, out)
	}
	t.Setenv("S2_BASIN_ENDPOINT", "ftp://nope")
	if code, _, errs = run(t, context.Background(), "tail", basin+"/"+stream, "--no-follow"); code != 1 || !strings.Contains(errs, "S2_BASIN_ENDPOINT") {
		t.Fatalf("bad S2_BASIN_ENDPOINT: exit %d: %s", code, errs)
	}
	os.Unsetenv("S2_ACCOUNT_ENDPOINT")
	os.Unsetenv("S2_BASIN_ENDPOINT")

	// A config file's sink: endpoint, token variable, basin and stream.
	t.Setenv("S2_ACCESS_TOKEN", "")
	t.Setenv("SINK_TOKEN", token)
	cfg := filepath.Join(t.TempDir(), "pgs2.yaml")
	yaml := `source: {name: app, dsn: "postgres://u@127.0.0.1:1/app", tables: [public.users]}
nats: {url: "nats://127.0.0.1:1"}
sinks:
  - {name: events, tables: [public.users], basin: ` + basin + `, stream: ` + stream + `, endpoint: "` + url + `", access_token_env: SINK_TOKEN}
  - {name: other, tables: [public.users], basin: other-basin, stream: x, endpoint: "` + url + `"}
`
	if err := os.WriteFile(cfg, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	code, out, errs = run(t, context.Background(), "tail", "--config", cfg, "--sink", "events", "--json", "--no-follow")
	if code != 0 || len(parseLines(t, out)) != 3 {
		t.Fatalf("--config --sink: exit %d: %s\n%s", code, errs, out)
	}
	// Two sinks: --sink is required.
	if code, _, errs = run(t, context.Background(), "tail", "--config", cfg, "--no-follow"); code != 2 || !strings.Contains(errs, "--sink") {
		t.Fatalf("--config without --sink: exit %d: %s", code, errs)
	}
}
