package s2sink

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"testing"

	"github.com/s2-streamstore/s2-sdk-go/s2"

	"github.com/pgs2/pgs2/pkg/bus"
)

func rec(body int, headers ...string) s2.AppendRecord {
	r := s2.AppendRecord{Body: bytes.Repeat([]byte("x"), body)}
	for i := 0; i+1 < len(headers); i += 2 {
		r.Headers = append(r.Headers, s2.NewHeader(headers[i], headers[i+1]))
	}
	return r
}

func TestMeteredSize(t *testing.T) {
	r := rec(100, "idempotency-key", "MTox", "action", "insert")
	want := 8 + 2*2 + len("idempotency-key") + 4 + len("action") + len("insert") + 100
	if got := MeteredSize(r.Headers, r.Body); got != want {
		t.Fatalf("MeteredSize = %d, want %d", got, want)
	}
}

func TestBatchLimits(t *testing.T) {
	b := NewBatch(0, 0)
	for i := 0; i < MaxBatchRecords; i++ {
		if err := b.Add(rec(10)); err != nil {
			t.Fatalf("record %d: %v", i, err)
		}
	}
	if err := b.Add(rec(10)); !errors.Is(err, ErrBatchFull) {
		t.Fatalf("record 1001: %v, want ErrBatchFull", err)
	}
	b.Reset()
	if b.Len() != 0 || b.Bytes() != 0 {
		t.Fatal("Reset left records")
	}
	// Bytes: two half-MiB records do not fit together.
	half := MaxBatchBytes/2 - 8
	if err := b.Add(rec(half)); err != nil {
		t.Fatal(err)
	}
	if err := b.Add(rec(half + 1)); !errors.Is(err, ErrBatchFull) {
		t.Fatalf("over 1 MiB: %v, want ErrBatchFull", err)
	}
	// A record of exactly 1 MiB metered fits alone; one byte more never fits.
	b.Reset()
	if err := b.Add(rec(MaxBatchBytes - 8)); err != nil {
		t.Fatalf("exactly 1 MiB: %v", err)
	}
	b.Reset()
	if err := b.Add(rec(MaxBatchBytes - 7)); !errors.Is(err, ErrRecordTooLarge) {
		t.Fatalf("1 MiB + 1: %v, want ErrRecordTooLarge", err)
	}
	// A configured smaller batch.
	small := NewBatch(2, 100)
	_ = small.Add(rec(50))
	if err := small.Add(rec(50)); !errors.Is(err, ErrBatchFull) {
		t.Fatalf("max_bytes 100: %v", err)
	}
	// A record larger than max_bytes but within S2's limit goes alone.
	small.Reset()
	if err := small.Add(rec(500)); err != nil {
		t.Fatalf("a big record alone in a small batch: %v", err)
	}
}

func TestClassify(t *testing.T) {
	for _, c := range []struct {
		err    error
		class  Class
		status int
		effect bool
	}{
		{&s2.S2Error{Status: 429, Code: "rate_limited", Origin: "server"}, RetrySoon, 429, false},
		{&s2.S2Error{Status: 503, Code: "unavailable", Origin: "server"}, RetrySoon, 503, true},
		{&s2.S2Error{Status: 504, Code: "upstream_timeout", Origin: "server"}, RetrySoon, 504, true},
		{&s2.S2Error{Status: 502, Code: "hot_server", Origin: "server"}, RetrySoon, 502, false},
		{&s2.S2Error{Status: 408, Code: "request_timeout", Origin: "server"}, RetrySoon, 408, true},
		{&s2.S2Error{Status: 401, Code: "authn", Origin: "server"}, RetryUntilFixed, 401, false},
		{&s2.S2Error{Status: 403, Code: "permission_denied", Origin: "server"}, RetryUntilFixed, 403, false},
		{&s2.S2Error{Status: 404, Code: "stream_not_found", Origin: "server"}, RetryUntilFixed, 404, false},
		{&s2.S2Error{Status: 422, Code: "invalid", Origin: "server"}, RetryUntilFixed, 422, false},
		{&s2.S2Error{Status: 413, Message: "payload too large", Origin: "server"}, RetryUntilFixed, 413, false},
		{fmt.Errorf("post: %w", &net.OpError{Op: "dial", Err: errors.New("connection refused")}), RetrySoon, 0, true},
		{context.DeadlineExceeded, RetrySoon, 0, true},
	} {
		e := classify("append", c.err, 0)
		if e.Class != c.class || e.Status != c.status || e.MayHaveTakenEffect != c.effect {
			t.Errorf("%v: class %s status %d effect %v, want %s %d %v", c.err, e.Class, e.Status, e.MayHaveTakenEffect, c.class, c.status, c.effect)
		}
		if Classify(fmt.Errorf("wrapped: %w", e)) != e {
			t.Errorf("Classify does not unwrap")
		}
	}
}

