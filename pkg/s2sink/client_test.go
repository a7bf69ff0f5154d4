package s2sink

import (
	"context"
	"errors"
	"fmt"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/s2-streamstore/s2-sdk-go/s2"

	"github.com/pgs2/pgs2/pkg/config"
	"github.com/pgs2/pgs2/pkg/pgtest"
	"github.com/pgs2/pgs2/pkg/s2local"
)

const basin = "test-basin"

// local starts an in-memory s2local with a basin and returns its URL.
func local(t *testing.T, o s2local.Options) (*s2local.Server, string) {
	t.Helper()
	srv, err := s2local.New(o)
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(srv)
	t.Cleanup(func() { hs.Close(); srv.Close() })
	c, err := New(Config{Endpoint: hs.URL, Token: o.Token})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.SDK().Basins.Create(context.Background(), s2.CreateBasinArgs{Basin: basin}); err != nil {
		t.Fatalf("create basin: %v", err)
	}
	return srv, hs.URL
}

func batchOf(t *testing.T, n int) *Batch {
	t.Helper()
	b := NewBatch(0, 0)
	for i := 0; i < n; i++ {
		if err := b.Add(s2.AppendRecord{Headers: []s2.Header{s2.NewHeader("idempotency-key", fmt.Sprint(i))}, Body: []byte(`{"i":1}`)}); err != nil {
			t.Fatal(err)
		}
	}
	return b
}

func TestAppendAndMatchSeqNum(t *testing.T) {
	_, url := local(t, s2local.Options{})
	c, _ := New(Config{Endpoint: url})
	ctx := context.Background()
	if err := c.CreateStream(ctx, basin, "users"); err != nil {
		t.Fatal(err)
	}
	if err := c.CreateStream(ctx, basin, "users"); err != nil {
		t.Fatalf("CreateStream of an existing stream: %v", err)
	}
	ack, err := c.Append(ctx, basin, "users", batchOf(t, 3), nil)
	if err != nil || ack.Start != 0 || ack.End != 3 {
		t.Fatalf("Append = %+v, %v", ack, err)
	}
	three := uint64(3)
	if _, err := c.Append(ctx, basin, "users", batchOf(t, 2), &three); err != nil {
		t.Fatalf("Append with match_seq_num 3: %v", err)
	}
	_, err = c.Append(ctx, basin, "users", batchOf(t, 2), &three)
	e := Classify(err)
	if e == nil || e.Class != SeqNumMismatch || e.Tail != 5 || e.Status != 412 {
		t.Fatalf("repeated match_seq_num 3: %v (%+v), want SeqNumMismatch with tail 5", err, e)
	}
	if tail, err := c.Tail(ctx, basin, "users"); err != nil || tail != 5 {
		t.Fatalf("Tail = %d, %v", tail, err)
	}
}

