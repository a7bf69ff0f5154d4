package delivery

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// KV buckets that spread units over delivery processes.
const (
	// LeasesBucket holds one key per owned unit (value: the owner's id);
	// keys expire after the lease TTL unless renewed, so a dead worker's
	// units are free again within the TTL.
	LeasesBucket = "PGS2_LEASES"
	// WorkersBucket holds one key per live delivery process.
	WorkersBucket = "PGS2_WORKERS"
)

// ErrLeaseLost means another process owns the unit now.
var ErrLeaseLost = errors.New("lease lost")

type leases struct {
	id      string
	ttl     time.Duration
	kv      jetstream.KeyValue
	workers jetstream.KeyValue
}

func newID() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return "w-" + hex.EncodeToString(b)
}

func openLeases(ctx context.Context, js jetstream.JetStream, ttl time.Duration, replicas int) (*leases, error) {
	kv, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: LeasesBucket, TTL: ttl, Replicas: replicas,
		Description: "pgs2 delivery: which process owns which S2 stream"})
	if err != nil {
		return nil, fmt.Errorf("KV bucket %s: %w", LeasesBucket, err)
	}
	workers, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: WorkersBucket, TTL: ttl, Replicas: replicas,
		Description: "pgs2 delivery: live processes"})
	if err != nil {
		return nil, fmt.Errorf("KV bucket %s: %w", WorkersBucket, err)
	}
	return &leases{id: newID(), ttl: ttl, kv: kv, workers: workers}, nil
}

// heartbeat says this process is alive and returns how many are.
func (l *leases) heartbeat(ctx context.Context) (int, error) {
	if _, err := l.workers.Put(ctx, l.id, []byte(time.Now().UTC().Format(time.RFC3339))); err != nil {
		return 0, err
	}
	keys, err := l.workers.ListKeys(ctx)
	if err != nil {
		return 0, err
	}
	n := 0
	for range keys.Keys() {
		n++
	}
	return max(n, 1), nil
}

// claim takes a free unit.
func (l *leases) claim(ctx context.Context, u Unit) (uint64, bool, error) {
	rev, err := l.kv.Create(ctx, unitKey(u), []byte(l.id))
	if errors.Is(err, jetstream.ErrKeyExists) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, err
	}
	return rev, true, nil
}

// renew extends a held lease; ErrLeaseLost when someone else holds it.
func (l *leases) renew(ctx context.Context, u Unit, rev uint64) (uint64, error) {
	nrev, err := l.kv.Update(ctx, unitKey(u), []byte(l.id), rev)
	if err != nil {
		var apiErr *jetstream.APIError
		if errors.As(err, &apiErr) || errors.Is(err, jetstream.ErrKeyNotFound) {
			return 0, fmt.Errorf("%w: %v", ErrLeaseLost, err)
		}
		return 0, err
	}
	return nrev, nil
}

func (l *leases) release(ctx context.Context, u Unit, rev uint64) {
	_ = l.kv.Delete(ctx, unitKey(u), jetstream.LastRevision(rev))
}

func (l *leases) leave(ctx context.Context) { _ = l.workers.Delete(ctx, l.id) }
