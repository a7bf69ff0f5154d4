package capture_test

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/capture"
	"github.com/pgs2/pgs2/pkg/change"
	"github.com/pgs2/pgs2/pkg/health"
	"github.com/pgs2/pgs2/pkg/natstest"
	"github.com/pgs2/pgs2/pkg/pgrepl"
	"github.com/pgs2/pgs2/pkg/pgtest"
)

// env is a real Postgres and a real JetStream for one test.
type env struct {
	pg   *pgtest.Instance
	ns   *natstest.Server
	nc   *nats.Conn
	js   jetstream.JetStream
	cfg  capture.Config
	opts []capture.Option
}

func newEnv(t *testing.T, setupSQL string, tables ...string) *env {
	t.Helper()
	e := &env{pg: pgtest.New(t), ns: natstest.New(t)}
	e.pg.MustExec(t, "postgres", "CREATE DATABASE app")
	if setupSQL != "" {
		e.pg.MustExec(t, "app", setupSQL)
	}
	nc, err := nats.Connect(e.ns.URL(), nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	e.nc = nc
	e.js, _ = jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(8192))
	e.cfg = capture.Config{
		Source: "app",
		Repl:   pgrepl.Config{DSN: e.pg.DSN("app"), Slot: "pgs2", Publication: "pgs2", Tables: tables},
		Stream: bus.ChangesStreamConfig{Name: "PGS2_CHANGES", Source: "app", Replicas: 1,
			DuplicateWindow: 2 * time.Minute},
		Partitions:     8,
		StatusInterval: 100 * time.Millisecond,
	}
	return e
}

// run starts capture in this process; the returned func stops it and
// returns Run's error.
func (e *env) run(t *testing.T) func() error {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	state := health.NewState()
	opts := append([]capture.Option{capture.WithHealth(state),
		capture.WithLogger(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))}, e.opts...)
	c := capture.New(e.cfg, e.js, opts...)
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	for ready := false; !ready; {
		select {
		case err := <-done:
			cancel()
			t.Fatalf("capture ended before it was ready: %v", err)
		case <-time.After(20 * time.Millisecond):
		}
		ready, _ = state.Ready()
	}
	stopped := false
	stop := func() error {
		if stopped {
			return nil
		}
		stopped = true
		cancel()
		select {
		case err := <-done:
			return err
		case <-time.After(60 * time.Second):
			return fmt.Errorf("capture did not stop within 60s")
		}
	}
	t.Cleanup(func() { _ = stop() })
	return stop
}

// got is one stored change.
type got struct {
	Subject string
	Seq     uint64
	Header  nats.Header
	Raw     []byte
	Msg     change.Message
}

// waitMessages reads the changes stream until it holds n messages, and
// fails the test if more than n arrive within a short grace period.
func (e *env) waitMessages(t *testing.T, n int) []got {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		msgs := e.readAll(t)
		if len(msgs) >= n {
			if len(msgs) > n {
				t.Fatalf("stream holds %d messages, want %d", len(msgs), n)
			}
			return msgs
		}
		if time.Now().After(deadline) {
			t.Fatalf("stream holds %d messages after 60s, want %d", len(msgs), n)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// readAll returns every message of the changes stream in stream order.
func (e *env) readAll(t *testing.T) []got {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	s, err := e.js.Stream(ctx, e.cfg.Stream.Name)
	if err != nil {
		return nil
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	total := info.State.Msgs
	if total == 0 {
		return nil
	}
	cons, err := s.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	out := make([]got, 0, total)
	for uint64(len(out)) < total {
		batch, err := cons.Fetch(int(min(total-uint64(len(out)), 1000)), jetstream.FetchMaxWait(10*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		for m := range batch.Messages() {
			md, _ := m.Metadata()
			g := got{Subject: m.Subject(), Seq: md.Sequence.Stream, Header: m.Headers(), Raw: m.Data()}
			if err := json.Unmarshal(m.Data(), &g.Msg); err != nil {
				t.Fatalf("message %d is not valid JSON: %v\n%s", g.Seq, err, m.Data())
			}
			out = append(out, g)
		}
		if batch.Error() != nil {
			t.Fatal(batch.Error())
		}
	}
	return out
}
