package bus_test

import (
	"context"
	"testing"

	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/natstest"
)

// TestUnitsRegistry: units registered once, read back by key.
func TestUnitsRegistry(t *testing.T) {
	ns := natstest.New(t)
	_, js := ns.Connect(t)
	ctx := context.Background()
	kv, err := bus.EnsureUnits(ctx, js, 1)
	if err != nil {
		t.Fatal(err)
	}
	u, err := bus.NewUnits(ctx, kv)
	if err != nil {
		t.Fatal(err)
	}
	ref := bus.UnitRef{Source: "app", Sink: "s.1", Basin: "my-basin", Stream: "a/b c", DeliveryStream: "PGS2_DELIVERY"}
	for i := 0; i < 3; i++ {
		if err := u.Register(ctx, ref); err != nil {
			t.Fatal(err)
		}
	}
	e, err := kv.Get(ctx, bus.UnitKey(ref.Source, ref.Sink, ref.Basin, ref.Stream))
	if err != nil {
		t.Fatal(err)
	}
	if e.Revision() != 1 {
		t.Errorf("registered %d times, want once", e.Revision())
	}
	got, err := bus.ParseUnitEntry(e.Key(), e.Value())
	if err != nil || got != ref {
		t.Fatalf("read back %+v, %v; want %+v", got, err, ref)
	}
	if u2, err := bus.NewUnits(ctx, kv); err != nil {
		t.Fatal(err)
	} else if err := u2.Register(ctx, ref); err != nil {
		t.Fatal(err)
	}
	if e, _ := kv.Get(ctx, e.Key()); e.Revision() != 1 {
		t.Errorf("a new process registered a known unit again (revision %d)", e.Revision())
	}
}
