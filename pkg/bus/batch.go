package bus

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// A delivery message carries a batch: several routed changes for one
// delivery subject, so JetStream stores, delivers and dedupes one message
// where it would otherwise handle a thousand. Per-message costs dominate
// JetStream's throughput; the body of each change is copied once either way.
//
// The body is a version byte followed by the entries, each one:
//
//	key, group, action, table  uvarint length + bytes each
//	schema length              uvarint, 1 + the schema's bytes in table (version 4 on)
//	commit_ms                  varint (-1 = unknown)
//	traceparent, error         uvarint length + bytes each
//	error kind                 one byte (version 2 on; ErrorKind)
//	sink, backfill             uvarint length + bytes each (version 3 on)
//	body                       uvarint length + bytes
//
// The message's HeaderEntries header holds the entry count. Versions 1
// (before error kinds: its errors are of ErrorUnknown), 2 (before sink
// and backfill) and 3 (before the schema length: its change messages had
// a subject per table) are still read.
const batchVersion = 4

// ErrorKind says why a change cannot go on as it is, so that delivery can
// branch on it without reading the error's text.
type ErrorKind byte

const (
	// ErrorNone: the change is fine.
	ErrorNone ErrorKind = iota
	// ErrorTooLarge: the change does not fit a NATS message (capture or
	// router): only an operator can let its group go on (acknowledge it).
	ErrorTooLarge
	// ErrorFunction: a sink function failed on it (router): delivery
	// retries it with the sink's functions as they are then.
	ErrorFunction
	// ErrorUnknown: an error of a version that did not record its kind.
	ErrorUnknown
)

// String names the kind (the Pgs2-Error-Kind header of a parked change).
func (k ErrorKind) String() string {
	switch k {
	case ErrorNone:
		return ""
	case ErrorTooLarge:
		return "too-large"
	case ErrorFunction:
		return "function"
	}
	return "unknown"
}

// ParseErrorKind reads ErrorKind.String's output ("" is ErrorNone).
func ParseErrorKind(s string) ErrorKind {
	switch s {
	case "":
		return ErrorNone
	case "too-large":
		return ErrorTooLarge
	case "function":
		return ErrorFunction
	}
	return ErrorUnknown
}

// HeaderEntries is the number of changes in a delivery message.
const HeaderEntries = "Pgs2-Entries"

// Entry is one routed change of a delivery message. Decoded entries point
// into the message's data.
type Entry struct {
	Key    []byte // the change's idempotency key
	Group  []byte // its group (JSON array of the group columns' values)
	Action []byte // insert, update, delete, read
	Table  []byte // schema.table
	// Schema is Table's schema part (names may hold dots: Table is
	// Schema, a dot and the table's name). Nil when unknown: a batch
	// before version 4, whose change subject named the table.
	Schema      []byte
	CommitMs    int64  // commit time in ms since the Unix epoch; -1 = unknown
	TraceParent []byte // W3C trace context of the change
	// Error marks a change the router could not route or transform (or
	// capture could not carry): delivery parks it with its group.
	Error     []byte
	ErrorKind ErrorKind // why, when Error is set
	// Sink, when set, is the only sink the change is for (a backfill's
	// read of one sink); empty: every sink of its table.
	Sink []byte
	// Backfill names the backfill a read belongs to (empty for changes
	// from the WAL).
	Backfill []byte
	// BackfillLast marks a backfill's last read of its table.
	BackfillLast bool
	Body         []byte
}

// Size is the entry's encoded size.
func (e *Entry) Size() int {
	n := binary.MaxVarintLen64 + 3 // commit_ms, error kind, backfill last, schema length
	for _, f := range [...][]byte{e.Key, e.Group, e.Action, e.Table, e.TraceParent, e.Error, e.Sink, e.Backfill, e.Body} {
		n += uvarintLen(uint64(len(f))) + len(f)
	}
	return n
}

func uvarintLen(v uint64) int {
	n := 1
	for v >= 0x80 {
		v >>= 7
		n++
	}
	return n
}

// BatchBuilder encodes entries into a delivery message body.
type BatchBuilder struct {
	buf []byte
	n   int
}

// Add appends an entry (its fields are copied).
func (b *BatchBuilder) Add(e *Entry) {
	if len(b.buf) == 0 {
		b.buf = append(b.buf, batchVersion)
	}
	b.buf = appendField(b.buf, e.Key)
	b.buf = appendField(b.buf, e.Group)
	b.buf = appendField(b.buf, e.Action)
	b.buf = appendField(b.buf, e.Table)
	if e.Schema == nil {
		b.buf = append(b.buf, 0)
	} else {
		b.buf = binary.AppendUvarint(b.buf, uint64(len(e.Schema))+1)
	}
	b.buf = binary.AppendVarint(b.buf, e.CommitMs)
	b.buf = appendField(b.buf, e.TraceParent)
	b.buf = appendField(b.buf, e.Error)
	b.buf = append(b.buf, byte(e.ErrorKind))
	b.buf = appendField(b.buf, e.Sink)
	b.buf = appendField(b.buf, e.Backfill)
	last := byte(0)
	if e.BackfillLast {
		last = 1
	}
	b.buf = append(b.buf, last)
	b.buf = appendField(b.buf, e.Body)
	b.n++
}

