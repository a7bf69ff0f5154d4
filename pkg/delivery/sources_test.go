package delivery_test

import (
	"context"
	"errors"
	"fmt"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/change"
	"github.com/pgs2/pgs2/pkg/config"
	"github.com/pgs2/pgs2/pkg/delivery"
	"github.com/pgs2/pgs2/pkg/natstest"
	"github.com/pgs2/pgs2/pkg/router"
	"github.com/pgs2/pgs2/pkg/s2local"
	"github.com/pgs2/pgs2/pkg/s2sink"
)

// fakeSource publishes changes to a source's changes stream as capture
// would, one transaction per change.
type fakeSource struct {
	name string
	pub  *bus.Publisher
	sub  *bus.ChangeSubjects
	lsn  uint64
}

func newFakeSource(t *testing.T, ns *natstest.Server, js jetstream.JetStream, name, stream string) *fakeSource {
	t.Helper()
	if _, err := bus.EnsureChangesStream(context.Background(), js, bus.ChangesStreamConfig{Name: stream, Source: name, Replicas: 1, DuplicateWindow: time.Minute}); err != nil {
		t.Fatal(err)
	}
	nc, _ := ns.Connect(t)
	pub, err := bus.NewPublisher(nc, 0, 0, bus.PublisherOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return &fakeSource{name: name, pub: pub, sub: bus.NewChangeSubjects(name, 4), lsn: 1000}
}

// update publishes an update of public.users row id to version v.
func (s *fakeSource) update(t *testing.T, id, v int) {
	t.Helper()
	s.lsn += 10
	pos := change.Position{LSN: s.lsn}
	body := fmt.Sprintf(`{"record":{"id":%d,"v":%d},"changes":null,"action":"update","metadata":{"table_schema":"public","table_name":"users","commit_timestamp":"2026-11-22T10:00:00.123456Z","commit_lsn":%d,"commit_idx":0,"database_name":"%s","idempotency_key":"%s","record_pks":["%d"],"transaction_annotations":null}}`,
		id, v, pos.LSN, s.name, pos.Key(), id)
	group := []byte(fmt.Sprintf(`["%d"]`, id))
	var b bus.BatchBuilder
	b.Add(&bus.Entry{Key: []byte(pos.Key()), Group: group, Action: []byte("update"), Table: []byte("public.users"), Schema: []byte("public"), CommitMs: 1795341600123, Body: []byte(body)})
	if err := s.pub.Publish(context.Background(), s.sub.Subject(group), pos.Key(), b.Bytes()); err != nil {
		t.Fatal(err)
	}
	s.pub.Mark(pos.LSN)
}

// TestTwoSourcesSideBySide: two sources, each with its changes stream,
// router and delivery stream, into the same S2 stream, with the routers
// and delivery restarted in the middle: every change of both arrives
// once, in group order. On 8f14b2a both routers published to one
// PGS2_DELIVERY and each resumed from the other's last message (299 of the
// second source's 400 changes were never delivered).
func TestTwoSourcesSideBySide(t *testing.T) {
	ns := natstest.New(t)
	_, js := ns.Connect(t)
	srv, err := s2local.New(s2local.Options{Basins: []string{"two-basin"}})
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(srv)
	t.Cleanup(func() { hs.Close(); srv.Close() })
	client, _ := s2sink.New(s2sink.Config{Endpoint: hs.URL})
	sinks := []config.Sink{{Name: "both", Tables: []string{"public.users"}, Basin: "two-basin", Stream: "users", Endpoint: hs.URL, CreateStream: true,
		Batch: config.Batch{MaxRecords: 1000, MaxBytes: 1 << 20, Linger: config.Duration(2 * time.Millisecond)},
		Retry: config.Retry{Initial: config.Duration(50 * time.Millisecond), Max: config.Duration(time.Second)}}}

	type src struct {
		*fakeSource
		changes, delivery string
	}
	sources := []src{{changes: "APP_CHANGES", delivery: "APP_DELIVERY"}, {changes: "CRM_CHANGES", delivery: "CRM_DELIVERY"}}
	for i, name := range []string{"app", "crm"} {
		sources[i].fakeSource = newFakeSource(t, ns, js, name, sources[i].changes)
	}
	runRouter := func(s src) func() {
		r, err := router.New(router.Config{Source: s.name, ChangesStream: s.changes,
			Delivery: bus.DeliveryStreamConfig{Name: s.delivery, Source: s.name, Replicas: 1, DuplicateWindow: time.Minute},
			Sinks:    sinks}, js, router.WithLogger(quiet()))
		if err != nil {
			t.Fatal(err)
		}
		return run(t, "router "+s.name, r.Run)
	}
	runDelivery := func() func() {
		d, err := delivery.New(delivery.Config{Sinks: sinks, Discover: 100 * time.Millisecond, Replicas: 1}, js, delivery.WithLogger(quiet()))
		if err != nil {
			t.Fatal(err)
		}
		return run(t, "delivery", d.Run)
	}

	const perSource, rows = 400, 7
	stopRouters := []func(){runRouter(sources[0]), runRouter(sources[1])}
	stopDelivery := runDelivery()
	for v := 1; v <= perSource; v++ {
		for _, s := range sources {
			s.update(t, v%rows, v)
		}
		if v == perSource/2 { // restart everything but the sources, in the middle
			stopDelivery()
			for _, stop := range stopRouters {
				stop()
			}
			stopRouters = []func(){runRouter(sources[0]), runRouter(sources[1])}
			stopDelivery = runDelivery()
		}
	}
	defer func() {
		stopDelivery()
		for _, stop := range stopRouters {
			stop()
		}
	}()

	u := &pipeline{client: client}
	recs := u.records(t, "two-basin", "users", 2*perSource)
	last := map[string]float64{}
	count := map[string]int{}
	for i, r := range recs {
		md := r.Body["metadata"].(map[string]any)
		rec := r.Body["record"].(map[string]any)
		db := md["database_name"].(string)
		g := fmt.Sprintf("%s/%v", db, rec["id"])
		v := rec["v"].(float64)
		if v <= last[g] {
			t.Fatalf("record %d: group %s has v=%v after %v (reordered or duplicated)", i, g, v, last[g])
		}
		last[g] = v
		count[db]++
	}
	if count["app"] != perSource || count["crm"] != perSource {
		t.Fatalf("S2 holds %v changes per source, want %d each", count, perSource)
	}

	// A second source's router refuses a delivery stream that is another
	// source's, naming the fix.
	_, err = bus.EnsureDeliveryStream(context.Background(), js, bus.DeliveryStreamConfig{Name: "APP_DELIVERY", Source: "crm", Replicas: 1})
	if !errors.Is(err, bus.ErrStreamShared) {
		t.Fatalf("EnsureDeliveryStream of another source's stream = %v, want ErrStreamShared", err)
	}
}

// run runs f until the returned stop is called; f must return nil then.
func run(t *testing.T, what string, f func(context.Context) error) func() {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f(ctx) }()
	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; err != nil {
			t.Errorf("%s: %v", what, err)
		}
	}
	t.Cleanup(stop)
	return stop
}
