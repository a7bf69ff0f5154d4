package s2local_test

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	s2pb "github.com/s2-streamstore/s2-sdk-go/generated"
	"google.golang.org/protobuf/proto"

	"github.com/pgs2/pgs2/pkg/s2local"
)

// Tests that speak HTTP directly: the JSON formats and S2's error bodies.

const basinHdr = "s2-basin: " + testBasin

func rawSetup(t *testing.T, o s2local.Options) string {
	t.Helper()
	_, base := startServer(t, o)
	r := do(t, "POST", base+"/v1/basins", []byte(`{"basin":"`+testBasin+`"}`), "Content-Type: application/json")
	if r.status != http.StatusCreated || r.header.Get("s2-provision-result") != "created" {
		t.Fatalf("create basin: %d %s", r.status, r.body)
	}
	r = do(t, "POST", base+"/v1/streams", []byte(`{"stream":"s"}`), basinHdr)
	if r.status != http.StatusCreated {
		t.Fatalf("create stream: %d %s", r.status, r.body)
	}
	return base
}

type jsonRecord struct {
	SeqNum    uint64      `json:"seq_num"`
	Timestamp uint64      `json:"timestamp"`
	Headers   [][2]string `json:"headers"`
	Body      string      `json:"body"`
}

type jsonBatch struct {
	Records []jsonRecord `json:"records"`
	Tail    *struct {
		SeqNum    uint64 `json:"seq_num"`
		Timestamp uint64 `json:"timestamp"`
	} `json:"tail"`
}

func readJSON(t *testing.T, base, query string, hdr ...string) jsonBatch {
	t.Helper()
	r := do(t, "GET", base+"/v1/streams/s/records?"+query, nil, append(hdr, basinHdr)...)
	if r.status != http.StatusOK {
		t.Fatalf("read %s: %d %s", query, r.status, r.body)
	}
	var b jsonBatch
	if err := json.Unmarshal(r.body, &b); err != nil {
		t.Fatal(err)
	}
	return b
}

func TestHTTPJSONFormats(t *testing.T) {
	base := rawSetup(t, s2local.Options{})
	// raw (the default): strings are the bytes.
	r := do(t, "POST", base+"/v1/streams/s/records",
		[]byte(`{"records":[{"headers":[["action","insert"]],"body":"{\"id\":1,\"name\":\"Zoë\"}","timestamp":1000},{"body":""}]}`),
		basinHdr, "Content-Type: application/json")
	if r.status != http.StatusOK {
		t.Fatalf("append raw: %d %s", r.status, r.body)
	}
	ack := r.json(t)
	if ack["start"].(map[string]any)["seq_num"] != 0.0 || ack["end"].(map[string]any)["seq_num"] != 2.0 ||
		ack["start"].(map[string]any)["timestamp"] != 1000.0 {
		t.Fatalf("ack %s", r.body)
	}
	// base64: binary-safe.
	bin := []byte{0, 1, 2, 0xff, 0xfe}
	b64 := base64.StdEncoding.EncodeToString(bin)
	r = do(t, "POST", base+"/v1/streams/s/records",
		fmt.Appendf(nil, `{"records":[{"headers":[[%q,%q]],"body":%q}],"match_seq_num":2}`,
			base64.StdEncoding.EncodeToString([]byte("k")), b64, b64),
		basinHdr, "s2-format: base64")
	if r.status != http.StatusOK {
		t.Fatalf("append base64: %d %s", r.status, r.body)
	}

	raw := readJSON(t, base, "seq_num=0")
	if len(raw.Records) != 3 || raw.Tail == nil || raw.Tail.SeqNum != 3 {
		t.Fatalf("read raw: %+v", raw)
	}
	if r0 := raw.Records[0]; r0.Body != `{"id":1,"name":"Zoë"}` || r0.Headers[0] != [2]string{"action", "insert"} || r0.Timestamp != 1000 {
		t.Fatalf("raw record 0: %+v", r0)
	}
	if raw.Records[1].Body != "" || raw.Records[1].Headers != nil {
		t.Fatalf("raw record 1: %+v", raw.Records[1])
	}
	// Invalid UTF-8 reads as U+FFFD in raw format.
	if got := raw.Records[2].Body; got != "\x00\x01\x02\ufffd\ufffd" {
		t.Fatalf("raw record 2 body %q", got)
	}
	enc := readJSON(t, base, "seq_num=0", "s2-format: base64")
	if enc.Records[2].Body != b64 || enc.Records[2].Headers[0][0] != base64.StdEncoding.EncodeToString([]byte("k")) ||
		enc.Records[0].Body != base64.StdEncoding.EncodeToString([]byte(`{"id":1,"name":"Zoë"}`)) {
		t.Fatalf("read base64: %+v", enc)
	}

	// Bad base64 is invalid (422).
	r = do(t, "POST", base+"/v1/streams/s/records", []byte(`{"records":[{"body":"!!"}]}`), basinHdr, "s2-format: base64")
	wantError(t, r, http.StatusUnprocessableEntity, "invalid")
	r = do(t, "POST", base+"/v1/streams/s/records", []byte(`{"records":[{"body":"x"}]}`), basinHdr, "s2-format: hex")
	wantError(t, r, http.StatusBadRequest, "bad_header")
}

