package s2sink

import (
	"errors"
	"fmt"

	"github.com/s2-streamstore/s2-sdk-go/s2"
)

// S2's limits per append.
const (
	MaxBatchRecords = 1000
	MaxBatchBytes   = 1 << 20 // metered bytes, per batch and per record
)

// MeteredSize is S2's size of a record: 8 + 2 per header + the lengths of
// header names, values and the body.
func MeteredSize(headers []s2.Header, body []byte) int {
	n := 8 + 2*len(headers) + len(body)
	for _, h := range headers {
		n += len(h.Name) + len(h.Value)
	}
	return n
}

// ErrRecordTooLarge means one record exceeds S2's 1 MiB limit on its own:
// it can never be appended as it is, so delivery isolates it.
var ErrRecordTooLarge = errors.New("record larger than S2's 1 MiB limit")

// ErrBatchFull means the record does not fit in this batch; flush and add
// it to the next.
var ErrBatchFull = errors.New("batch full")

// Batch is an append batch within limits. The zero value is not usable;
// use NewBatch.
type Batch struct {
	maxRecords, maxBytes int
	reserve              int // room kept for Seal's headers
	records              []s2.AppendRecord
	bytes                int
}

// NewBatch returns an empty batch that holds at most maxRecords records and
// maxBytes metered bytes (each capped at S2's limits; 0 = the limit).
func NewBatch(maxRecords, maxBytes int) *Batch {
	if maxRecords <= 0 || maxRecords > MaxBatchRecords {
		maxRecords = MaxBatchRecords
	}
	if maxBytes <= 0 || maxBytes > MaxBatchBytes {
		maxBytes = MaxBatchBytes
	}
	return &Batch{maxRecords: maxRecords, maxBytes: maxBytes, records: make([]s2.AppendRecord, 0, min(maxRecords, 8))}
}

// Add appends a record: ErrRecordTooLarge when it can never fit in any
// batch, ErrBatchFull when it does not fit in this one. The batch keeps the
// slices it is given.
func (b *Batch) Add(r s2.AppendRecord) error {
	size := MeteredSize(r.Headers, r.Body)
	if size+b.reserve > MaxBatchBytes {
		return fmt.Errorf("%w: %d metered bytes, and %d for delivery's progress headers", ErrRecordTooLarge, size, b.reserve)
	}
	if len(b.records) >= b.maxRecords || (len(b.records) > 0 && b.bytes+size+b.reserve > b.maxBytes) {
		return ErrBatchFull
	}
	b.records = append(b.records, r)
	b.bytes += size
	return nil
}

// Reserve keeps n metered bytes free, in the batch and in every record,
// for the headers Seal adds to the last record.
func (b *Batch) Reserve(n int) { b.reserve = n }

// Seal adds headers to the batch's last record (a header slice of its
// own): at most the room Reserve kept.
func (b *Batch) Seal(headers ...s2.Header) error {
	if len(b.records) == 0 {
		return nil
	}
	last := &b.records[len(b.records)-1]
	before := MeteredSize(last.Headers, last.Body)
	h := make([]s2.Header, len(last.Headers), len(last.Headers)+len(headers))
	copy(h, last.Headers)
	h = append(h, headers...)
	grew := MeteredSize(h, last.Body) - before
	if grew > b.reserve {
		return fmt.Errorf("seal a batch: %d bytes of headers, %d reserved", grew, b.reserve)
	}
	last.Headers = h
	b.bytes += grew
	return nil
}

// Len is the number of records.
func (b *Batch) Len() int { return len(b.records) }

// Bytes is the metered size of the batch.
func (b *Batch) Bytes() int { return b.bytes }

// Records returns the batch's records.
func (b *Batch) Records() []s2.AppendRecord { return b.records }

// Reset empties the batch for reuse.
func (b *Batch) Reset() {
	clear(b.records)
	b.records = b.records[:0]
	b.bytes = 0
}
