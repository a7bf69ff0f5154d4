package delivery

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgs2/pgs2/pkg/bus"
)

// KV buckets that spread units over delivery processes.
const (
	// OwnersBucket holds one key per owned unit (value: the owner's id).
	// An owner keeps its units for as long as its heartbeat lives, so its
	// per-second work does not grow with the number of units; when the
	// heartbeat stops, the others take its units over.
	OwnersBucket = "PGS2_OWNERS"
	// WorkersBucket holds one key per live delivery process, put every
	// quarter of the lease TTL and expiring after it: the heartbeat.
	WorkersBucket = "PGS2_WORKERS"
)

// ErrLeaseLost means another process owns the unit now.
var ErrLeaseLost = errors.New("lease lost")

// leases knows, from watches of the two buckets, who owns which unit and
// which processes are alive. A process owns a unit from the moment its
// key is created (or taken over from a dead owner, conditional on the
// key's revision) until it deletes the key or its heartbeat lapses: it
// stops its workers at its own deadline (heartbeat sent + 4/5 TTL), before
// any other process can see the heartbeat as expired (last one received
// + TTL). S2 fencing and the park owner markers make a late write harmless
// anyway: the lease keeps writers apart, the fences keep the data exact.
type leases struct {
	id      string
	ttl     time.Duration
	kv      jetstream.KeyValue
	workers jetstream.KeyValue
	nc      *nats.Conn

	// until is when this process's units stop being its own (Unix
	// nanoseconds) unless its heartbeat goes on: last one sent + 4/5 TTL.
	until atomic.Int64

	mu     sync.Mutex
	owners map[string]owner     // unit key -> its owner, from the watch
	seen   map[string]time.Time // process id -> when its heartbeat was last seen
	synced int                  // watches that delivered their initial values
}

type owner struct {
	id  string
	rev uint64
}

func newID() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return "w-" + hex.EncodeToString(b)
}

func openLeases(ctx context.Context, js jetstream.JetStream, ttl time.Duration, replicas int) (*leases, error) {
	kv, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: OwnersBucket, Replicas: replicas,
		Storage: jetstream.FileStorage, Description: "pgs2 delivery: which process owns which S2 stream"})
	if err != nil {
		return nil, fmt.Errorf("KV bucket %s: %w", OwnersBucket, err)
	}
	workers, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: WorkersBucket, TTL: ttl, Replicas: replicas,
		Description: "pgs2 delivery: live processes"})
	if err != nil {
		return nil, fmt.Errorf("KV bucket %s: %w", WorkersBucket, err)
	}
	l := &leases{id: newID(), ttl: ttl, kv: kv, workers: workers, nc: js.Conn(), owners: map[string]owner{}, seen: map[string]time.Time{}}
	if err := bus.AnswerPings(l.nc, pingSubject(l.id)); err != nil {
		return nil, fmt.Errorf("subscribe to %s: %w", pingSubject(l.id), err)
	}
	return l, nil
}

// pingSubject is where a delivery process answers, so that the others
// tell a dead one (SIGKILLed: its connection is gone, no one answers)
// from a late one at once, not a TTL later.
func pingSubject(id string) string { return "pgs2.delivery.ping." + id }

// probe pings the processes whose heartbeat is late; one that no one
// answers for is dead: its units are free now. A process that is alive
// but cut off from NATS may still be appending to S2: taking its units
// fences it out (S2 refuses its appends), so this is safe, only early.
func (l *leases) probe(ctx context.Context) {
	now := time.Now()
	late := map[string]time.Time{}
	l.mu.Lock()
	for id, t := range l.seen {
		if id != l.id && now.Sub(t) > l.ttl/4+l.ttl/10 && now.Sub(t) < l.ttl {
			late[id] = t
		}
	}
	l.mu.Unlock()
	for id, t := range late {
		pctx, cancel := context.WithTimeout(ctx, time.Second)
		gone := bus.Unanswered(pctx, l.nc, pingSubject(id))
		cancel()
		if gone {
			l.mu.Lock()
			if l.seen[id].Equal(t) { // no heartbeat meanwhile
				delete(l.seen, id)
			}
			l.mu.Unlock()
		}
	}
}

