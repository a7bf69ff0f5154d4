package router

import (
	"context"
	"errors"
)

// WithCrashAfter ends the router's first session after it published n
// delivery messages, as a crash in the middle of a round would: its
// publisher fails the (n+1)th publish.
func WithCrashAfter(n int) Option { return WithCrashAfterDo(n, nil) }

// WithCrashAfterDo is WithCrashAfter calling at (when set) at the crash,
// before the session restarts.
func WithCrashAfterDo(n int, at func()) Option {
	return func(r *Router) {
		crashed := false
		r.wrap = func(c chain) chain {
			if crashed {
				return c
			}
			crashed = true
			return &crashingChain{chain: c, left: n, at: at}
		}
	}
}

// errCrash is the simulated crash.
var errCrash = errors.New("simulated crash")

// crashingChain fails every publish after the first left.
type crashingChain struct {
	chain
	left int
	at   func()
}

func (c *crashingChain) Publish(ctx context.Context, subject, id string, body []byte) error {
	if c.left <= 0 {
		if c.at != nil {
			c.at()
			c.at = nil
		}
		return errCrash
	}
	c.left--
	return c.chain.Publish(ctx, subject, id, body)
}
