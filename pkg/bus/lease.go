package bus

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// A process that holds a lease (a router its source, a delivery process
// its S2 streams) answers pings on a subject of its own for as long as its
// connection lives, so a successor tells a dead holder (its connection is
// gone: nobody answers) from a late or hung one at once. A hung holder is
// not gone: it keeps its lease until the lease's TTL.

// AnswerPings answers every request on subject, for as long as nc lives.
func AnswerPings(nc *nats.Conn, subject string) error {
	_, err := nc.Subscribe(subject, func(m *nats.Msg) { _ = m.Respond(nil) })
	return err
}

// Unanswered reports whether no process listens on subject (the server
// says so at once: no responders). A ping that times out is not that.
func Unanswered(ctx context.Context, nc *nats.Conn, subject string) bool {
	_, err := nc.RequestWithContext(ctx, subject, nil)
	return errors.Is(err, nats.ErrNoResponders)
}

// LostRace reports whether a KV Create or Update failed because the key
// changed since it was read: another process was quicker.
func LostRace(err error) bool {
	var apiErr *jetstream.APIError
	return errors.Is(err, jetstream.ErrKeyExists) || errors.Is(err, jetstream.ErrKeyNotFound) ||
		errors.Is(err, jetstream.ErrKeyRevisionMismatch) || // an Update's, on a replicated bucket too (code 10164)
		(errors.As(err, &apiErr) && (apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
			apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant))
}

// LeaseConfig names a lease: one holder per Key in Bucket at a time.
type LeaseConfig struct {
	Bucket   string        // the KV bucket (PGS2_ROUTERS, PGS2_CAPTURES)
	Key      string        // what is held: the source's name
	Role     string        // who holds it, in pings and messages: "router", "capture"
	Replicas int           // the bucket's replicas
	TTL      time.Duration // how long a holder that stopped renewing keeps it
}

// Lease makes one process of a role the active one for a key; the others
// are standbys that take over when it is gone: at once when it stopped
// (it releases the key), within a few seconds when it died (nobody answers
// its ping), after the TTL when it hangs (it may wake with work in
// flight, so it keeps the key until it expires).
type Lease struct {
	cfg    LeaseConfig
	nc     *nats.Conn
	kv     jetstream.KeyValue
	id     string
	rev    uint64
	until  time.Time // the lease, as this holder counts it: renewal sent + 4/5 TTL
	waited bool      // logged that another process holds it
	// A holder seen answering no ping, at this revision of its key, then.
	suspect    string
	suspectRev uint64
	suspectAt  time.Time
}

// Standby is told who holds the lease while a process waits for it, and
// when it starts as the active one.
type Standby interface {
	SetStandby(reason string)
	SetNotReady(reason string)
}

// OpenLease creates the bucket if needed and answers pings as a new
// holder-to-be (its id: the role's initial, a dash and 16 hex digits).
func OpenLease(ctx context.Context, js jetstream.JetStream, cfg LeaseConfig) (*Lease, error) {
	kv, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: cfg.Bucket, TTL: cfg.TTL, Replicas: cfg.Replicas,
		Description: "pgs2: the active " + cfg.Role + " of each source"})
	if err != nil {
		return nil, fmt.Errorf("KV bucket %s: %w", cfg.Bucket, err)
	}
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	l := &Lease{cfg: cfg, nc: js.Conn(), kv: kv, id: cfg.Role[:1] + "-" + hex.EncodeToString(b)}
	if err := AnswerPings(l.nc, l.pingSubject(l.id)); err != nil {
		return nil, fmt.Errorf("subscribe to %s: %w", l.pingSubject(l.id), err)
	}
	return l, nil
}

func (l *Lease) pingSubject(id string) string { return "pgs2." + l.cfg.Role + ".ping." + id }

// Acquire waits until this process holds the key: free, expired, or held
// by a process that is gone. While another holds it, the process is a
// standby (st).
func (l *Lease) Acquire(ctx context.Context, log *slog.Logger, st Standby) error {
	for {
		sent := time.Now()
		rev, err := l.kv.Create(ctx, l.cfg.Key, []byte(l.id))
		if errors.Is(err, jetstream.ErrKeyExists) {
			rev, err = l.takeOver(ctx, log, st)
		}
		if err == nil && rev > 0 {
			if l.waited {
				log.Info("took over as the active "+l.cfg.Role, "source", l.cfg.Key, "id", l.id)
			}
			st.SetNotReady("starting as the active " + l.cfg.Role)
			l.rev, l.until, l.waited, l.suspect = rev, sent.Add(l.cfg.TTL-l.cfg.TTL/5), false, ""
			return nil
		}
		if err != nil {
			log.Warn("cannot take the "+l.cfg.Role+" lease yet", "source", l.cfg.Key, "error", err)
			st.SetNotReady("cannot read the " + l.cfg.Role + " lease: " + err.Error())
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(l.cfg.TTL / 10):
		}
	}
}

