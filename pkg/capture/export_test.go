package capture

import (
	"context"
	"errors"

	"github.com/jackc/pgx/v5"

	"github.com/pgs2/pgs2/pkg/backfill"
)

// WithCrashAfter ends the capture's first sessions, one after another,
// after each published n[i] messages, as a crash in the middle of a round
// would: the session's (n[i]+1)th publish fails.
func WithCrashAfter(n ...int) Option {
	return func(c *Capture) {
		c.wrapPublish = func(publish publishFunc) publishFunc {
			if len(n) == 0 {
				return publish
			}
			left := n[0]
			n = n[1:]
			return func(ctx context.Context, subject, id string, body []byte) error {
				if left <= 0 {
					return errCrash
				}
				left--
				return publish(ctx, subject, id, body)
			}
		}
	}
}

// WithRoundCommits makes the capture's first sessions, one after another,
// end each round at its n[i]th commit (0: by age, as configured) instead of
// by its age, so a test chooses how rounds cut a backlog. With it, a round
// ends without WAL only after Linger.
func WithRoundCommits(n ...int) Option {
	return func(c *Capture) {
		c.roundCommits = func() int {
			if len(n) == 0 {
				return 0
			}
			k := n[0]
			n = n[1:]
			return k
		}
	}
}

// errCrash is the simulated crash.
var errCrash = errors.New("simulated crash")

// EmitFunc writes a backfill watermark.
type EmitFunc = func(context.Context, *pgx.Conn, backfill.Marker) (uint64, error)

// WithEmit wraps the writes of backfill watermarks.
func WithEmit(wrap func(EmitFunc) EmitFunc) Option {
	return func(c *Capture) { c.emit = wrap(c.emit) }
}
