package router_test

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/config"
	"github.com/pgs2/pgs2/pkg/health"
	"github.com/pgs2/pgs2/pkg/router"
)

// runOwn runs a router on a connection of its own (closing it is the
// router's SIGKILL, as the server sees it).
func (e *env) runOwn(t *testing.T, sinks []config.Sink) (nc *nats.Conn, state *health.State, stop func()) {
	t.Helper()
	nc, err := nats.Connect(e.ns.URL(), nats.ReconnectBufSize(-1))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, _ := jetstream.New(nc)
	state = health.NewState()
	r, err := router.New(router.Config{Source: "app", ChangesStream: "PGS2_CHANGES",
		Delivery: bus.DeliveryStreamConfig{Name: "PGS2_DELIVERY", Source: "app", Replicas: 1, DuplicateWindow: time.Minute},
		Sinks:    sinks}, js, router.WithLogger(quietLog()), router.WithHealth(state))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = r.Run(ctx) }()
	stop = func() { cancel(); <-done }
	t.Cleanup(stop)
	return nc, state, stop
}

func waitReady(t *testing.T, s *health.State, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		if ok, _ := s.Ready(); ok {
			if standby, _ := s.Standby(); !standby {
				return time.Since(start)
			}
		}
		if time.Since(start) > within {
			_, why := s.Ready()
			if standby, who := s.Standby(); standby {
				why = who
			}
			t.Fatalf("router not active after %s: %s", within, why)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestOneRouterPerSource: a second router of the same source (a rolling
// deploy, a standby) stands by while the first runs; it takes over at once
// when the first stops, or when its connection dies (a SIGKILL: it no longer answers pings), well within
// the lease TTL. Every change is routed once, in order. Before, both
// published into the one chain.
func TestOneRouterPerSource(t *testing.T) {
	e := newEnv(t)
	sinks := []config.Sink{{Name: "a", Tables: []string{"public.users"}, Basin: "my-basin", Stream: "a"}}
	_, sa, stopA := e.runOwn(t, sinks)
	waitReady(t, sa, 10*time.Second)
	ncB, sb, _ := e.runOwn(t, sinks)
	n := 0
	write := func(k int) {
		for i := 0; i < k; i++ {
			n++
			e.change(t, "public.users", "update", n%7, fmt.Sprintf(`{"id":%d,"v":%d}`, n%7, n))
		}
	}
	write(100)
	e.outputs(t, n)
	if standby, why := sb.Standby(); !standby || !strings.Contains(why, "the active router of source app is r-") {
		t.Fatalf("second router: standby=%v (%q), want standing by for the first", standby, why)
	}
	stopA()
	if d := waitReady(t, sb, 5*time.Second); d > 3*time.Second {
		t.Errorf("took over %s after the first router stopped", d)
	}
	write(100)
	e.outputs(t, n)
	_, sc, _ := e.runOwn(t, sinks)
	time.Sleep(500 * time.Millisecond)
	if standby, _ := sc.Standby(); !standby {
		t.Fatal("third router not a standby while the second runs")
	}
	ncB.Close() // B dies
	if d := waitReady(t, sc, 10*time.Second); d > 7*time.Second {
		t.Errorf("took over %s after the second router's connection closed", d)
	}
	write(100)
	outs := e.outputs(t, n)
	last := map[float64]float64{}
	for i, o := range outs {
		rec := o.Body["record"].(map[string]any)
		id, v := rec["id"].(float64), rec["v"].(float64)
		if v <= last[id] {
			t.Fatalf("output %d: group %v has v=%v after %v", i, id, v, last[id])
		}
		last[id] = v
	}
}

func quietLog() *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))
}

// TestHungRouterKeepsItsLeaseUntilTheTTL: a holder that is connected but
// does not answer its ping (hung, not dead) keeps the source until its key
// expires, as documented; a successor that took over after a ping timeout
// would publish next to a router that may wake up with messages in flight.
func TestHungRouterKeepsItsLeaseUntilTheTTL(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	kv, err := e.js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: router.RoutersBucket, TTL: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Create(ctx, "app", []byte("r-hung")); err != nil {
		t.Fatal(err)
	}
	held := time.Now()
	sub, err := e.nc.Subscribe("pgs2.router.ping.r-hung", func(*nats.Msg) {}) // never answers
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	_, s, _ := e.runOwn(t, []config.Sink{{Name: "a", Tables: []string{"public.users"}, Basin: "my-basin", Stream: "a"}})
	time.Sleep(5 * time.Second)
	if standby, why := s.Standby(); !standby || !strings.Contains(why, "r-hung") {
		t.Fatalf("a router took the source from a hung holder after 5 s (standby=%v, %q); want it to wait for the TTL", standby, why)
	}
	waitReady(t, s, 20*time.Second)
	if d := time.Since(held); d < 10*time.Second {
		t.Errorf("took over %s after the hung holder's last renewal, before its TTL (10 s)", d)
	}
}
