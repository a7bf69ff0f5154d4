package router

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgs2/pgs2/pkg/bus"
)

// RoutersBucket holds one key per source whose router runs (value: the
// router's id). A source's delivery stream has one writer — its chain
// assumes it —, so a second router of the same source (a rolling deploy,
// a copy started by mistake) waits until the first is gone.
const RoutersBucket = "PGS2_ROUTERS"

// leaseTTL is how long a router that stopped renewing keeps its source
// (a SIGKILLed one is replaced at once: nobody answers its pings).
const leaseTTL = 10 * time.Second

// pingSubject is where a running router answers, so that a successor can
// tell a dead holder from a live one without waiting out the TTL.
func pingSubject(id string) string { return "pgs2.router.ping." + id }

type lease struct {
	nc     *nats.Conn
	kv     jetstream.KeyValue
	key    string // the source's name
	id     string
	ttl    time.Duration
	rev    uint64
	until  time.Time // the lease, as this router counts it: renewal sent + 4/5 TTL
	waited bool      // logged that another router holds it
}

func newLeaseID() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return "r-" + hex.EncodeToString(b)
}

func openLease(ctx context.Context, js jetstream.JetStream, source string, replicas int) (*lease, error) {
	kv, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: RoutersBucket, TTL: leaseTTL, Replicas: replicas,
		Description: "pgs2: the router running for each source"})
	if err != nil {
		return nil, fmt.Errorf("KV bucket %s: %w", RoutersBucket, err)
	}
	l := &lease{nc: js.Conn(), kv: kv, key: source, id: newLeaseID(), ttl: leaseTTL}
	if err := bus.AnswerPings(l.nc, pingSubject(l.id)); err != nil {
		return nil, fmt.Errorf("subscribe to %s: %w", pingSubject(l.id), err)
	}
	return l, nil
}

// acquire waits until this router holds the source: free, expired, or
// held by a router that does not answer its ping (gone).
func (l *lease) acquire(ctx context.Context, r *Router) error {
	for {
		sent := time.Now()
		rev, err := l.kv.Create(ctx, l.key, []byte(l.id))
		if errors.Is(err, jetstream.ErrKeyExists) {
			rev, err = l.takeOver(ctx, r)
		}
		if err == nil && rev > 0 {
			l.rev, l.until, l.waited = rev, sent.Add(l.ttl-l.ttl/5), false
			return nil
		}
		if err != nil {
			r.log.Warn("cannot take the router lease yet", "source", l.key, "error", err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(l.ttl / 4):
		}
	}
}

// takeOver replaces a holder that is gone: no one answers its ping (rev
// 0: it answers, or is hung and keeps the source until its key expires).
func (l *lease) takeOver(ctx context.Context, r *Router) (uint64, error) {
	e, err := l.kv.Get(ctx, l.key)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return 0, nil // gone meanwhile: try again
	}
	if err != nil {
		return 0, err
	}
	holder := string(e.Value())
	if holder != l.id {
		pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		gone := bus.Unanswered(pctx, l.nc, pingSubject(holder))
		cancel()
		if !gone || ctx.Err() != nil { // a hung holder keeps the source until its key expires
			if !l.waited {
				l.waited = true
				r.log.Warn("another router of this source is running; waiting until it stops (run one router per source)",
					"source", l.key, "holder", holder)
				r.state.SetNotReady("another router of source " + l.key + " is running (" + holder + ")")
			}
			return 0, nil
		}
	}
	rev, err := l.kv.Update(ctx, l.key, []byte(l.id), e.Revision())
	if bus.LostRace(err) {
		return 0, nil // someone else was quicker
	}
	return rev, err
}

// keep renews the lease every quarter TTL until ctx ends, and calls lost
// when another router took it or the lease ran out unrenewed.
func (l *lease) keep(ctx context.Context, lost func(error)) {
	t := time.NewTicker(l.ttl / 4)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		sent := time.Now()
		rctx, cancel := context.WithTimeout(ctx, l.ttl/4)
		rev, err := l.kv.Update(rctx, l.key, []byte(l.id), l.rev)
		cancel()
		switch {
		case err == nil:
			l.rev, l.until = rev, sent.Add(l.ttl-l.ttl/5)
		case bus.LostRace(err):
			lost(fmt.Errorf("another router took source %s over: %w", l.key, err))
			return
		case time.Now().After(l.until):
			lost(fmt.Errorf("the router lease of source %s was not renewed in time: %w", l.key, err))
			return
		}
	}
}

// release lets a successor start at once.
func (l *lease) release(ctx context.Context) {
	if l.rev == 0 {
		return // never held
	}
	_ = l.kv.Delete(ctx, l.key, jetstream.LastRevision(l.rev))
}
