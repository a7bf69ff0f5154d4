package s2sink

import (
	"strconv"

	"github.com/nats-io/nats.go"
	"github.com/s2-streamstore/s2-sdk-go/s2"

	"github.com/pgs2/pgs2/pkg/bus"
)

// S2 record header names.
const (
	HeaderIdempotencyKey = "idempotency-key"
	HeaderAction         = "action"
	HeaderTable          = "table"
)

// Record builds the S2 record of a delivery message: its body, headers
// idempotency-key, action and table (so readers can drop duplicates and
// route without parsing), and the commit time in ms as the timestamp.
//
// seq, the message's delivery-stream sequence, goes in the pgs2-seq header:
// it is where delivery resumes (Client.Progress).
func Record(h nats.Header, body []byte, seq uint64) s2.AppendRecord {
	r := s2.AppendRecord{
		Body: body,
		Headers: []s2.Header{
			s2.NewHeader(HeaderIdempotencyKey, h.Get(bus.HeaderKey)),
			s2.NewHeader(HeaderAction, h.Get(bus.HeaderAction)),
			s2.NewHeader(HeaderTable, h.Get(bus.HeaderTable)),
			s2.NewHeader(HeaderSeq, strconv.FormatUint(seq, 10)),
		},
	}
	if ms, err := strconv.ParseUint(h.Get(bus.HeaderCommitMs), 10, 64); err == nil {
		r.Timestamp = &ms
	}
	return r
}
