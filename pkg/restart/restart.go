// Package restart runs a service's sessions again after they fail, with
// exponential back-off and jitter: capture, router and every delivery
// worker restart the same way.
package restart

import (
	"context"
	"math/rand/v2"
	"time"
)

// Policy is the back-off between sessions.
type Policy struct {
	// Min is the first wait, Max the longest.
	Min, Max time.Duration
	// ResetAfter: a session that ran at least this long starts the back-off
	// over at Min.
	ResetAfter time.Duration
}

// Backoff is the state of a Policy's waits.
type Backoff struct {
	p   Policy
	cur time.Duration
}

// NewBackoff starts p's back-off.
func NewBackoff(p Policy) *Backoff { return &Backoff{p: p, cur: p.Min} }

// Next returns the wait before the next session, given how long the last
// one ran: the current step with jitter in its upper half (so that
// processes restarting together spread out), then doubles the step.
func (b *Backoff) Next(ran time.Duration) time.Duration {
	if b.p.ResetAfter > 0 && ran >= b.p.ResetAfter {
		b.cur = b.p.Min
	}
	d := b.cur
	b.cur = min(2*b.cur, b.p.Max)
	if d <= 1 {
		return d
	}
	return d/2 + rand.N(d/2+1)
}

// Loop runs session until ctx ends or ended returns false. After each
// session that returned while ctx is live, ended gets its error and the
// wait before the next one; it returns whether to go on.
func Loop(ctx context.Context, p Policy, session func(context.Context) error, ended func(err error, wait time.Duration) bool) {
	b := NewBackoff(p)
	for ctx.Err() == nil {
		started := time.Now()
		err := session(ctx)
		if ctx.Err() != nil {
			return
		}
		wait := b.Next(time.Since(started))
		if !ended(err, wait) {
			return
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// Until runs step until it succeeds, ctx ends (ctx's error) or permanent
// reports its error as one that retrying cannot fix (that error). Between
// attempts it waits p's back-off; failed, if not nil, is told each
// transient error and the wait. A service's start-up calls go through it,
// so that a NATS cluster electing leaders delays a service, not ends it.
func Until(ctx context.Context, p Policy, step func(context.Context) error, permanent func(error) bool, failed func(err error, wait time.Duration)) error {
	b := NewBackoff(p)
	for {
		err := step(ctx)
		if err == nil || (permanent != nil && permanent(err)) {
			return err
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		wait := b.Next(0)
		if failed != nil {
			failed(err, wait)
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
	}
}
