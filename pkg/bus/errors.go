package bus

import (
	"errors"

	"github.com/nats-io/nats.go/jetstream"
)

// Permanent reports whether a JetStream error is one that retrying cannot
// fix: a stream pgs2 must not use (ErrStreamShared), or a request the
// server refuses as bad (a 400: an invalid or conflicting configuration).
// Everything else — timeouts, no responders, a cluster without a leader —
// passes once the cluster settles, so services retry it.
func Permanent(err error) bool {
	if errors.Is(err, ErrStreamShared) {
		return true
	}
	var api *jetstream.APIError
	return errors.As(err, &api) && api.Code == 400
}
