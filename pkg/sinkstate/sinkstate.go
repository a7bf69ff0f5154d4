// Package sinkstate holds each sink's run state (active, paused, disabled)
// in a JetStream KV bucket, so every router and delivery process obeys the
// same state within a second of its change, whichever process changed it.
//
// Paused: delivery appends nothing to the sink; its changes wait in the
// delivery stream, and resume goes on from the S2 stream's own resume
// point, in order. Disabled: the router stops producing for the sink too
// (changes routed while it is disabled never reach it); delivery stops as
// for paused, and enable delivers what was routed before.
package sinkstate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/config"
)

// Bucket is the KV bucket of sink states, keyed by sink name.
const Bucket = "PGS2_SINKS"

// State is a sink's run state.
type State string

// The states.
const (
	Active   State = "active"
	Paused   State = "paused"
	Disabled State = "disabled"
)

// Parse reads a state as the config and the API write it ("" = active).
func Parse(s string) (State, error) {
	switch State(s) {
	case "", Active:
		return Active, nil
	case Paused, Disabled:
		return State(s), nil
	}
	return "", fmt.Errorf("%q is not a sink state: write active, paused or disabled", s)
}

// Delivers reports whether delivery appends to a sink in this state.
func (s State) Delivers() bool { return s == Active || s == "" }

// Routes reports whether the router produces for a sink in this state.
func (s State) Routes() bool { return s != Disabled }

// Entry is what the bucket holds for a sink.
type Entry struct {
	State State `json:"state"`
	// Config is the config's status when the entry was written: a config
	// whose status differs from it was changed since, and applies.
	Config State     `json:"config"`
	By     string    `json:"by"` // "config", or the operator
	Reason string    `json:"reason,omitempty"`
	Time   time.Time `json:"time"`
}

// Ensure creates or updates the bucket.
func Ensure(ctx context.Context, js jetstream.JetStream, replicas int) (jetstream.KeyValue, error) {
	kv, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: Bucket, Replicas: replicas,
		Storage: jetstream.FileStorage, History: 1, Description: "pgs2: each sink's state (active, paused, disabled)"})
	if err != nil {
		return nil, fmt.Errorf("create or update KV bucket %s: %w", Bucket, err)
	}
	return kv, nil
}

func key(sink string) string { return bus.EscapeToken(sink) }

// Get returns a sink's entry (ok=false: none, the sink is as its config
// says).
func Get(ctx context.Context, kv jetstream.KeyValue, sink string) (e Entry, rev uint64, ok bool, err error) {
	ke, err := kv.Get(ctx, key(sink))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return Entry{}, 0, false, nil
	}
	if err != nil {
		return Entry{}, 0, false, fmt.Errorf("read the state of sink %s: %w", sink, err)
	}
	if err := json.Unmarshal(ke.Value(), &e); err != nil {
		return Entry{}, 0, false, fmt.Errorf("the state of sink %s in %s is not pgs2's (%v): delete the key to use the config's", sink, Bucket, err)
	}
	return e, ke.Revision(), true, nil
}

// Set changes a sink's state on behalf of an operator, keeping the
// config's status the entry was written for.
func Set(ctx context.Context, kv jetstream.KeyValue, sink string, s State, by, reason string) (Entry, error) {
	return update(ctx, kv, sink, func(old Entry, ok bool) (Entry, bool) {
		cfg := old.Config
		if !ok {
			cfg = Active
		}
		return Entry{State: s, Config: cfg, By: by, Reason: reason, Time: time.Now().UTC()}, true
	})
}

