package bus

import (
	"context"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// WatchKV follows every key of kv until ctx ends: put gets each entry
// (deletes included), synced is called once, when the entries the bucket
// held at the start have been delivered. A watch that ends (a lost
// connection, a leader change) starts again a second later and delivers
// the bucket's entries again.
func WatchKV(ctx context.Context, kv jetstream.KeyValue, synced func(), put func(jetstream.KeyValueEntry)) {
	first := true
	for ctx.Err() == nil {
		w, err := kv.WatchAll(ctx)
		if err == nil {
			for e := range w.Updates() {
				if e == nil {
					if first {
						first = false
						synced()
					}
					continue
				}
				put(e)
			}
			_ = w.Stop()
		}
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}