func TestHTTPErrors(t *testing.T) {
	base := rawSetup(t, s2local.Options{})
	post := func(body []byte, hdr ...string) rawResp {
		return do(t, "POST", base+"/v1/streams/s/records", body, append(hdr, basinHdr)...)
	}
	wantError(t, post([]byte(`{"records":[{"body":`)), http.StatusBadRequest, "bad_json")
	wantError(t, post([]byte(`{"recs":[]}`)), http.StatusBadRequest, "bad_json")
	wantError(t, post([]byte(`{"records":[{"headers":[["only-name"]]}]}`)), http.StatusBadRequest, "bad_json")
	wantError(t, post([]byte(`not protobuf`), "Content-Type: application/protobuf"), http.StatusBadRequest, "bad_proto")
	wantError(t, post([]byte(`{"records":[]}`)), http.StatusUnprocessableEntity, "invalid")
	wantError(t, post([]byte(`{"records":[{"headers":[["","x"]]}]}`)), http.StatusUnprocessableEntity, "invalid")
	wantError(t, post([]byte(`{"records":[{"headers":[["","fence"],["a","b"]]}]}`)), http.StatusUnprocessableEntity, "invalid")
	wantError(t, post([]byte(`{"records":[{"body":"x"}],"fencing_token":"`+strings.Repeat("t", 37)+`"}`)), http.StatusUnprocessableEntity, "invalid")

	// 1000 records pass, 1001 do not (JSON and protobuf).
	many := func(n int) []byte {
		return []byte(`{"records":[` + strings.TrimSuffix(strings.Repeat(`{"body":"x"},`, n), ",") + `]}`)
	}
	if r := post(many(1000)); r.status != http.StatusOK {
		t.Fatalf("1000 records: %d %s", r.status, r.body)
	}
	wantError(t, post(many(1001)), http.StatusUnprocessableEntity, "invalid")
	pbMany := func(n, body int) []byte {
		in := &s2pb.AppendInput{}
		for range n {
			in.Records = append(in.Records, &s2pb.AppendRecord{Body: make([]byte, body)})
		}
		b, _ := proto.Marshal(in)
		return b
	}
	wantError(t, post(pbMany(1001, 1), "Content-Type: application/protobuf"), http.StatusUnprocessableEntity, "invalid")
	// 1 MiB metered: 8 + body per record.
	if r := post(pbMany(2, 512*1024-8), "Content-Type: application/protobuf", "Accept: application/protobuf"); r.status != http.StatusOK {
		t.Fatalf("exactly 1 MiB: %d %s", r.status, r.body)
	}
	wantError(t, post(pbMany(2, 512*1024-7), "Content-Type: application/protobuf"), http.StatusUnprocessableEntity, "invalid")
	wantError(t, post(pbMany(1, 1<<20), "Content-Type: application/protobuf"), http.StatusUnprocessableEntity, "invalid")

	// 412 bodies.
	r := post([]byte(`{"records":[{"body":"x"}],"match_seq_num":0}`))
	if r.status != http.StatusPreconditionFailed || string(r.body) != `{"seq_num_mismatch":1002}` {
		t.Fatalf("seq mismatch: %d %s", r.status, r.body)
	}
	r = post([]byte(`{"records":[{"body":"x"}],"fencing_token":"me"}`))
	if r.status != http.StatusPreconditionFailed || string(r.body) != `{"fencing_token_mismatch":""}` {
		t.Fatalf("fence mismatch: %d %s", r.status, r.body)
	}

	// 404s, 400s.
	r = do(t, "POST", base+"/v1/streams/nope/records", []byte(`{"records":[{"body":"x"}]}`), basinHdr)
	wantError(t, r, http.StatusNotFound, "stream_not_found")
	r = do(t, "GET", base+"/v1/streams/nope/records/tail", nil, basinHdr)
	wantError(t, r, http.StatusNotFound, "stream_not_found")
	r = do(t, "GET", base+"/v1/streams/s/records/tail", nil, "s2-basin: no-such-basin")
	wantError(t, r, http.StatusNotFound, "basin_not_found")
	r = do(t, "GET", base+"/v1/basins/no-such-basin", nil)
	wantError(t, r, http.StatusNotFound, "basin_not_found")
	r = do(t, "GET", base+"/v1/streams", nil)
	wantError(t, r, http.StatusBadRequest, "bad_header")
	r = do(t, "GET", base+"/v1/streams", nil, "s2-basin: Bad_Basin")
	wantError(t, r, http.StatusBadRequest, "bad_header")
	r = do(t, "GET", base+"/v1/streams/s/records?seq_num=abc", nil, basinHdr)
	wantError(t, r, http.StatusBadRequest, "bad_query")
	r = do(t, "GET", base+"/v1/streams/s/records?seq_num=1&tail_offset=1", nil, basinHdr)
	wantError(t, r, http.StatusUnprocessableEntity, "invalid")
	r = do(t, "POST", base+"/v1/basins", []byte(`{"basin":"short"}`))
	wantError(t, r, http.StatusBadRequest, "bad_json")
	r = do(t, "POST", base+"/v1/basins", []byte(`{"basin":"`+testBasin+`"}`))
	wantError(t, r, http.StatusConflict, "resource_already_exists")
	r = do(t, "POST", base+"/v1/streams", []byte(`{"stream":".."}`), basinHdr)
	wantError(t, r, http.StatusBadRequest, "bad_json")
	r = do(t, "POST", base+"/v1/streams", []byte(`{"stream":"s"}`), basinHdr)
	wantError(t, r, http.StatusConflict, "resource_already_exists")
	r = do(t, "GET", base+"/v1/streams/..", nil, basinHdr)
	wantError(t, r, http.StatusBadRequest, "bad_path")
	r = do(t, "GET", base+"/v1/streams/"+strings.Repeat("x", 513), nil, basinHdr)
	wantError(t, r, http.StatusBadRequest, "bad_path")

	// A request token makes a repeated create idempotent.
	for i, want := range []string{"created", "noop"} {
		r = do(t, "POST", base+"/v1/streams", []byte(`{"stream":"tok"}`), basinHdr, "s2-request-token: abc")
		if r.status != http.StatusCreated || r.header.Get("s2-provision-result") != want {
			t.Fatalf("create %d with token: %d %s %s", i, r.status, r.header.Get("s2-provision-result"), r.body)
		}
	}

	// Read beyond the tail: 416 with the tail.
	r = do(t, "GET", base+"/v1/streams/s/records?seq_num=5000", nil, basinHdr)
	if r.status != http.StatusRequestedRangeNotSatisfiable {
		t.Fatalf("beyond tail: %d %s", r.status, r.body)
	}
	if tail := r.json(t)["tail"].(map[string]any); tail["seq_num"] != 1002.0 || tail["timestamp"].(float64) <= 0 {
		t.Fatalf("416 body %s", r.body)
	}
	// A response holds at most 1000 records.
	if b := readJSON(t, base, "seq_num=0"); len(b.Records) != 1000 || b.Tail != nil {
		t.Fatalf("read: %d records, tail %v", len(b.Records), b.Tail)
	}
	// ... and at most 1 MiB: the two 512 KiB records do not fit with
	// anything else.
	if b := readJSON(t, base, "seq_num=999"); len(b.Records) != 2 {
		t.Fatalf("read from 999: %d records", len(b.Records))
	}
	if b := readJSON(t, base, "seq_num=1001&clamp=true&count=0"); len(b.Records) != 0 {
		t.Fatalf("count 0: %d records", len(b.Records))
	}
	wantError(t, do(t, "DELETE", base+"/v1/streams/s/records", nil, basinHdr), http.StatusMethodNotAllowed, "bad_path")
}

