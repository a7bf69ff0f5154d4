package bus

import (
	"context"
	"errors"

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
		(errors.As(err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence)
}