func appendField(buf, f []byte) []byte {
	return append(binary.AppendUvarint(buf, uint64(len(f))), f...)
}

// Len is the number of entries.
func (b *BatchBuilder) Len() int { return b.n }

// Size is the encoded size so far.
func (b *BatchBuilder) Size() int { return len(b.buf) }

// Bytes is the message body; valid until the next Add or Reset.
func (b *BatchBuilder) Bytes() []byte { return b.buf }

// Reset empties the builder, keeping its buffer.
func (b *BatchBuilder) Reset() { b.buf, b.n = b.buf[:0], 0 }

// ErrBadBatch means a delivery message body is not a batch this version
// understands.
var ErrBadBatch = errors.New("malformed delivery message batch")

// ErrNewerBatch (with ErrBadBatch) means the batch is of a later version
// than this build reads: a newer service wrote it, and this one must be
// upgraded before it goes on (skipping or parking it would let the
// group's later changes overtake it).
var ErrNewerBatch = errors.New("batch written by a newer release")

// BatchReader decodes a delivery message body entry by entry.
type BatchReader struct {
	data    []byte
	version byte
	err     error
}

// NewBatchReader reads data, a delivery message body.
func NewBatchReader(data []byte) *BatchReader {
	r := &BatchReader{}
	switch {
	case len(data) == 0:
		r.err = fmt.Errorf("%w: empty body", ErrBadBatch)
	case data[0] > batchVersion:
		r.err = fmt.Errorf("%w: %w: version %d, this build reads 1 to %d (upgrade this service: delivery first, then the router, then capture)", ErrBadBatch, ErrNewerBatch, data[0], batchVersion)
	case data[0] < 1:
		r.err = fmt.Errorf("%w: version %d, this build reads 1 to %d", ErrBadBatch, data[0], batchVersion)
	default:
		r.data, r.version = data[1:], data[0]
	}
	return r
}

// Next decodes the next entry into e; false at the end or on an error.
func (r *BatchReader) Next(e *Entry) bool {
	if r.err != nil || len(r.data) == 0 {
		return false
	}
	d := r.data
	field := func() []byte {
		if r.err != nil {
			return nil
		}
		n, k := binary.Uvarint(d)
		if k <= 0 || n > uint64(len(d)-k) {
			r.err = fmt.Errorf("%w: truncated entry", ErrBadBatch)
			return nil
		}
		f := d[k : k+int(n) : k+int(n)]
		d = d[k+int(n):]
		return f
	}
	e.Key, e.Group, e.Action, e.Table = field(), field(), field(), field()
	e.Schema = nil
	if r.err == nil && r.version >= 4 {
		n, k := binary.Uvarint(d)
		switch {
		case k <= 0:
			r.err = fmt.Errorf("%w: truncated entry", ErrBadBatch)
		case n > 0 && (n-1 >= uint64(len(e.Table)) || e.Table[n-1] != '.'):
			r.err = fmt.Errorf("%w: schema length %d does not split table %q", ErrBadBatch, int(n)-1, e.Table)
		case n > 0:
			e.Schema, d = e.Table[:n-1:n-1], d[k:]
		default:
			d = d[k:]
		}
	}
	if r.err == nil {
		ms, k := binary.Varint(d)
		if k <= 0 {
			r.err = fmt.Errorf("%w: truncated entry", ErrBadBatch)
		} else {
			e.CommitMs, d = ms, d[k:]
		}
	}
	e.TraceParent, e.Error = field(), field()
	e.ErrorKind = ErrorNone
	switch {
	case r.err != nil:
	case r.version >= 2:
		if len(d) == 0 {
			r.err = fmt.Errorf("%w: truncated entry", ErrBadBatch)
		} else {
			e.ErrorKind, d = ErrorKind(d[0]), d[1:]
		}
	case len(e.Error) > 0:
		e.ErrorKind = ErrorUnknown
	}
	e.Sink, e.Backfill, e.BackfillLast = nil, nil, false
	if r.version >= 3 {
		e.Sink, e.Backfill = field(), field()
		if r.err == nil && len(d) == 0 {
			r.err = fmt.Errorf("%w: truncated entry", ErrBadBatch)
		} else if r.err == nil {
			e.BackfillLast, d = d[0] == 1, d[1:]
		}
	}
	e.Body = field()
	if r.err != nil {
		return false
	}
	r.data = d
	return true
}

// Err is the decoding error, if any.
func (r *BatchReader) Err() error { return r.err }
