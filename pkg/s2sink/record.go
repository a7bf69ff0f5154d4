package s2sink

import (
	"github.com/s2-streamstore/s2-sdk-go/s2"

	"github.com/pgs2/pgs2/pkg/bus"
)

// S2 record header names.
const (
	HeaderIdempotencyKey = "idempotency-key"
	HeaderAction         = "action"
	HeaderTable          = "table"
	// HeaderBackfill names the backfill a `read` record belongs to.
	HeaderBackfill = "pgs2-backfill"
	// HeaderBackfillLast ("true") marks the last read of a table's backfill:
	// a consumer building a copy of the table from the stream has it all.
	HeaderBackfillLast = "pgs2-backfill-last"
)

var (
	nameKey    = []byte(HeaderIdempotencyKey)
	nameAction = []byte(HeaderAction)
	nameTable  = []byte(HeaderTable)
	nameSeq    = []byte(HeaderSeq)
	nameBF     = []byte(HeaderBackfill)
	nameBFLast = []byte(HeaderBackfillLast)
	valueTrue  = []byte("true")
)

// Record builds the S2 record of a routed change: body, headers
// idempotency-key, action and table (so readers can drop duplicates and
// route without parsing) and, on a backfill's reads, pgs2-backfill (and
// pgs2-backfill-last on the table's last one), and
// the commit time in ms as the timestamp. The
// record points into e's fields and body; they must outlive the append.
//
// pos, the change's delivery-stream position, goes in the pgs2-seq header:
// it is where delivery resumes (Client.Progress).
func Record(e *bus.Entry, body []byte, pos bus.DeliveryPos) s2.AppendRecord {
	r := s2.AppendRecord{
		Body: body,
		Headers: []s2.Header{
			{Name: nameKey, Value: e.Key},
			{Name: nameAction, Value: e.Action},
			{Name: nameTable, Value: e.Table},
			{Name: nameSeq, Value: []byte(pos.String())},
		},
	}
	if len(e.Backfill) > 0 {
		r.Headers = append(r.Headers, s2.Header{Name: nameBF, Value: e.Backfill})
		if e.BackfillLast {
			r.Headers = append(r.Headers, s2.Header{Name: nameBFLast, Value: valueTrue})
		}
	}
	if e.CommitMs >= 0 {
		ms := uint64(e.CommitMs)
		r.Timestamp = &ms
	}
	return r
}