func TestFailureClasses(t *testing.T) {
	srv, url := local(t, s2local.Options{Token: "s3cret-token"})
	ctx := context.Background()
	good, _ := New(Config{Endpoint: url, Token: "s3cret-token"})
	if err := good.CreateStream(ctx, basin, "users"); err != nil {
		t.Fatal(err)
	}

	bad, _ := New(Config{Endpoint: url, Token: "wrong-token"})
	_, err := bad.Append(ctx, basin, "users", batchOf(t, 1), nil)
	if e := Classify(err); e == nil || e.Class != RetryUntilFixed || e.Status != 401 || e.Code != "authn" {
		t.Errorf("bad token: %v", err)
	}
	if strings.Contains(fmt.Sprint(err), "s3cret") || strings.Contains(fmt.Sprint(err), "wrong-token") {
		t.Errorf("error shows a token: %v", err)
	}

	_, err = good.Append(ctx, basin, "missing", batchOf(t, 1), nil)
	if e := Classify(err); e == nil || e.Class != RetryUntilFixed || e.Status != 404 || e.Code != "stream_not_found" {
		t.Errorf("missing stream: %v", err)
	}

	// Over S2's limits (bypassing the batch builder): refused before sending.
	over := &Batch{records: make([]s2.AppendRecord, 1001)}
	for i := range over.records {
		over.records[i] = s2.AppendRecord{Body: []byte("x")}
	}
	_, err = good.Append(ctx, basin, "users", over, nil)
	if e := Classify(err); e == nil || e.Class != RetryUntilFixed || e.Code != "validation" {
		t.Errorf("1001 records: %v", err)
	}

	// 429 with retry-after-ms.
	if err := srv.SetFaults(s2local.FaultConfig{Rules: []s2local.FaultRule{{Stream: "users", AppendsOnly: true, ErrorRate: 1, Statuses: []int{429}, RetryAfterMS: 750}}}); err != nil {
		t.Fatal(err)
	}
	_, err = good.Append(ctx, basin, "users", batchOf(t, 1), nil)
	if e := Classify(err); e == nil || e.Class != RetrySoon || e.Status != 429 || e.RetryAfter != 750*time.Millisecond || e.MayHaveTakenEffect {
		t.Errorf("429: %v (%+v)", err, e)
	}

	// 504 after the append took effect: match_seq_num tells that it landed.
	if err := srv.SetFaults(s2local.FaultConfig{Rules: []s2local.FaultRule{{Stream: "users", AppendsOnly: true, ErrorRate: 1, Statuses: []int{504}}}}); err != nil {
		t.Fatal(err)
	}
	tail, _ := good.Tail(ctx, basin, "users")
	_, err = good.Append(ctx, basin, "users", batchOf(t, 4), &tail)
	if e := Classify(err); e == nil || e.Class != RetrySoon || e.Status != 504 || !e.MayHaveTakenEffect {
		t.Errorf("504: %v", err)
	}
	_ = srv.SetFaults(s2local.FaultConfig{})
	_, err = good.Append(ctx, basin, "users", batchOf(t, 4), &tail)
	if e := Classify(err); e == nil || e.Class != SeqNumMismatch || e.Tail != tail+4 {
		t.Errorf("retry after a 504 that took effect: %v, want a mismatch at tail+4 (the first attempt landed)", err)
	}
}

func TestNetworkError(t *testing.T) {
	port, _ := pgtest.FreePort()
	c, _ := New(Config{Endpoint: fmt.Sprintf("http://127.0.0.1:%d", port), RequestTimeout: 2 * time.Second})
	_, err := c.Append(context.Background(), basin, "users", batchOf(t, 1), nil)
	e := Classify(err)
	if e == nil || e.Class != RetrySoon || e.Status != 0 || !e.MayHaveTakenEffect {
		t.Fatalf("unreachable endpoint: %v (%+v)", err, e)
	}
	var se *s2.S2Error
	_ = errors.As(err, &se)
}

func TestFromSink(t *testing.T) {
	t.Setenv("MY_S2_TOKEN", "tok")
	c := FromSink(config.Sink{Endpoint: "http://127.0.0.1:8089", AccessTokenEnv: "MY_S2_TOKEN"})
	if c.Endpoint != "http://127.0.0.1:8089" || c.Token != "tok" {
		t.Fatalf("FromSink = %+v", c)
	}
	if _, err := New(FromSink(config.Sink{AccessTokenEnv: "UNSET_TOKEN_VAR"})); !errors.Is(err, ErrNoToken) {
		t.Fatalf("cloud sink without a token: %v", err)
	}
}

func TestFence(t *testing.T) {
	_, url := local(t, s2local.Options{})
	c, _ := New(Config{Endpoint: url})
	ctx := context.Background()
	_ = c.CreateStream(ctx, basin, "f")
	tail, err := c.Fence(ctx, basin, "f", "worker-a")
	if err != nil || tail != 1 {
		t.Fatalf("Fence = %d, %v", tail, err)
	}
	a, b := "worker-a", "worker-b"
	if _, err := c.AppendFenced(ctx, basin, "f", batchOf(t, 1), nil, &a); err != nil {
		t.Fatalf("the fencing writer: %v", err)
	}
	if _, err := c.Fence(ctx, basin, "f", b); err != nil {
		t.Fatal(err)
	}
	_, err = c.AppendFenced(ctx, basin, "f", batchOf(t, 1), nil, &a)
	if e := Classify(err); e == nil || e.Class != FencingMismatch {
		t.Fatalf("the fenced-out writer: %v, want FencingMismatch", err)
	}
}