func TestNoTokenForCloud(t *testing.T) {
	if _, err := New(Config{}); !errors.Is(err, ErrNoToken) {
		t.Fatalf("New without token for the cloud: %v", err)
	}
	if _, err := New(Config{Endpoint: "http://127.0.0.1:1"}); err != nil {
		t.Fatalf("local endpoint without token: %v", err)
	}
}

func TestRecord(t *testing.T) {
	e := &bus.Entry{Key: []byte("MjQwMjMxMjg6MA=="), Action: []byte("update"), Table: []byte("public.users"), CommitMs: 1795341600123}
	r := Record(e, []byte(`{}`), bus.DeliveryPos{Stream: "A@1", Seq: 42, Idx: 7})
	got := map[string]string{}
	for _, hd := range r.Headers {
		got[string(hd.Name)] = string(hd.Value)
	}
	if got["idempotency-key"] != "MjQwMjMxMjg6MA==" || got["action"] != "update" || got["table"] != "public.users" || got["pgs2-seq"] != "A@1:42.7" {
		t.Fatalf("headers %v", got)
	}
	if r.Timestamp == nil || *r.Timestamp != 1795341600123 {
		t.Fatalf("timestamp %v, want the commit time in ms", r.Timestamp)
	}
	if _, ok := got["pgs2-backfill"]; ok {
		t.Fatal("a change from the WAL has a pgs2-backfill header")
	}
	e.Action, e.Backfill = []byte("read"), []byte("bf-7")
	r = Record(e, []byte(`{}`), bus.DeliveryPos{Stream: "A@1", Seq: 43})
	if h := r.Headers[len(r.Headers)-1]; string(h.Name) != "pgs2-backfill" || string(h.Value) != "bf-7" {
		t.Fatalf("a read's last header is %s=%s, want pgs2-backfill=bf-7", h.Name, h.Value)
	}
	e.BackfillLast = true
	r = Record(e, []byte(`{}`), bus.DeliveryPos{Stream: "A@1", Seq: 44})
	if h := r.Headers[len(r.Headers)-1]; string(h.Name) != "pgs2-backfill-last" || string(h.Value) != "true" {
		t.Fatalf("a table's last read ends with header %s=%s, want pgs2-backfill-last=true", h.Name, h.Value)
	}
}

// TestSealKeepsItsRoom: a batch that reserved room takes the resume
// headers on its last record without passing S2's limits, and refuses a
// record that would leave no room.
func TestSealKeepsItsRoom(t *testing.T) {
	through := bus.Progress{"A@1": {Stream: "A@1", Seq: 99999, Idx: 12}, "B@2": {Stream: "B@2", Seq: 7}}
	room := ResumeRoom([]string{"A@1", "B@2"}, 0)
	b := NewBatch(0, 0)
	b.Reserve(room)
	body := make([]byte, MaxBatchBytes/2)
	if err := b.Add(s2.AppendRecord{Body: body}); err != nil {
		t.Fatal(err)
	}
	if err := b.Add(s2.AppendRecord{Body: body}); !errors.Is(err, ErrBatchFull) {
		t.Fatalf("Add = %v, want ErrBatchFull: no room left for the headers", err)
	}
	if err := b.Seal(ThroughHeader(through)); err != nil {
		t.Fatal(err)
	}
	if b.Bytes() > MaxBatchBytes || b.Bytes() != MeteredSize(b.Records()[0].Headers, body) {
		t.Fatalf("sealed batch meters %d", b.Bytes())
	}
	one := NewBatch(0, 0)
	one.Reserve(room)
	if err := one.Add(s2.AppendRecord{Body: make([]byte, MaxBatchBytes-8)}); !errors.Is(err, ErrRecordTooLarge) {
		t.Fatalf("Add = %v, want ErrRecordTooLarge: it would not fit with the headers", err)
	}
}
