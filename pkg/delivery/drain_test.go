package delivery

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/config"
	"github.com/pgs2/pgs2/pkg/s2local"
	"github.com/pgs2/pgs2/pkg/s2sink"
)

// TestDrainTakesTurns: a park of 3,000 changes drains in batched appends
// (at most max_records each) that take turns with other groups' changes,
// which keep flowing meanwhile (d7607e1 drained it inline, one record per
// append, stalling the stream for its whole length).
func TestDrainTakesTurns(t *testing.T) {
	h := newHarness(t)
	u := Unit{"drain", testBasin, "drain"}
	// The park drains when retried by hand (below), not by the clock.
	s := h.sink(u, h.client, config.Retry{Initial: config.Duration(time.Hour), Max: config.Duration(time.Hour)})
	_, stop, _ := h.start(h.delivery("w1", h.js), u, s)
	defer stop()
	const parked = 3000
	for m := 0; m < parked/1000; m++ {
		var es []bus.Entry
		for i := 0; i < 1000; i++ {
			e := entry("public.t", 0, fmt.Sprintf("p%d", m*1000+i), []byte(`{"v":1}`))
			if m == 0 && i == 0 { // fails in the router; goes through when retried
				e.Error, e.ErrorKind = []byte("injected"), bus.ErrorFunction
			}
			es = append(es, e)
		}
		h.publish(u, 0, es...)
	}
	ctx := context.Background()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		st, _ := h.js.Stream(ctx, ParkedStream)
		if info, err := st.Info(ctx); err == nil && info.State.Msgs >= parked+1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the park never filled")
		}
	}
	// Each append takes 20 ms from now on, while other groups' changes
	// arrive every 5 ms: some wait whenever a drain batch ends.
	if err := h.s2.SetFaults(s2local.FaultConfig{Rules: []s2local.FaultRule{{AppendsOnly: true, LatencyMS: 20}}}); err != nil {
		t.Fatal(err)
	}
	others := 0
	publishOthers := func(n int) {
		for range n {
			h.publish(u, 1, entry("public.t", 1+others%5, fmt.Sprintf("o%d", others), []byte(`{"v":2}`)))
			others++
			time.Sleep(5 * time.Millisecond)
		}
	}
	publishOthers(20)
	if err := h.nc.Publish(RetrySubject(u), nil); err != nil { // as the admin API's retry does
		t.Fatal(err)
	}
	for deadline := time.Now().Add(30 * time.Second); ; {
		publishOthers(10)
		n := 0
		for _, r := range h.records(u) {
			if header(&r, s2sink.HeaderIdempotencyKey)[0] == 'p' {
				n++
			}
		}
		if n >= parked {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d parked changes in S2 after 30 s", n, parked)
		}
	}
	recs := h.waitRecords(u, parked+others, 30*time.Second)
	if len(recs) != parked+others {
		t.Fatalf("S2 holds %d records, want %d", len(recs), parked+others)
	}
	first, last, between, drains := -1, -1, 0, 0
	for i := range recs {
		if k := header(&recs[i], s2sink.HeaderIdempotencyKey); k[0] == 'p' {
			if first < 0 {
				first = i
			}
			last = i
		}
		if header(&recs[i], s2sink.HeaderPark) != "" {
			drains++
		}
	}
	for i := first; i <= last; i++ {
		if header(&recs[i], s2sink.HeaderIdempotencyKey)[0] == 'o' {
			between++
		}
	}
	t.Logf("park drained in %d appends; %d other changes appended while it drained", drains, between)
	if drains < parked/1000 || drains > parked/10 {
		t.Errorf("park drained in %d appends, want batches of up to 1000", drains)
	}
	if between == 0 {
		t.Error("no other group's change was appended while the park drained")
	}
}

// TestNewerBatchStops: a delivery message of a batch version newer than
// this build reads (a router upgraded before delivery) stops the unit
// where it is, neither parked nor skipped: the changes after it wait, so
// none overtakes it, and go on once a build that reads it runs (here:
// once the message is removed, as an upgrade would read it).
func TestNewerBatchStops(t *testing.T) {
	h := newHarness(t)
	u := Unit{"newer", testBasin, "newer"}
	h.publish(u, 0, entry("public.t", 1, "k1", []byte(`{"v":1}`)))
	ack, err := h.js.Publish(context.Background(), bus.DeliverySubject(testSource, u.Sink, u.Basin, u.Stream, "0"), []byte{99, 0, 0})
	if err != nil {
		t.Fatal(err)
	}
	h.publish(u, 1, entry("public.t", 2, "k2", []byte(`{"v":2}`)))
	_, stop, _ := h.start(h.delivery("w1", h.js), u, h.sink(u, h.client, config.Retry{}))
	defer stop()
	h.waitRecords(u, 1, 10*time.Second)
	time.Sleep(time.Second) // sessions retry meanwhile
	if recs := h.records(u); len(recs) != 1 || header(&recs[0], s2sink.HeaderIdempotencyKey) != "k1" {
		t.Fatalf("%d records in S2 with a newer batch in the way, want only the one before it", len(recs))
	}
	st, err := h.js.Stream(context.Background(), ParkedStream)
	if err != nil {
		t.Fatal(err)
	}
	if info, err := st.Info(context.Background(), jetstream.WithSubjectFilter(ParkFilter(u))); err != nil || info.State.Msgs > 1 { // the owner marker only
		t.Fatalf("parks of the unit: %+v, %v: the newer batch was parked", info.State, err)
	}
	ds, err := h.js.Stream(context.Background(), h.src.name)
	if err != nil {
		t.Fatal(err)
	}
	if err := ds.DeleteMsg(context.Background(), ack.Sequence); err != nil {
		t.Fatal(err)
	}
	if recs := h.waitRecords(u, 2, 15*time.Second); header(&recs[1], s2sink.HeaderIdempotencyKey) != "k2" {
		t.Fatalf("after the newer batch: %s", header(&recs[1], s2sink.HeaderIdempotencyKey))
	}
}
