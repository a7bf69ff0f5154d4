package bus_test

import (
	"context"
	"io"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/health"
	"github.com/pgs2/pgs2/pkg/natstest"
)

// TestLeaseKeepsARenewingHolder: a holder that answers no ping but keeps
// renewing its key — a live process whose connection is being
// re-established, or that answers late — is not taken over (before, an
// unanswered ping alone handed the key to the standby at once, and both
// ran). Once it stops renewing, the standby takes over within seconds,
// well before the key's TTL.
func TestLeaseKeepsARenewingHolder(t *testing.T) {
	_, js := natstest.New(t).Connect(t)
	ctx := context.Background()
	const ttl = 10 * time.Second
	kv, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "LEASE_TEST", TTL: ttl})
	if err != nil {
		t.Fatal(err)
	}
	rev, err := kv.Create(ctx, "app", []byte("t-silent")) // nobody answers pgs2.test.ping.t-silent
	if err != nil {
		t.Fatal(err)
	}
	var renewing atomic.Bool
	renewing.Store(true)
	go func() {
		for renewing.Load() {
			time.Sleep(ttl / 4)
			if renewing.Load() {
				if r, err := kv.Update(ctx, "app", []byte("t-silent"), rev); err == nil {
					rev = r
				}
			}
		}
	}()
	l, err := bus.OpenLease(ctx, js, bus.LeaseConfig{Bucket: "LEASE_TEST", Key: "app", Role: "test", Replicas: 1, TTL: ttl})
	if err != nil {
		t.Fatal(err)
	}
	st := health.NewState()
	acquired := make(chan time.Time, 1)
	actx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		if l.Acquire(actx, slog.New(slog.NewTextHandler(io.Discard, nil)), st) == nil {
			acquired <- time.Now()
		}
	}()
	select {
	case <-acquired:
		t.Fatal("the standby took the key from a holder that renews it")
	case <-time.After(8 * time.Second):
	}
	if standby, why := st.Standby(); !standby {
		t.Fatalf("not a standby while the holder renews: %q", why)
	}
	renewing.Store(false)
	stopped := time.Now()
	select {
	case at := <-acquired:
		if d := at.Sub(stopped); d > 8*time.Second {
			t.Errorf("took over %s after the holder stopped renewing; want well within the %s TTL", d, ttl)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("the standby did not take over after the holder stopped renewing")
	}
}
