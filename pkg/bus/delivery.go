package bus

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// DefaultDeliveryStream is the stream between router and delivery.
const DefaultDeliveryStream = "PGS2_DELIVERY"

// Headers the router adds for delivery (S2 record headers and timestamp
// come from them, since a transform may replace the body).
const (
	HeaderKey      = "Pgs2-Key"       // the change's idempotency key
	HeaderAction   = "Pgs2-Action"    // insert, update, delete, read
	HeaderTable    = "Pgs2-Table"     // schema.table
	HeaderCommitMs = "Pgs2-Commit-Ms" // commit time, ms since the Unix epoch
	HeaderInputSeq = "Pgs2-Input-Seq" // the change's sequence in the changes stream
	// HeaderError marks a message the router could not route or transform:
	// delivery parks it, with its group, instead of appending it.
	HeaderError = "Pgs2-Error"
)

// DeliverySubject is `pgs2.deliver.<sink>.<basin>.<stream>.<partition>`.
func DeliverySubject(sink, basin, stream, partition string) string {
	return DeliveryRoot + "." + EscapeToken(sink) + "." + EscapeToken(basin) + "." + EscapeToken(stream) + "." + partition
}

// DeliveryStreamFilter matches every partition of one sink's S2 stream.
func DeliveryStreamFilter(sink, basin, stream string) string {
	return DeliveryRoot + "." + EscapeToken(sink) + "." + EscapeToken(basin) + "." + EscapeToken(stream) + ".*"
}

// ParseDeliverySubject splits a delivery subject into its unescaped parts.
func ParseDeliverySubject(subject string) (sink, basin, stream, partition string, err error) {
	t := strings.Split(subject, ".")
	if len(t) != 6 || t[0]+"."+t[1] != DeliveryRoot {
		return "", "", "", "", fmt.Errorf("%q is not a delivery subject", subject)
	}
	return UnescapeToken(t[2]), UnescapeToken(t[3]), UnescapeToken(t[4]), t[5], nil
}

// ParseChangeSubject splits a change subject into its unescaped parts.
func ParseChangeSubject(subject string) (source, schema, table, partition string, err error) {
	t := strings.Split(subject, ".")
	if len(t) != 6 || t[0]+"."+t[1] != ChangesRoot {
		return "", "", "", "", fmt.Errorf("%q is not a change subject", subject)
	}
	return UnescapeToken(t[2]), UnescapeToken(t[3]), UnescapeToken(t[4]), t[5], nil
}

// DeliveryStreamConfig describes the delivery stream.
type DeliveryStreamConfig struct {
	Name            string
	Replicas        int
	DuplicateWindow time.Duration
	MaxAge          time.Duration
}

// EnsureDeliveryStream creates or updates the delivery stream. The router
// is its only writer (ordered publishing, as for the changes stream).
func EnsureDeliveryStream(ctx context.Context, js jetstream.JetStream, c DeliveryStreamConfig) (jetstream.Stream, error) {
	sc := jetstream.StreamConfig{
		Name:        c.Name,
		Description: "pgs2 changes routed to S2 streams",
		Subjects:    []string{DeliveryRoot + ".>"},
		Retention:   jetstream.LimitsPolicy,
		Storage:     jetstream.FileStorage,
		Replicas:    c.Replicas,
		Duplicates:  c.DuplicateWindow,
		MaxAge:      c.MaxAge,
		AllowDirect: true,
		MaxMsgSize:  -1,
	}
	s, err := js.CreateOrUpdateStream(ctx, sc)
	if err != nil {
		return nil, fmt.Errorf("create or update stream %s: %w", c.Name, err)
	}
	return s, nil
}