func TestHTTPSSE(t *testing.T) {
	base := rawSetup(t, s2local.Options{})
	for i := range 3 {
		r := do(t, "POST", base+"/v1/streams/s/records", fmt.Appendf(nil, `{"records":[{"body":"r%d"},{"body":"q%d"}]}`, i, i), basinHdr)
		if r.status != http.StatusOK {
			t.Fatal(r.status)
		}
	}
	// Bounded: catches up and ends with [DONE].
	r := do(t, "GET", base+"/v1/streams/s/records?seq_num=1&count=4", nil, basinHdr, "Accept: text/event-stream")
	if r.status != http.StatusOK || r.header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("sse: %d %s", r.status, r.body)
	}
	events := parseSSE(t, string(r.body))
	if len(events) != 2 || events[0].event != "batch" || events[0].id != "4,4,40" || events[1].data != "[DONE]" {
		t.Fatalf("events %+v", events)
	}
	var b jsonBatch
	if err := json.Unmarshal([]byte(events[0].data), &b); err != nil || len(b.Records) != 4 || b.Records[0].Body != "q0" {
		t.Fatalf("batch %s: %v", events[0].data, err)
	}

	// Following: a ping when caught up, then live batches.
	req, _ := http.NewRequest("GET", base+"/v1/streams/s/records?seq_num=6", nil)
	req.Header.Set("s2-basin", testBasin)
	req.Header.Set("Accept", "text/event-stream")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	next := func() sseEvent {
		var e sseEvent
		for sc.Scan() {
			line := sc.Text()
			if line == "" {
				return e
			}
			k, v, _ := strings.Cut(line, ": ")
			switch k {
			case "event":
				e.event = v
			case "id":
				e.id = v
			case "data":
				e.data = v
			}
		}
		t.Fatalf("stream ended: %v", sc.Err())
		return e
	}
	if e := next(); e.event != "ping" || !strings.Contains(e.data, `"tail":{"seq_num":6`) {
		t.Fatalf("first event %+v", e)
	}
	do(t, "POST", base+"/v1/streams/s/records", []byte(`{"records":[{"body":"live"}]}`), basinHdr)
	if e := next(); e.event != "batch" || !strings.Contains(e.data, `"body":"live"`) || !strings.HasPrefix(e.id, "6,1,") {
		t.Fatalf("live event %+v", e)
	}
}

