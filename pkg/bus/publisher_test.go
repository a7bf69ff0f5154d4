package bus_test

import (
	"context"
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
	p, err := bus.NewPublisher(nc, "", 100, bus.PublisherOptions{Window: 16})
	if err != nil {
		t.Fatal(err)
	}
	subj := bus.NewChangeSubjects("app", 4)
	for tx := 1; tx <= 50; tx++ {
		for i := 0; i < tx%7+1; i++ {
			pos := change.Position{LSN: uint64(1000 + tx), Idx: i}
			g := []byte{byte(i)}
			if err := p.Publish(ctx, subj.Subject("public", "t", g), pos.Key(), []byte(`{}`)); err != nil {
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

// TestPublisherRefusesGap: a publisher whose predecessor key is not the
// stream's last message fails instead of storing out of order, and
// confirms nothing after the failure.
func TestPublisherRefusesGap(t *testing.T) {
	_, nc, s := setup(t)
	ctx := context.Background()
	p, _ := bus.NewPublisher(nc, "", 0, bus.PublisherOptions{})
	first := change.Position{LSN: 10, Idx: 0}
	if err := p.Publish(ctx, "pgs2.changes.app.public.t.0", first.Key(), []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	p.Mark(11)
	if err := p.Close(ctx); err != nil {
		t.Fatal(err)
	}
	// A second publisher that believes another key was last (a lost message).
	lost := change.Position{LSN: 20, Idx: 0}
	p2, _ := bus.NewPublisher(nc, lost.Key(), 11, bus.PublisherOptions{})
	next := change.Position{LSN: 30, Idx: 0}
	_ = p2.Publish(ctx, "pgs2.changes.app.public.t.0", next.Key(), []byte(`{}`))
	p2.Mark(31)
	err := p2.Close(ctx)
	if err == nil || !strings.Contains(err.Error(), "last msg") {
		t.Fatalf("Close = %v, want a wrong-last-msg-id refusal", err)
	}
	if p2.Acked() != 11 {
		t.Fatalf("confirmed %d after a failure, want 11", p2.Acked())
	}
	if id := lastID(t, s); id != first.Key() {
		t.Fatalf("the stream's last message id %q, want the first change's key %q", id, first.Key())
	}
}

// lastID is the Nats-Msg-Id of the stream's last message.
func lastID(t *testing.T, s jetstream.Stream) string {
	t.Helper()
	m, err := s.GetLastMsgForSubject(context.Background(), bus.ChangesFilter("app"))
	if err != nil {
		t.Fatal(err)
	}
	return m.Header.Get(bus.HeaderMsgID)
}

func TestPublisherFailsOnDisconnect(t *testing.T) {
	ns, nc, _ := setup(t)
	ctx := context.Background()
	p, _ := bus.NewPublisher(nc, "", 0, bus.PublisherOptions{})
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
	p, _ := bus.NewPublisher(nc, "", 0, bus.PublisherOptions{})
	_ = p.Publish(ctx, "pgs2.nostream.x", "k", []byte("x"))
	err := p.Close(ctx)
	if err == nil || !strings.Contains(err.Error(), "no responders") {
		t.Fatalf("Close = %v, want no responders", err)
	}
}
