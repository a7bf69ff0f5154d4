package bus

import (
	"errors"

	"github.com/nats-io/nats.go/jetstream"
)

// Permanent reports whether a JetStream error is one that retrying cannot
// fix: a stream pgs2 must not use (ErrStreamShared), or a stream
// configuration the server refuses (invalid, another stream's name or
// subjects, replicas a single server cannot have). Everything else —
// timeouts, no responders, a cluster without a leader, no peers for a
// replica yet — may pass once the cluster settles, so services retry it.
func Permanent(err error) bool {
	if errors.Is(err, ErrStreamShared) {
		return true
	}
	var api *jetstream.APIError
	if !errors.As(err, &api) {
		return false
	}
	switch api.ErrorCode {
	case 10052, // invalid stream configuration
		10058, // stream name in use with a different configuration
		10065, // subjects overlap with another stream's
		10074: // replicas > 1 on a server that is not clustered
		return true
	}
	return false
}