type sseEvent struct{ event, id, data string }

func parseSSE(t *testing.T, s string) []sseEvent {
	var out []sseEvent
	for _, block := range strings.Split(strings.TrimSpace(s), "\n\n") {
		var e sseEvent
		for _, line := range strings.Split(block, "\n") {
			k, v, _ := strings.Cut(line, ": ")
			switch k {
			case "event":
				e.event = v
			case "id":
				e.id = v
			case "data":
				e.data = v
			}
		}
		out = append(out, e)
	}
	return out
}

// TestHTTPProtobuf: the protobuf bodies are exactly s2.proto's messages.
func TestHTTPProtobuf(t *testing.T) {
	base := rawSetup(t, s2local.Options{})
	ts := uint64(time.Now().Add(-time.Minute).UnixMilli())
	in := &s2pb.AppendInput{Records: []*s2pb.AppendRecord{
		{Timestamp: &ts, Headers: []*s2pb.Header{{Name: []byte("a"), Value: []byte("1")}, {Name: []byte("b")}}, Body: []byte("body")},
		{},
	}}
	body, _ := proto.Marshal(in)
	r := do(t, "POST", base+"/v1/streams/s/records", body, basinHdr, "Content-Type: application/protobuf", "Accept: application/protobuf")
	if r.status != http.StatusOK || r.header.Get("Content-Type") != "application/protobuf" {
		t.Fatalf("append: %d %s", r.status, r.body)
	}
	var ack s2pb.AppendAck
	if err := proto.Unmarshal(r.body, &ack); err != nil || ack.GetStart().GetSeqNum() != 0 || ack.GetEnd().GetSeqNum() != 2 || ack.GetStart().GetTimestamp() != ts {
		t.Fatalf("ack %v %v", &ack, err)
	}
	r = do(t, "GET", base+"/v1/streams/s/records?seq_num=0", nil, basinHdr, "Accept: application/protobuf")
	var batch s2pb.ReadBatch
	if err := proto.Unmarshal(r.body, &batch); err != nil || len(batch.Records) != 2 || batch.Tail.GetSeqNum() != 2 {
		t.Fatalf("read %v %v", &batch, err)
	}
	got := batch.Records[0]
	want := &s2pb.SequencedRecord{SeqNum: 0, Timestamp: ts, Headers: in.Records[0].Headers, Body: []byte("body")}
	if !proto.Equal(got, want) {
		t.Fatalf("record %v, want %v", got, want)
	}
	if !bytes.Equal(batch.Records[1].Body, nil) || batch.Records[1].SeqNum != 1 {
		t.Fatalf("record 1 %v", batch.Records[1])
	}
}
