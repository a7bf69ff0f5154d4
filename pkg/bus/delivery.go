package bus

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// Headers of a single change outside a batch: a parked or dead-lettered
// change carries its entry's fields as these (S2 record headers and
// timestamp come from them, since a transform may replace the body).
const (
	HeaderKey      = "Pgs2-Key"       // the change's idempotency key
	HeaderAction   = "Pgs2-Action"    // insert, update, delete, read
	HeaderTable    = "Pgs2-Table"     // schema.table
	HeaderCommitMs = "Pgs2-Commit-Ms" // commit time, ms since the Unix epoch
	// HeaderError marks a change that cannot go on as it is: on
	// PGS2_CHANGES one capture could not carry (too large), on a parked
	// change one the router could not route or transform.
	HeaderError = "Pgs2-Error"
	// HeaderErrorKind is the ErrorKind of HeaderError.
	HeaderErrorKind = "Pgs2-Error-Kind"
)

// Headers of a delivery message: the router publishes in rounds — the
// changes-stream messages [Input-Seq, Input-End] it read in one go, routed
// into one batch per delivery subject — and numbers each round's messages,
// so that after a crash it knows whether its last round is complete.
const (
	HeaderInputSeq = "Pgs2-Input-Seq" // the round's first changes-stream sequence
	HeaderInputEnd = "Pgs2-Input-End" // the round's last changes-stream sequence
	HeaderRound    = "Pgs2-Round"     // "<i>/<n>": this message is the round's i-th of n
	// HeaderDisabled lists the sinks (comma-separated) that were disabled
	// when the round was routed: a round cut short is routed again with
	// the same ones, whatever their state is by then.
	HeaderDisabled = "Pgs2-Disabled"
)

// DeliverySubject is
// `pgs2.deliver.<source>.<sink>.<basin>.<stream>.<partition>`.
func DeliverySubject(source, sink, basin, stream, partition string) string {
	return DeliveryRoot + "." + EscapeToken(source) + "." + EscapeToken(sink) + "." + EscapeToken(basin) + "." + EscapeToken(stream) + "." + partition
}

// DeliveryFilter matches every delivery subject of one source: its
// delivery stream's subjects.
func DeliveryFilter(source string) string {
	return DeliveryRoot + "." + EscapeToken(source) + ".>"
}

// DeliveryStreamFilter matches every partition of one sink's S2 stream in
// one source's delivery stream.
func DeliveryStreamFilter(source, sink, basin, stream string) string {
	return DeliveryRoot + "." + EscapeToken(source) + "." + EscapeToken(sink) + "." + EscapeToken(basin) + "." + EscapeToken(stream) + ".*"
}

// ParseDeliverySubject splits a delivery subject into its unescaped parts.
func ParseDeliverySubject(subject string) (source, sink, basin, stream, partition string, err error) {
	t := strings.Split(subject, ".")
	if len(t) != 7 || t[0]+"."+t[1] != DeliveryRoot {
		return "", "", "", "", "", fmt.Errorf("%q is not a delivery subject", subject)
	}
	return UnescapeToken(t[2]), UnescapeToken(t[3]), UnescapeToken(t[4]), UnescapeToken(t[5]), t[6], nil
}

// ParseChangeSubject splits a change subject into its unescaped parts:
// `pgs2.changes.<source>.<partition>`, or the subject per table of
// captures before batch version 4,
// `pgs2.changes.<source>.<schema>.<table>.<partition>` (then perTable is
// true and schema and table name its changes' table).
func ParseChangeSubject(subject string) (source, schema, table, partition string, perTable bool, err error) {
	t := strings.Split(subject, ".")
	switch {
	case len(t) == 4 && t[0]+"."+t[1] == ChangesRoot:
		return UnescapeToken(t[2]), "", "", t[3], false, nil
	case len(t) == 6 && t[0]+"."+t[1] == ChangesRoot:
		return UnescapeToken(t[2]), UnescapeToken(t[3]), UnescapeToken(t[4]), t[5], true, nil
	}
	return "", "", "", "", false, fmt.Errorf("%q is not a change subject", subject)
}

// MaxDeliveryConsumers is a delivery stream's limit on consumers: one per
// unit reading it, and some to spare while sessions restart.
const MaxDeliveryConsumers = 1 << 20

// DeliveryStreamConfig describes a source's delivery stream.
type DeliveryStreamConfig struct {
	Name            string
	Source          string
	Replicas        int
	DuplicateWindow time.Duration
	MaxAge          time.Duration
}

// EnsureDeliveryStream creates or updates a source's delivery stream. The
// source's router is its only writer (ordered publishing, as for the
// changes stream), so each source has a stream of its own: a stream with
// other subjects is refused (ErrStreamShared). Delivery reads them all.
func EnsureDeliveryStream(ctx context.Context, js jetstream.JetStream, c DeliveryStreamConfig) (jetstream.Stream, error) {
	subjects := []string{DeliveryFilter(c.Source)}
	sc := jetstream.StreamConfig{
		Name:        c.Name,
		Description: "pgs2 changes of source " + c.Source + " routed to S2 streams",
		Subjects:    subjects,
		Retention:   jetstream.LimitsPolicy,
		Storage:     jetstream.FileStorage,
		Replicas:    c.Replicas,
		Duplicates:  c.DuplicateWindow,
		MaxAge:      c.MaxAge,
		AllowDirect: true,
		MaxMsgSize:  -1,
		// Delivery reads each unit (S2 stream) with a consumer of its own:
		// nats-server allows 1,000 consumers per stream unless the stream
		// says otherwise (-1 does not), and the 1,001st unit would wait
		// for ever.
		MaxConsumers: MaxDeliveryConsumers,
	}
	return ensureOwnStream(ctx, js, sc, func(have []string) error {
		hint := "set nats.delivery_stream to another name"
		if slices.Equal(have, []string{DeliveryRoot + ".>"}) {
			hint += " (this stream was made by an earlier pgs2 for every source: once delivery has sent what it holds, delete it)"
		}
		return fmt.Errorf("%w: stream %s has subjects %v, not %v; each source needs a delivery stream of its own: %s",
			ErrStreamShared, c.Name, have, subjects, hint)
	})
}

// ListDeliveryStreams names the delivery streams of every source (streams
// with subjects under pgs2.deliver).
func ListDeliveryStreams(ctx context.Context, js jetstream.JetStream) ([]string, error) {
	l := js.StreamNames(ctx, jetstream.WithStreamListSubject(DeliveryRoot+".>"))
	var names []string
	for n := range l.Name() {
		names = append(names, n)
	}
	if err := l.Err(); err != nil {
		return nil, fmt.Errorf("list delivery streams: %w", err)
	}
	slices.Sort(names)
	return names, nil
}

// OrderedInactive is how long the server keeps an ordered consumer whose
// reader is gone (a crashed process): its readers delete it themselves on
// the way out (DropConsumer).
const OrderedInactive = 30 * time.Second

// DropConsumer deletes an ordered consumer's server-side consumer at the
// end of a session, so that sessions restarting in a loop do not pile up
// consumers until their inactivity threshold.
func DropConsumer(js jetstream.JetStream, stream string, c jetstream.Consumer) {
	info := c.CachedInfo()
	if info == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = js.DeleteConsumer(ctx, stream, info.Name)
}
