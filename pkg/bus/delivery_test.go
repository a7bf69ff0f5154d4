package bus_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/natstest"
)

// TestDeliveryStreamTakesAConsumerPerUnit: delivery reads each S2 stream
// with a consumer of its own, and nats-server allows 1,000 consumers per
// stream by default: before, the 1,001st unit's worker failed ("maximum
// consumers limit reached") for ever and its changes never arrived.
func TestDeliveryStreamTakesAConsumerPerUnit(t *testing.T) {
	ns := natstest.New(t)
	_, js := ns.Connect(t)
	ctx := context.Background()
	if _, err := bus.EnsureDeliveryStream(ctx, js, bus.DeliveryStreamConfig{Name: "PGS2_DELIVERY", Source: "app", Replicas: 1, DuplicateWindow: time.Minute}); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 1001; i++ {
		if _, err := js.CreateConsumer(ctx, "PGS2_DELIVERY", jetstream.ConsumerConfig{
			FilterSubject: bus.DeliveryStreamFilter("app", "sink", "basin", fmt.Sprintf("s-%d", i)), InactiveThreshold: time.Minute, MemoryStorage: true}); err != nil {
			t.Fatalf("consumer %d: %v", i+1, err)
		}
	}
}
