package bus

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"

	"github.com/nats-io/nats.go/jetstream"
)

// UnitsBucket is the KV bucket of delivery units: every S2 stream of a
// sink that a source's router has published to, with the delivery stream
// that holds its messages. Routers add a key before their first message to
// a unit; delivery watches the bucket, so finding new units costs nothing
// per second however many there are (listing every subject of every
// delivery stream did).
const UnitsBucket = "PGS2_UNITS"

// UnitRef is one registered unit of one source.
type UnitRef struct {
	Source, Sink, Basin, Stream string
	// DeliveryStream is the source's delivery stream (the key's value).
	DeliveryStream string
}

// UnitKey is the unit's key in UnitsBucket (KV keys take only
// [-/_=.a-zA-Z0-9]: the names go base64url-encoded).
func UnitKey(source, sink, basin, stream string) string {
	return base64.RawURLEncoding.EncodeToString([]byte(source + "\x00" + sink + "\x00" + basin + "\x00" + stream))
}

// ParseUnitEntry reads a UnitsBucket entry.
func ParseUnitEntry(key string, value []byte) (UnitRef, error) {
	b, err := base64.RawURLEncoding.DecodeString(key)
	if err != nil {
		return UnitRef{}, fmt.Errorf("unit key %q: %w", key, err)
	}
	t := strings.Split(string(b), "\x00")
	if len(t) != 4 || len(value) == 0 {
		return UnitRef{}, fmt.Errorf("unit key %q is not source, sink, basin and stream with a delivery stream", key)
	}
	return UnitRef{Source: t[0], Sink: t[1], Basin: t[2], Stream: t[3], DeliveryStream: string(value)}, nil
}

// EnsureUnits creates or updates the units bucket.
func EnsureUnits(ctx context.Context, js jetstream.JetStream, replicas int) (jetstream.KeyValue, error) {
	kv, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: UnitsBucket, Replicas: replicas,
		Storage: jetstream.FileStorage, Description: "pgs2: the S2 streams each source's router publishes to"})
	if err != nil {
		return nil, fmt.Errorf("create or update KV bucket %s: %w", UnitsBucket, err)
	}
	return kv, nil
}

// Units registers units (in memory: each once per process).
type Units struct {
	kv    jetstream.KeyValue
	known map[string]bool // by unit key
}

// NewUnits loads the units registered already.
func NewUnits(ctx context.Context, kv jetstream.KeyValue) (*Units, error) {
	u := &Units{kv: kv, known: map[string]bool{}}
	l, err := kv.ListKeys(ctx)
	if errors.Is(err, jetstream.ErrNoKeysFound) {
		return u, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list KV bucket %s: %w", UnitsBucket, err)
	}
	for k := range l.Keys() {
		u.known[k] = true
	}
	return u, nil
}

// Register makes sure the unit is in the bucket.
func (u *Units) Register(ctx context.Context, r UnitRef) error {
	key := UnitKey(r.Source, r.Sink, r.Basin, r.Stream)
	if u.known[key] {
		return nil
	}
	if _, err := u.kv.Put(ctx, key, []byte(r.DeliveryStream)); err != nil {
		return fmt.Errorf("register S2 stream %s/%s of sink %s in %s: %w", r.Basin, r.Stream, r.Sink, UnitsBucket, err)
	}
	u.known[key] = true
	return nil
}
