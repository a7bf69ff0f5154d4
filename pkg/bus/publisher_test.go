package bus_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/change"
	"github.com/pgs2/pgs2/pkg/natstest"
)

func setup(t *testing.T) (*natstest.Server, *nats.Conn, jetstream.Stream) {
	t.Helper()
	ns := natstest.New(t)
	nc, err := nats.Connect(ns.URL(), nats.ReconnectBufSize(-1), nats.ReconnectWait(50*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, _ := jetstream.New(nc)
	s, err := bus.EnsureChangesStream(context.Background(), js, bus.ChangesStreamConfig{
		Name: "PGS2_CHANGES", Source: "app", Replicas: 1, DuplicateWindow: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	return ns, nc, s
}

func TestPublisherConfirmsWholeTransactions(t *testing.T) {
	_, nc, s := setup(t)
	ctx := context.Background()
	p, err := bus.NewPublisher(nc, 0, 100, bus.PublisherOptions{Window: 16})
	if err != nil {
		t.Fatal(err)
	}
	subj := bus.NewChangeSubjects("app", 4)
	for tx := 1; tx <= 50; tx++ {
		for i := 0; i < tx%7+1; i++ {
			pos := change.Position{LSN: uint64(1000 + tx), Idx: i}
			g := []byte{byte(i)}
			if err := p.Publish(ctx, subj.Subject(g), pos.Key(), []byte(`{}`)); err != nil {
				t.Fatal(err)
			}
		}
		p.Mark(uint64(2000 + tx))
	}
	if err := p.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if got := p.Acked(); got != 2050 {
		t.Fatalf("Confirmed = %d, want the last transaction's end 2050", got)
	}
	if id, want := lastID(t, s), (change.Position{LSN: 1050, Idx: 50 % 7}).Key(); id != want {
		t.Fatalf("the stream's last message id %q, want the last change's key %q", id, want)
	}
	p.MarkIdle(3000)
	if p.Acked() != 3000 {
		t.Fatalf("idle confirm: %d", p.Acked())
	}
}

// TestPublisherRefusesGap: a publisher whose predecessor is not the
// stream's last message fails instead of storing out of order, and
// confirms nothing after the failure.
func TestPublisherRefusesGap(t *testing.T) {
	_, nc, s := setup(t)
	ctx := context.Background()
	p, _ := bus.NewPublisher(nc, 0, 0, bus.PublisherOptions{})
	first := change.Position{LSN: 10, Idx: 0}
	if err := p.Publish(ctx, "pgs2.changes.app.public.t.0", first.Key(), []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	p.Mark(11)
	if err := p.Close(ctx); err != nil {
		t.Fatal(err)
	}
	// A second publisher that believes a message after it was stored (one
	// that was lost).
	p2, _ := bus.NewPublisher(nc, 2, 11, bus.PublisherOptions{})
	next := change.Position{LSN: 30, Idx: 0}
	_ = p2.Publish(ctx, "pgs2.changes.app.public.t.0", next.Key(), []byte(`{}`))
	p2.Mark(31)
	err := p2.Close(ctx)
	if !errors.Is(err, bus.ErrChainBroken) {
		t.Fatalf("Close = %v, want ErrChainBroken", err)
	}
	if p2.Acked() != 11 {
		t.Fatalf("confirmed %d after a failure, want 11", p2.Acked())
	}
	if id := lastID(t, s); id != first.Key() {
		t.Fatalf("the stream's last message id %q, want the first change's key %q", id, first.Key())
	}
}

// lastID is the Pgs2-Msg-Id of the stream's last message.
func lastID(t *testing.T, s jetstream.Stream) string {
	t.Helper()
	m, err := s.GetLastMsgForSubject(context.Background(), bus.ChangesFilter("app"))
	if err != nil {
		t.Fatal(err)
	}
	return m.Header.Get(bus.HeaderID)
}

// TestPublisherRepublishes: a publisher rebuilt after a failure may publish
// again a message equal to a stored one (a router round that now routes
// differently is published whole). It is stored, and the chain goes on:
// with JetStream's deduplication (Nats-Msg-Id) it was acknowledged as a
// duplicate without moving the stream, and the next message broke the
// chain until the duplicate window expired (hole 8).
func TestPublisherRepublishes(t *testing.T) {
	_, nc, s := setup(t)
	ctx := context.Background()
	subject := "pgs2.changes.app.public.t.0"
	for round := 0; round < 3; round++ {
		info, err := s.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		p, _ := bus.NewPublisher(nc, info.State.LastSeq, 0, bus.PublisherOptions{})
		for _, id := range []string{"a", "b"} {
			if err := p.Publish(ctx, subject, id, []byte(id)); err != nil {
				t.Fatal(err)
			}
		}
		if err := p.Close(ctx); err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
	}
	info, _ := s.Info(ctx)
	if info.State.Msgs != 6 || lastID(t, s) != "b" {
		t.Fatalf("the stream holds %d messages, the last %q; want 6, \"b\"", info.State.Msgs, lastID(t, s))
	}
}

func TestPublisherFailsOnDisconnect(t *testing.T) {
	ns, nc, _ := setup(t)
	ctx := context.Background()
	p, _ := bus.NewPublisher(nc, 0, 0, bus.PublisherOptions{})
	ns.Shutdown()
	select {
	case <-p.Failed():
	case <-time.After(10 * time.Second):
		t.Fatal("publisher did not fail when the connection dropped")
	}
	if err := p.Publish(ctx, "pgs2.changes.app.public.t.0", "k", nil); err == nil {
		t.Fatal("Publish after failure succeeded")
	}
	_ = p.Close(ctx)
}

func TestPublisherNoStream(t *testing.T) {
	_, nc, _ := setup(t)
	ctx := context.Background()
	p, _ := bus.NewPublisher(nc, 0, 0, bus.PublisherOptions{})
	_ = p.Publish(ctx, "pgs2.nostream.x", "k", []byte("x"))
	err := p.Close(ctx)
	if err == nil || !strings.Contains(err.Error(), "no responders") {
		t.Fatalf("Close = %v, want no responders", err)
	}
}

// TestResumeAfterTheLastMessageIsDeleted: an operator deleting the
// stream's last message does not stop capture for good: resume reads the
// last message still stored, and the chain goes on from LastSeq.
func TestResumeAfterTheLastMessageIsDeleted(t *testing.T) {
	_, nc, s := setup(t)
	ctx := context.Background()
	p, _ := bus.NewPublisher(nc, 0, 0, bus.PublisherOptions{})
	for i, pos := range []change.Position{{LSN: 10}, {LSN: 20}} {
		p.SetHeader(bus.HeaderRound, "1/1")
		p.SetHeader(bus.HeaderRoundFirst, pos.Key())
		p.SetHeader(bus.HeaderRoundLast, pos.Key())
		if err := p.Publish(ctx, "pgs2.changes.app.public.t.0", pos.Key(), []byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteMsg(ctx, 2); err != nil {
		t.Fatal(err)
	}
	js, _ := jetstream.New(nc)
	r, err := bus.ResumeChanges(ctx, js, "PGS2_CHANGES", "app")
	if err != nil {
		t.Fatal(err)
	}
	if r.LastSeq != 2 || r.LastID != (change.Position{LSN: 10}).Key() {
		t.Fatalf("resume at %d after %q, want 2 after the first change", r.LastSeq, r.LastID)
	}
	p2, _ := bus.NewPublisher(nc, r.LastSeq, 0, bus.PublisherOptions{})
	if err := p2.Publish(ctx, "pgs2.changes.app.public.t.0", "k", nil); err != nil {
		t.Fatal(err)
	}
	if err := p2.Close(ctx); err != nil {
		t.Fatalf("the chain does not go on from LastSeq: %v", err)
	}
}

func TestPermanentErrors(t *testing.T) {
	for _, c := range []struct {
		err  error
		want bool
	}{
		{fmt.Errorf("x: %w", bus.ErrStreamShared), true},
		{&jetstream.APIError{Code: 400, ErrorCode: 10058}, true},
		{&jetstream.APIError{Code: 500, ErrorCode: 10005}, false}, // no suitable peers: a node is down
		{&jetstream.APIError{Code: 503, ErrorCode: 10008}, false},
		{context.DeadlineExceeded, false},
	} {
		if got := bus.Permanent(c.err); got != c.want {
			t.Errorf("Permanent(%v) = %v, want %v", c.err, got, c.want)
		}
	}
}
