package delivery_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	"github.com/pgs2/pgs2/pkg/config"
	"github.com/pgs2/pgs2/pkg/ctl"
	"github.com/pgs2/pgs2/pkg/delivery"
	adminv1 "github.com/pgs2/pgs2/proto/pgs2/admin/v1"
)

// lifecycleAPI serves the admin API told the pipeline's sinks.
func lifecycleAPI(t *testing.T, p *pipeline) *httptest.Server {
	t.Helper()
	admin, err := delivery.NewAdmin(context.Background(), p.js, 1)
	if err != nil {
		t.Fatal(err)
	}
	admin.SetSinks(p.sinks)
	mux := http.NewServeMux()
	admin.Register(mux)
	api := httptest.NewServer(mux)
	t.Cleanup(api.Close)
	return api
}

// post sends a JSON body and returns the status and the answer.
func post(t *testing.T, url, body string) (int, []byte) {
	t.Helper()
	resp, err := http.Post(url, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

func getStatus(t *testing.T, api string) *adminv1.GetStatusResponse {
	t.Helper()
	resp, err := http.Get(api + "/v1/status")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("GET /v1/status: %d %s", resp.StatusCode, b)
	}
	var st adminv1.GetStatusResponse
	if err := protojson.Unmarshal(b, &st); err != nil {
		t.Fatalf("GET /v1/status: %v: %s", err, b)
	}
	return &st
}

func sinkOf(st *adminv1.GetStatusResponse, name string) *adminv1.SinkStatus {
	for _, s := range st.Sinks {
		if s.Sink == name {
			return s
		}
	}
	return nil
}

// ids reads the rows' ids from a stream's records, in stream order.
func ids(recs []record) []int {
	out := make([]int, 0, len(recs))
	for _, r := range recs {
		rec, _ := r.Body["record"].(map[string]any)
		id, _ := rec["id"].(float64)
		out = append(out, int(id))
	}
	return out
}

// sorted: a stream keeps each key's order, not one across keys (rows
// of one transaction go through partitions side by side).
func sorted(l []int) []int { slices.Sort(l); return l }

func seq(from, to int) []int {
	var out []int
	for i := from; i <= to; i++ {
		out = append(out, i)
	}
	return out
}

// TestSinkLifecycle: a paused sink gets nothing more (in every delivery
// process, within a second), keeps its changes in JetStream, and resume
// delivers them in order, once; a disabled sink is not routed to, and
// enable delivers what is routed after. Status shows each state, the
// owners, what was delivered last and the slot; the audit records it all.
func TestSinkLifecycle(t *testing.T) {
	p := newPipeline(t, `CREATE TABLE docs (id int PRIMARY KEY, body text)`, []string{"public.docs"}, "app-basin")
	p.sinks = []config.Sink{
		{Name: "docs", Tables: []string{"public.docs"}, Basin: "app-basin", Stream: "docs"},
		{Name: "copy", Tables: []string{"public.docs"}, Basin: "app-basin", Stream: "copy"},
	}
	p.start(t)
	stop2 := p.startDelivery(t, p.sinks) // a second delivery process
	t.Cleanup(stop2)
	api := lifecycleAPI(t, p).URL
	insert := func(from, to int) {
		p.pg.MustExec(t, "app", fmt.Sprintf(`INSERT INTO docs SELECT g, 'x' FROM generate_series(%d, %d) g`, from, to))
	}
	insert(1, 10)
	p.records(t, "app-basin", "docs", 10)
	p.records(t, "app-basin", "copy", 10)

	// Status: both sinks owned and idle, their last commit known, the
	// source's capture and router active.
	var st *adminv1.GetStatusResponse
	deadline := time.Now().Add(15 * time.Second)
	for {
		st = getStatus(t, api)
		d := sinkOf(st, "docs")
		if d != nil && len(d.Streams) == 1 && d.Streams[0].Owner != "" && d.Streams[0].LastCommitLsn != "" &&
			len(st.Sources) == 1 && st.Sources[0].ConfirmedLsn != "" {
			break
		}
		if time.Now().After(deadline) {
			b, _ := protojson.Marshal(st)
			t.Fatalf("status never showed the owned stream and the slot: %s", b)
		}
		time.Sleep(200 * time.Millisecond)
	}
	src := st.Sources[0]
	if src.Source != "app" || src.CaptureState != "active" || src.RouterState != "active" || src.Slot != "pgs2" || src.WalRetainedBytes < 0 {
		t.Errorf("source status %v", src)
	}
	var stages []string
	for _, sg := range st.Stages {
		stages = append(stages, sg.Stage+":"+sg.Stream)
	}
	if !slices.Contains(stages, "changes:PGS2_CHANGES") || !slices.Contains(stages, "delivery:PGS2_DELIVERY") {
		t.Errorf("stages %v", stages)
	}
	docs := sinkOf(st, "docs")
	if s := docs.Streams[0]; s.Basin != "app-basin" || s.Stream != "docs" || s.OwnerHost == "" || s.LastCommitTime == nil || docs.State.GetState() != "active" {
		t.Errorf("docs status %v", docs)
	}

	// Pause docs: within a second neither delivery process appends to it.
	// (through pgs2ctl, as an operator would)
	var out, errOut bytes.Buffer
	if code := ctl.Run(context.Background(), []string{"sink", "pause", "docs", "--admin", api, "--operator", "ada", "--reason", "maintenance"}, &out, &errOut); code != 0 ||
		!strings.Contains(out.String(), "sink docs is paused") {
		t.Fatalf("pgs2ctl sink pause: exit %d: %s%s", code, out.String(), errOut.String())
	}
	time.Sleep(time.Second)
	insert(11, 20)
	p.records(t, "app-basin", "copy", 20)
	time.Sleep(500 * time.Millisecond)             // what docs would have received by now, had it not been paused
	p.recordsWithin(t, "app-basin", "docs", 10, 0) // fails if the paused sink got more
	st = getStatus(t, api)
	if d := sinkOf(st, "docs"); d.State.GetState() != "paused" || d.State.ChangedBy != "ada" || d.State.Reason != "maintenance" ||
		len(d.Streams) != 1 || d.Streams[0].State != "paused" {
		t.Errorf("paused docs status %v", d)
	}
	// What waits for the paused sink is measured (from its resume point in
	// S2): the 10 changes inserted since, committed over half a second ago.
	if d := sinkOf(st, "docs"); len(d.Streams) != 1 || d.Streams[0].Pending == 0 || d.Streams[0].LagSeconds < 0.4 ||
		d.Lag == 0 || d.LagSeconds < 0.4 {
		t.Errorf("paused docs: pending/lag not measured: %v", d)
	}
	out.Reset()
	if code := ctl.Run(context.Background(), []string{"--admin", api, "status"}, &out, &errOut); code != 0 ||
		!regexp.MustCompile(`(?m)^docs +paused .*by ada: maintenance$`).MatchString(out.String()) ||
		!regexp.MustCompile(`(?m)^  app-basin/docs +paused `).MatchString(out.String()) ||
		!regexp.MustCompile(`(?m)^app +active .* pgs2 +\d+/[0-9A-F]+ `).MatchString(out.String()) {
		t.Errorf("pgs2ctl status: exit %d:\n%s%s", code, out.String(), errOut.String())
	}
	t.Logf("pgs2ctl status:\n%s", out.String())
	out.Reset()
	var fromCLI adminv1.GetStatusResponse
	if code := ctl.Run(context.Background(), []string{"status", "--json", "--sink", "docs", "--admin", api}, &out, &errOut); code != 0 ||
		protojson.Unmarshal(out.Bytes(), &fromCLI) != nil || len(fromCLI.Sinks) != 1 || fromCLI.Sinks[0].State.GetState() != "paused" {
		t.Errorf("pgs2ctl status --json --sink docs: exit %d: %s%s", code, out.String(), errOut.String())
	}
	var deliveryPending uint64
	for _, sg := range st.Stages {
		if sg.Stream == "PGS2_DELIVERY" {
			deliveryPending = sg.Messages
		}
	}
	if deliveryPending == 0 {
		t.Errorf("the delivery stream holds nothing while docs is paused")
	}

	// Resume: what waited arrives, in order, once.
	if code, b := post(t, api+"/v1/sinks/docs/resume", `{}`); code != 200 {
		t.Fatalf("resume: %d %s", code, b)
	}
	if got := sorted(ids(p.records(t, "app-basin", "docs", 20))); !slices.Equal(got, seq(1, 20)) {
		t.Fatalf("docs after resume: %v", got)
	}

	// Disable copy: the router routes nothing to it; enable delivers what
	// is routed afterwards (not what was committed while it was disabled).
	if code, b := post(t, api+"/v1/sinks/copy/disable", `{"reason":"retiring"}`); code != 200 {
		t.Fatalf("disable: %d %s", code, b)
	}
	if code, b := post(t, api+"/v1/sinks/copy/resume", `{}`); code != http.StatusConflict || !strings.Contains(string(b), "enable") {
		t.Errorf("resume of a disabled sink: %d %s", code, b)
	}
	deadline = time.Now().Add(5 * time.Second)
	for st := getStatus(t, api); !slices.Contains(st.Sources[0].DisabledSinks, "copy"); st = getStatus(t, api) {
		if time.Now().After(deadline) {
			t.Fatalf("the router never reported copy disabled: %v", st.Sources[0])
		}
		time.Sleep(100 * time.Millisecond)
	}
	insert(21, 25)
	p.records(t, "app-basin", "docs", 25)
	if code, b := post(t, api+"/v1/sinks/copy/enable", `{}`); code != 200 {
		t.Fatalf("enable: %d %s", code, b)
	}
	time.Sleep(time.Second)
	insert(26, 30)
	p.records(t, "app-basin", "docs", 30)
	if got := sorted(ids(p.records(t, "app-basin", "copy", 25))); !slices.Equal(got, append(seq(1, 20), seq(26, 30)...)) {
		t.Fatalf("copy after disable and enable: %v", got)
	}

	if code, b := post(t, api+"/v1/sinks/nope/pause", `{}`); code != http.StatusNotFound || !strings.Contains(string(b), "copy, docs") {
		t.Errorf("pause of an unknown sink: %d %s", code, b)
	}
	var audit struct {
		Records []struct{ Action, Operator, Reason string } `json:"records"`
	}
	getJSON(t, api+"/v1/sinks/-/audit", &audit)
	var actions []string
	for _, r := range audit.Records {
		actions = append(actions, r.Action)
	}
	if want := []string{"sink pause", "sink resume", "sink disable", "sink enable"}; !slices.Equal(actions, want) {
		t.Errorf("audit actions %v, want %v", actions, want)
	}
	if b, _ := json.Marshal(audit); !strings.Contains(string(b), "maintenance") {
		t.Errorf("the audit lacks the pause's reason: %s", b)
	}
}
