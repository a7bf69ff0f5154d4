package delivery

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgs2/pgs2/pkg/s2sink"
)

// FailuresBucket is the KV bucket of units whose appends keep failing for
// a reason that is not one record's (a bad token, a missing stream, S2
// unavailable): the unit is blocked, other units flow.
const FailuresBucket = "PGS2_FAILURES"

// Blocked is a blocked unit's state, as operators see it.
type Blocked struct {
	Sink         string    `json:"sink"`
	Basin        string    `json:"basin"`
	Stream       string    `json:"stream"`
	HeadSeq      uint64    `json:"head_seq"` // delivery sequence of the first record held back
	Records      int       `json:"records"`  // in the failing batch
	Status       int       `json:"http_status,omitempty"`
	Code         string    `json:"code,omitempty"`
	Message      string    `json:"message"`
	Attempts     int       `json:"attempts"`
	FirstFailure time.Time `json:"first_failure"`
	LastFailure  time.Time `json:"last_failure"`
	NextAttempt  time.Time `json:"next_attempt"`
}

func unitKey(u Unit) string {
	return base64.RawURLEncoding.EncodeToString([]byte(u.Sink + "\x00" + u.Basin + "\x00" + u.Stream))
}

// EnsureFailures creates the failures bucket.
func EnsureFailures(ctx context.Context, js jetstream.JetStream, replicas int) (jetstream.KeyValue, error) {
	kv, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: FailuresBucket,
		Description: "pgs2 delivery units blocked by failing appends", Replicas: replicas, Storage: jetstream.FileStorage})
	if err != nil {
		return nil, fmt.Errorf("create or update KV bucket %s: %w", FailuresBucket, err)
	}
	return kv, nil
}

// recordFailure stores a unit's failing state.
func (w *worker) recordFailure(ctx context.Context, b Blocked, err error) {
	e := s2sink.Classify(err)
	b.Message = err.Error()
	if e != nil {
		b.Status, b.Code, b.Message = e.Status, e.Code, e.Message
	}
	v, _ := json.Marshal(b)
	w.d.failed.add(unitKey(w.u)) // before the put: a clear must not miss it
	if _, perr := w.d.failures.Put(ctx, unitKey(w.u), v); perr != nil {
		w.log.Warn("record the failure", "error", perr)
	}
}

func (w *worker) clearFailure(ctx context.Context) {
	if !w.d.failed.mayHold(unitKey(w.u)) {
		return // nothing to clear: no request, no delete marker for every session
	}
	if err := w.d.failures.Delete(ctx, unitKey(w.u)); err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
		w.log.Warn("clear the failure", "error", err)
	}
}

// ListBlocked returns every blocked unit.
func ListBlocked(ctx context.Context, kv jetstream.KeyValue) ([]Blocked, error) {
	keys, err := kv.ListKeys(ctx)
	if err != nil {
		return nil, err
	}
	var out []Blocked
	for k := range keys.Keys() {
		e, err := kv.Get(ctx, k)
		if err != nil {
			continue
		}
		var b Blocked
		if json.Unmarshal(e.Value(), &b) == nil {
			out = append(out, b)
		}
	}
	return out, nil
}

// keySet is the keys a KV bucket holds, from a watch.
type keySet struct {
	mu     sync.Mutex
	keys   map[string]bool
	synced bool
}

func (k *keySet) put(e jetstream.KeyValueEntry) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.keys == nil {
		k.keys = map[string]bool{}
	}
	if e.Operation() == jetstream.KeyValuePut {
		k.keys[e.Key()] = true
	} else {
		delete(k.keys, e.Key())
	}
}

// add records a key this process put (before the watch shows it).
func (k *keySet) add(key string) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.keys == nil {
		k.keys = map[string]bool{}
	}
	k.keys[key] = true
}

func (k *keySet) sync() {
	k.mu.Lock()
	k.synced = true
	k.mu.Unlock()
}

// mayHold reports whether the bucket may hold key (true until the watch
// delivered what it holds).
func (k *keySet) mayHold(key string) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return !k.synced || k.keys[key]
}