// takeOver replaces a holder that is gone: it answers no ping and has not
// renewed the key, in two looks more than a renewal period apart (a live
// holder whose connection is being re-established answers no ping for a
// moment either, but renews). Rev 0: not gone yet, or hung — a holder that
// answers keeps the key until it expires.
func (l *Lease) takeOver(ctx context.Context, log *slog.Logger, st Standby) (uint64, error) {
	e, err := l.kv.Get(ctx, l.cfg.Key)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return 0, nil // gone meanwhile: try again
	}
	if err != nil {
		return 0, err
	}
	holder := string(e.Value())
	if holder != l.id {
		pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		gone := Unanswered(pctx, l.nc, l.pingSubject(holder))
		cancel()
		if gone && ctx.Err() == nil && (l.suspect != holder || l.suspectRev != e.Revision()) {
			l.suspect, l.suspectRev, l.suspectAt = holder, e.Revision(), time.Now()
			gone = false // look again after a renewal period
		}
		if gone && time.Since(l.suspectAt) < l.cfg.TTL/4+time.Second {
			gone = false
		}
		if !gone || ctx.Err() != nil {
			if !l.waited {
				l.waited = true
				log.Info("another "+l.cfg.Role+" of this source is active; standing by to take over when it stops",
					"source", l.cfg.Key, "active", holder, "id", l.id)
			}
			st.SetStandby(fmt.Sprintf("standby: the active %s of source %s is %s", l.cfg.Role, l.cfg.Key, holder))
			return 0, nil
		}
	}
	rev, err := l.kv.Update(ctx, l.cfg.Key, []byte(l.id), e.Revision())
	if LostRace(err) {
		return 0, nil // someone else was quicker
	}
	return rev, err
}

// Keep renews the lease every quarter TTL until ctx ends, and calls lost
// when another process took it or it ran out unrenewed.
func (l *Lease) Keep(ctx context.Context, lost func(error)) {
	t := time.NewTicker(l.cfg.TTL / 4)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		sent := time.Now()
		rctx, cancel := context.WithTimeout(ctx, l.cfg.TTL/4)
		rev, err := l.kv.Update(rctx, l.cfg.Key, []byte(l.id), l.rev)
		if LostRace(err) {
			// A renewal the server applied but whose answer was lost
			// leaves the key ours at a newer revision.
			if e, gerr := l.kv.Get(rctx, l.cfg.Key); gerr == nil && string(e.Value()) == l.id {
				rev, err = e.Revision(), nil
				sent = l.until.Add(-(l.cfg.TTL - l.cfg.TTL/5)) // not counted as renewed now
			}
		}
		cancel()
		switch {
		case err == nil:
			l.rev, l.until = rev, sent.Add(l.cfg.TTL-l.cfg.TTL/5)
		case LostRace(err):
			lost(fmt.Errorf("another %s took source %s over: %w", l.cfg.Role, l.cfg.Key, err))
			return
		case time.Now().After(l.until):
			lost(fmt.Errorf("the %s lease of source %s was not renewed in time: %w", l.cfg.Role, l.cfg.Key, err))
			return
		}
	}
}

// Release lets a standby take over (within its next look, TTL/10).
func (l *Lease) Release(ctx context.Context) {
	if l.rev == 0 {
		return // never held
	}
	_ = l.kv.Delete(ctx, l.cfg.Key, jetstream.LastRevision(l.rev))
	l.rev = 0
}

// Hold runs active while this process holds the lease, again after each
// loss, until ctx ends or active returns an error; then it releases the
// lease. active's context ends when the lease is lost.
func (l *Lease) Hold(ctx context.Context, log *slog.Logger, st Standby, active func(ctx context.Context) error) error {
	defer func() {
		rctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		l.Release(rctx)
	}()
	for ctx.Err() == nil {
		if err := l.Acquire(ctx, log, st); err != nil {
			return nil // ctx ended
		}
		lctx, cancel := context.WithCancel(ctx)
		kept := make(chan struct{})
		go func() {
			defer close(kept)
			l.Keep(lctx, func(err error) {
				log.Warn(l.cfg.Role+" lease lost; stopping", "error", err)
				st.SetNotReady(err.Error())
				cancel()
			})
		}()
		err := active(lctx)
		lost := lctx.Err() != nil && ctx.Err() == nil
		cancel()
		<-kept // Keep no longer touches the revision
		if err != nil && !lost && ctx.Err() == nil {
			return err
		}
	}
	return nil
}
