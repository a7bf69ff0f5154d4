package router

import (
	"context"
	"errors"
)

// WithCrashAfter ends the router's first session after it published n
// delivery messages, as a crash in the middle of a round would: its
// publisher fails the (n+1)th publish.
func WithCrashAfter(n int) Option {
	return func(r *Router) {
		crashed := false
		r.wrap = func(c chain) chain {
			if crashed {
				return c
			}
			crashed = true
			return &crashingChain{chain: c, left: n}
		}
	}
}

// errCrash is the simulated crash.
var errCrash = errors.New("simulated crash")

// crashingChain fails every publish after the first left.
type crashingChain struct {
	chain
	left int
}

func (c *crashingChain) Publish(ctx context.Context, subject, id string, body []byte) error {
	if c.left <= 0 {
		return errCrash
	}
	c.left--
	return c.chain.Publish(ctx, subject, id, body)
}