// Apply writes each sink's config status where the bucket holds nothing
// for it, or holds an entry written for another config status (the
// config's status changed since): the latest of the config and the
// operator's commands wins. A config whose status did not change leaves
// an operator's pause in place.
func Apply(ctx context.Context, kv jetstream.KeyValue, sinks []config.Sink) error {
	for _, sk := range sinks {
		want, err := Parse(sk.Status)
		if err != nil {
			return fmt.Errorf("sink %s: %w", sk.Name, err)
		}
		_, err = update(ctx, kv, sk.Name, func(old Entry, ok bool) (Entry, bool) {
			if ok && old.Config == want {
				return Entry{}, false
			}
			if !ok && want == Active {
				return Entry{}, false // nothing to record: active is the default
			}
			return Entry{State: want, Config: want, By: "config", Time: time.Now().UTC()}, true
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// update writes f(old) with compare-and-set, again on a conflict.
func update(ctx context.Context, kv jetstream.KeyValue, sink string, f func(old Entry, ok bool) (Entry, bool)) (Entry, error) {
	for attempt := 0; ; attempt++ {
		old, rev, ok, err := Get(ctx, kv, sink)
		if err != nil {
			return Entry{}, err
		}
		e, write := f(old, ok)
		if !write {
			return old, nil
		}
		b, _ := json.Marshal(e)
		if ok {
			_, err = kv.Update(ctx, key(sink), b, rev)
		} else {
			_, err = kv.Create(ctx, key(sink), b)
		}
		if err == nil {
			return e, nil
		}
		if !bus.LostRace(err) {
			return Entry{}, fmt.Errorf("write the state of sink %s: %w", sink, err)
		}
		// Another writer won: read again. Writers racing on one sink are
		// few (operators, config applies), so this ends; a short random
		// wait spreads those that keep colliding.
		if attempt >= 2 {
			select {
			case <-ctx.Done():
				return Entry{}, fmt.Errorf("write the state of sink %s: %w", sink, ctx.Err())
			case <-time.After(time.Duration(rand.IntN(5*attempt)+1) * time.Millisecond):
			}
		}
	}
}

// Table is the bucket's states as one process knows them, kept current by
// a watch.
type Table struct {
	m      atomic.Pointer[map[string]Entry] // by sink name; copied on write
	mu     sync.Mutex
	synced chan struct{}
	once   sync.Once
	// changed, when set, is called after every change.
	changed func()
}

// NewTable returns an empty table; changed (may be nil) is called after
// every change the watch brings.
func NewTable(changed func()) *Table {
	t := &Table{synced: make(chan struct{}), changed: changed}
	t.m.Store(&map[string]Entry{})
	return t
}

// Watch keeps t current until ctx ends.
func (t *Table) Watch(ctx context.Context, kv jetstream.KeyValue) {
	bus.WatchKV(ctx, kv, func() { t.once.Do(func() { close(t.synced) }) }, func(ke jetstream.KeyValueEntry) {
		t.mu.Lock()
		next := map[string]Entry{}
		for k, v := range *t.m.Load() {
			next[k] = v
		}
		name := bus.UnescapeToken(ke.Key())
		var e Entry
		if ke.Operation() == jetstream.KeyValuePut && json.Unmarshal(ke.Value(), &e) == nil {
			next[name] = e
		} else {
			delete(next, name)
		}
		t.m.Store(&next)
		t.mu.Unlock()
		if t.changed != nil {
			t.changed()
		}
	})
}

// Synced is closed once the table holds what the bucket held at the start.
func (t *Table) Synced() <-chan struct{} { return t.synced }

// Ready reports whether the table is synced.
func (t *Table) Ready() bool {
	select {
	case <-t.synced:
		return true
	default:
		return false
	}
}

// Wait waits until the table is synced, or ctx ends.
func (t *Table) Wait(ctx context.Context) error {
	select {
	case <-t.synced:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Of returns a sink's state (active when the bucket holds none).
func (t *Table) Of(sink string) State {
	if e, ok := (*t.m.Load())[sink]; ok && e.State != "" {
		return e.State
	}
	return Active
}

// Entry returns a sink's entry (ok=false: none).
func (t *Table) Entry(sink string) (Entry, bool) {
	e, ok := (*t.m.Load())[sink]
	return e, ok
}