// watch follows both buckets until ctx ends.
func (l *leases) watch(ctx context.Context) {
	go bus.WatchKV(ctx, l.kv, l.markSynced, func(e jetstream.KeyValueEntry) {
		l.mu.Lock()
		defer l.mu.Unlock()
		if o, ok := l.owners[e.Key()]; ok && e.Revision() < o.rev {
			return // older than this process's own claim, recorded as it was made
		}
		if e.Operation() == jetstream.KeyValuePut {
			l.owners[e.Key()] = owner{id: string(e.Value()), rev: e.Revision()}
		} else {
			delete(l.owners, e.Key())
		}
	})
	go bus.WatchKV(ctx, l.workers, l.markSynced, func(e jetstream.KeyValueEntry) {
		l.mu.Lock()
		defer l.mu.Unlock()
		if e.Operation() == jetstream.KeyValuePut {
			l.seen[e.Key()] = time.Now()
		} else {
			delete(l.seen, e.Key())
		}
	})
}

func (l *leases) markSynced() {
	l.mu.Lock()
	l.synced++
	l.mu.Unlock()
}

// ready reports whether both watches have delivered what the buckets held.
func (l *leases) ready() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.synced >= 2
}

// heartbeat says this process is alive and moves its lease's end.
func (l *leases) heartbeat(ctx context.Context) error {
	sent := time.Now()
	ctx, cancel := context.WithTimeout(ctx, l.ttl/4)
	defer cancel()
	if _, err := l.workers.Put(ctx, l.id, []byte(sent.UTC().Format(time.RFC3339))); err != nil {
		return fmt.Errorf("heartbeat: %w", err)
	}
	l.until.Store(sent.Add(l.ttl - l.ttl/5).UnixNano())
	return nil
}

// beat puts the heartbeat every quarter TTL until ctx ends, on its own, so
// that however long balancing takes (claiming thousands of units) the
// others never see this process as dead while it lives.
func (l *leases) beat(ctx context.Context, failed func(error)) {
	t := time.NewTicker(l.ttl / 4)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if err := l.heartbeat(ctx); err != nil && ctx.Err() == nil {
			failed(err)
		}
	}
}

// valid reports whether this process's units are still its own.
func (l *leases) valid() error {
	if time.Now().UnixNano() > l.until.Load() {
		return fmt.Errorf("%w: no heartbeat stored for %s", ErrLeaseLost, l.ttl-l.ttl/5)
	}
	return nil
}

// live counts the processes whose heartbeat was seen within the TTL.
func (l *leases) live() int {
	now := time.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for id, t := range l.seen {
		if id != l.id && now.Sub(t) < l.ttl {
			n++
		}
	}
	return n + 1
}

// owner returns who owns the unit, as far as the watch knows (ok=false:
// no one).
func (l *leases) owner(u Unit) (o owner, ok bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	o, ok = l.owners[unitKey(u)]
	return o, ok
}

// claim takes the unit if no live process owns it: a free unit, a dead
// process's, or this process's own from before a lapse. ok=false: another
// process has it.
func (l *leases) claim(ctx context.Context, u Unit) (rev uint64, ok bool, err error) {
	o, owned := l.owner(u)
	if owned && o.id != l.id && l.alive(o.id) {
		return 0, false, nil
	}
	key := unitKey(u)
	if owned {
		rev, err = l.kv.Update(ctx, key, []byte(l.id), o.rev)
	} else {
		rev, err = l.kv.Create(ctx, key, []byte(l.id))
	}
	if bus.LostRace(err) {
		return 0, false, nil // taken meanwhile: the watch will say by whom
	}
	if err != nil {
		return 0, false, err
	}
	l.mu.Lock()
	l.owners[key] = owner{id: l.id, rev: rev}
	l.mu.Unlock()
	return rev, true, nil
}

// claimable reports whether no live process but this one owns the unit.
func (l *leases) claimable(u Unit) bool {
	o, owned := l.owner(u)
	return !owned || o.id == l.id || !l.alive(o.id)
}

// alive reports whether process id's heartbeat was seen within the TTL.
func (l *leases) alive(id string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	t, ok := l.seen[id]
	return ok && time.Since(t) < l.ttl
}

// lost reports whether a held unit (at revision rev) has another owner now.
func (l *leases) lost(u Unit, rev uint64) bool {
	o, ok := l.owner(u)
	if !ok {
		return true // deleted: an operator, or a process that took it and let go
	}
	return o.id != l.id && o.rev > rev
}

func (l *leases) release(ctx context.Context, u Unit, rev uint64) {
	_ = l.kv.Delete(ctx, unitKey(u), jetstream.LastRevision(rev))
}

func (l *leases) leave(ctx context.Context) { _ = l.workers.Delete(ctx, l.id) }
