package capture_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"sort"
	"strconv"
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
	// capture is the one run started last.
	capture *capture.Capture
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
		capture.WithLogger(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slogLevel()})))}, e.opts...)
	c := capture.New(e.cfg, e.js, opts...)
	e.capture = c
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

// got is one stored change: an entry of a changes-stream message.
type got struct {
	Subject string
	Seq     uint64 // of its message
	// Header holds the message's headers, with the entry's fields as the
	// headers a change would carry alone: Pgs2-Msg-Id (its key),
	// Pgs2-Group, traceparent and Pgs2-Error.
	Header nats.Header
	Raw    []byte
	Msg    change.Message
	Entry  bus.Entry
}

// waitMessages reads the changes stream until it holds n changes, and
// fails the test if more than n arrive within a short grace period.
func (e *env) waitMessages(t *testing.T, n int) []got {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		msgs := e.readAll(t)
		if len(msgs) >= n {
			if len(msgs) > n {
				t.Fatalf("stream holds %d changes, want %d", len(msgs), n)
			}
			return msgs
		}
		if time.Now().After(deadline) {
			t.Fatalf("stream holds %d changes after 60s, want %d", len(msgs), n)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// readAll returns every change of the changes stream in commit order. It
// fails the test when a subject's changes are out of commit order in the
// stream (a group's order is its subject's) or a change is there twice.
func (e *env) readAll(t *testing.T) []got {
	t.Helper()
	return readChanges(t, e.js, e.cfg.Stream.Name)
}

func readChanges(t *testing.T, js jetstream.JetStream, name string) []got {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	s, err := js.Stream(ctx, name)
	if err != nil {
		return nil
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Msgs == 0 {
		return nil
	}
	var out []got
	lastOf := map[string]change.Position{}
	seen := map[string]uint64{}
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq; seq++ {
		m, err := s.GetMsg(ctx, seq)
		if err != nil {
			t.Fatalf("message %d: %v", seq, err)
		}
		r := bus.NewBatchReader(m.Data)
		var en bus.Entry
		n := 0
		for r.Next(&en) {
			n++
			g := got{Subject: m.Subject, Seq: seq, Header: nats.Header{}, Raw: bytes.Clone(en.Body)}
			for k, v := range m.Header {
				g.Header[k] = v
			}
			g.Entry = bus.Entry{Key: bytes.Clone(en.Key), Group: bytes.Clone(en.Group), Action: bytes.Clone(en.Action), Table: bytes.Clone(en.Table),
				Schema: bytes.Clone(en.Schema), CommitMs: en.CommitMs, TraceParent: bytes.Clone(en.TraceParent), Error: bytes.Clone(en.Error), Body: g.Raw,
				Sink: bytes.Clone(en.Sink), Backfill: bytes.Clone(en.Backfill), BackfillLast: en.BackfillLast}
			g.Header.Set(bus.HeaderID, string(en.Key))
			g.Header.Set(bus.HeaderGroup, string(en.Group))
			g.Header.Del(bus.HeaderTraceParent)
			if len(en.TraceParent) > 0 {
				g.Header.Set(bus.HeaderTraceParent, string(en.TraceParent))
			}
			if len(en.Error) > 0 {
				g.Header.Set(bus.HeaderError, string(en.Error))
			}
			if err := json.Unmarshal(en.Body, &g.Msg); err != nil {
				t.Fatalf("a change in message %d is not valid JSON: %v\n%s", seq, err, en.Body)
			}
			pos, err := change.ParseKey(string(en.Key))
			if err != nil {
				t.Fatalf("message %d: %v", seq, err)
			}
			if prev, ok := lastOf[g.Subject]; ok && !prev.Less(pos) {
				t.Errorf("subject %s: change %s after %s in the stream (out of commit order, or twice)", g.Subject, pos, prev)
			}
			lastOf[g.Subject] = pos
			if s := seen[string(en.Key)]; s != 0 {
				t.Errorf("change %s in messages %d and %d", pos, s, seq)
			}
			seen[string(en.Key)] = seq
			out = append(out, g)
		}
		if r.Err() != nil {
			t.Fatalf("message %d: %v", seq, r.Err())
		}
		if m.Header.Get(bus.HeaderEntries) != strconv.Itoa(n) || m.Header.Get(bus.HeaderID) != string(en.Key) {
			t.Errorf("message %d: %s %q and Pgs2-Msg-Id %q, with %d changes, the last %s", seq, bus.HeaderEntries,
				m.Header.Get(bus.HeaderEntries), m.Header.Get(bus.HeaderID), n, en.Key)
		}
	}
	sort.SliceStable(out, func(i, j int) bool {
		pi, _ := change.ParseKey(string(out[i].Entry.Key))
		pj, _ := change.ParseKey(string(out[j].Entry.Key))
		return pi.Less(pj)
	})
	return out
}

func slogLevel() slog.Level {
	if os.Getenv("PGS2_TEST_LOG") != "" {
		return slog.LevelInfo
	}
	return slog.LevelWarn
}
