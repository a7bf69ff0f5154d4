package s2sink

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	"github.com/s2-streamstore/s2-sdk-go/s2"

	"github.com/pgs2/pgs2/pkg/bus"
)

// S2 record headers that carry delivery's progress with the data.
const (
	// HeaderSeq is on every record delivery appends: the delivery-stream
	// position ("<stream>:<seq>.<index>", bus.DeliveryPos) the record came
	// from.
	HeaderSeq = "pgs2-seq"
	// HeaderThrough is on the last record of every batch: the resume point,
	// a position per delivery stream (bus.Progress), since an S2 stream
	// takes the changes of every source's delivery stream, and a drained
	// park's records carry older positions, appended after newer ones.
	HeaderThrough = "pgs2-through"
	// HeaderPark is on the last record of a batch drained from a park:
	// which park messages the batch holds, so that a writer that stopped
	// before removing them from the park does so on its next start.
	HeaderPark = "pgs2-park"
)

var (
	nameThrough = []byte(HeaderThrough)
	namePark    = []byte(HeaderPark)
)

// WithResume adds the resume point (and the drained park prefix, when not
// "") to a batch's last record: a copy of r with a header slice of its own.
// Call it before adding the record to a Batch, which meters its headers,
// or use Batch.Seal.
func WithResume(r s2.AppendRecord, through bus.Progress, park string) s2.AppendRecord {
	h := make([]s2.Header, len(r.Headers), len(r.Headers)+2)
	copy(h, r.Headers)
	h = append(h, s2.Header{Name: nameThrough, Value: []byte(through.String())})
	if park != "" {
		h = append(h, s2.Header{Name: namePark, Value: []byte(park)})
	}
	r.Headers = h
	return r
}

// ResumeRoom is what WithResume adds to a record's metered size, at most,
// for a resume point over streams (their StreamKeys) and a park reference
// of parkRef bytes.
func ResumeRoom(streams []string, parkRef int) int {
	n := 2 + len(HeaderThrough)
	for _, k := range streams {
		n += len(k) + 1 + 20 + 1 + 10 + 1 // key:seq.idx,
	}
	if parkRef > 0 {
		n += 2 + len(HeaderPark) + parkRef
	}
	return n
}

// Read returns up to count records of a stream from seq_num seq on (fewer
// when they exceed S2's 1 MiB per read).
func (c *Client) Read(ctx context.Context, basin, stream string, seq uint64, count int) ([]s2.SequencedRecord, error) {
	var ra atomic.Int64
	rctx := context.WithValue(ctx, retryAfterKey{}, &ra)
	n := uint64(count)
	b, err := c.sdk.Basin(basin).Stream(s2.StreamName(stream)).Read(rctx, &s2.ReadOptions{SeqNum: &seq, Count: &n})
	if err != nil {
		return nil, classify(fmt.Sprintf("read %s/%s from %d", basin, stream, seq), err, time.Duration(ra.Load())*time.Millisecond)
	}
	return b.Records, nil
}

// Resume is where delivery resumes on a stream.
type Resume struct {
	// Tail is the seq_num the next appended record gets.
	Tail uint64
	// Found is false when the stream holds no record delivery wrote.
	Found bool
	// Through is the resume point: every change at or before it is in
	// the stream (or in a park).
	Through bus.Progress
	// Park is the HeaderPark of the last record ("" when it has none).
	Park string
}

// RecordReader reads a stream's records (Client does).
type RecordReader interface {
	Tail(ctx context.Context, basin, stream string) (uint64, error)
	Read(ctx context.Context, basin, stream string, seq uint64, count int) ([]s2.SequencedRecord, error)
}

// FindResume finds the last record delivery appended — searching back from
// the tail past command records (fences) and other writers' records,
// whatever their number and size — and reads the resume point from it.
func FindResume(ctx context.Context, rd RecordReader, basin, stream string) (Resume, error) {
	tail, err := rd.Tail(ctx, basin, stream)
	if err != nil {
		return Resume{}, err
	}
	res := Resume{Tail: tail, Through: bus.Progress{}}
	rec, ok, err := lastOurs(ctx, rd, basin, stream, 0, tail)
	if err != nil || !ok {
		return res, err
	}
	var seq, through string
	for _, h := range rec.Headers {
		switch string(h.Name) {
		case HeaderSeq:
			seq = string(h.Value)
		case HeaderThrough:
			through = string(h.Value)
		case HeaderPark:
			res.Park = string(h.Value)
		}
	}
	if through == "" {
		through = seq
	}
	res.Found = true
	if !strings.Contains(through, ":") {
		// A position of pgs2 before delivery streams per source
		// ("<seq>.<idx>"), of a stream it now refuses: the new streams
		// are read from their start.
		return res, nil
	}
	if res.Through, err = bus.ParseProgress(through); err != nil {
		return Resume{}, fmt.Errorf("record %d of %s/%s: %w", rec.SeqNum, basin, stream, err)
	}
	if pos, err := bus.ParseDeliveryPos(seq); err == nil {
		res.Through.Advance(pos) // the record itself is in the stream
	}
	return res, nil
}

// ours reports whether delivery appended the record.
func ours(r *s2.SequencedRecord) bool {
	for _, h := range r.Headers {
		if string(h.Name) == HeaderSeq {
			return true
		}
	}
	return false
}

// maxReadCount is S2's limit of records per read.
const maxReadCount = 1000

// lastOurs returns the last of delivery's records in [lo, hi). It reads
// windows backwards from hi, doubling in size, so that a long run of
// small records (fences) costs few reads; a read that S2 cuts short at
// 1 MiB is followed by a search of the unread part of its window first,
// so no read holds more than one large record beyond what it needs.
func lastOurs(ctx context.Context, rd RecordReader, basin, stream string, lo, hi uint64) (s2.SequencedRecord, bool, error) {
	end := hi
	for w := uint64(1); end > lo; w = min(2*w, maxReadCount) {
		start := end - min(w, end-lo)
		recs, err := rd.Read(ctx, basin, stream, start, int(end-start))
		if err != nil {
			return s2.SequencedRecord{}, false, err
		}
		n := 0
		for n < len(recs) && recs[n].SeqNum < end {
			n++
		}
		recs = recs[:n]
		if n == 0 { // nothing in [start, end): trimmed away, so nothing older remains
			return s2.SequencedRecord{}, false, nil
		}
		if got := recs[n-1].SeqNum + 1; got < end {
			if r, ok, err := lastOurs(ctx, rd, basin, stream, got, end); err != nil || ok {
				return r, ok, err
			}
		}
		for i := n - 1; i >= 0; i-- {
			if ours(&recs[i]) {
				return recs[i], true, nil
			}
		}
		if recs[0].SeqNum > start { // the stream begins (is trimmed) above start
			return s2.SequencedRecord{}, false, nil
		}
		end = start
	}
	return s2.SequencedRecord{}, false, nil
}

// ThroughHeader is the pgs2-through header of a resume point (for
// Batch.Seal).
func ThroughHeader(through bus.Progress) s2.Header {
	return s2.Header{Name: nameThrough, Value: []byte(through.String())}
}
