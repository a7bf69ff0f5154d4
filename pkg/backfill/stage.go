package backfill

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/nats-io/nats.go/jetstream"
)

// Staged is a chunk as capture stages it before its high watermark: what
// the reader needs to place its rows at the watermark, in the same order
// with the same values, whether it reads it from memory or, replaying
// after a restart, from the object store.
type Staged struct {
	// Schema and Name are the table's.
	Schema, Name string
	// Sink is the only sink the rows are for.
	Sink string
	// Shape is the columns and types the rows were read with
	// (pgrepl.ReadEncoder.Shape): the reader's encoder must have the same.
	Shape string
	// Cursor is the primary key of the chunk's last row (the one before
	// when the chunk is empty): where the next chunk starts.
	Cursor [][]byte
	// Last: no rows follow in the table.
	Last bool
	// ReadAt is when the rows were read (µs since the Unix epoch, the
	// server's clock).
	ReadAt int64
	// Rows are text values in the shape's column order (nil = NULL).
	Rows [][][]byte
}

const stagedVersion = 1

// MarshalBinary encodes s.
func (s *Staged) MarshalBinary() ([]byte, error) {
	n := 64 + len(s.Schema) + len(s.Name) + len(s.Sink) + len(s.Shape)
	for _, r := range s.Rows {
		for _, v := range r {
			n += len(v) + 2
		}
	}
	b := make([]byte, 0, n)
	b = append(b, stagedVersion)
	b = appendBytes(b, []byte(s.Schema))
	b = appendBytes(b, []byte(s.Name))
	b = appendBytes(b, []byte(s.Sink))
	b = appendBytes(b, []byte(s.Shape))
	b = appendValues(b, s.Cursor)
	last := byte(0)
	if s.Last {
		last = 1
	}
	b = append(b, last)
	b = binary.AppendVarint(b, s.ReadAt)
	b = binary.AppendUvarint(b, uint64(len(s.Rows)))
	for _, r := range s.Rows {
		b = appendValues(b, r)
	}
	return b, nil
}

func appendBytes(b, v []byte) []byte { return append(binary.AppendUvarint(b, uint64(len(v))), v...) }

// appendValues writes a count, then each value's length + 1 (0 = NULL).
func appendValues(b []byte, vals [][]byte) []byte {
	b = binary.AppendUvarint(b, uint64(len(vals)))
	for _, v := range vals {
		if v == nil {
			b = append(b, 0)
			continue
		}
		b = append(binary.AppendUvarint(b, uint64(len(v))+1), v...)
	}
	return b
}

// ErrBadStaged means a staged chunk could not be decoded.
var ErrBadStaged = errors.New("bad staged chunk")

// UnmarshalBinary decodes what MarshalBinary wrote.
func (s *Staged) UnmarshalBinary(b []byte) error {
	d := decoder{b: b}
	if v := d.byte(); v != stagedVersion {
		return fmt.Errorf("%w: version %d", ErrBadStaged, v)
	}
	s.Schema = string(d.bytes())
	s.Name = string(d.bytes())
	s.Sink = string(d.bytes())
	s.Shape = string(d.bytes())
	s.Cursor = d.values()
	s.Last = d.byte() == 1
	s.ReadAt = d.varint()
	n := d.uvarint()
	if n > uint64(len(b)) {
		return fmt.Errorf("%w: %d rows in %d bytes", ErrBadStaged, n, len(b))
	}
	s.Rows = make([][][]byte, 0, n)
	for range n {
		s.Rows = append(s.Rows, d.values())
	}
	if d.err != nil {
		return d.err
	}
	return nil
}

type decoder struct {
	b   []byte
	err error
}

func (d *decoder) fail() {
	if d.err == nil {
		d.err = fmt.Errorf("%w: truncated", ErrBadStaged)
	}
	d.b = nil
}

func (d *decoder) byte() byte {
	if len(d.b) == 0 {
		d.fail()
		return 0
	}
	v := d.b[0]
	d.b = d.b[1:]
	return v
}

func (d *decoder) uvarint() uint64 {
	v, k := binary.Uvarint(d.b)
	if k <= 0 {
		d.fail()
		return 0
	}
	d.b = d.b[k:]
	return v
}

func (d *decoder) varint() int64 {
	v, k := binary.Varint(d.b)
	if k <= 0 {
		d.fail()
		return 0
	}
	d.b = d.b[k:]
	return v
}

func (d *decoder) take(n uint64) []byte {
	if n > uint64(len(d.b)) {
		d.fail()
		return nil
	}
	v := d.b[:n:n]
	d.b = d.b[n:]
	return v
}

func (d *decoder) bytes() []byte { return d.take(d.uvarint()) }

func (d *decoder) values() [][]byte {
	n := d.uvarint()
	if n > uint64(len(d.b)) {
		d.fail()
		return nil
	}
	vals := make([][]byte, 0, n)
	for range n {
		l := d.uvarint()
		if l == 0 {
			vals = append(vals, nil)
			continue
		}
		vals = append(vals, d.take(l-1))
	}
	return vals
}

// StageBucket is the object store of staged chunks: a chunk's rows stay
// there from just before its high watermark until they are durable in the
// changes stream, so a capture restarted in between places the same rows
// at the same watermark.
const StageBucket = "PGS2_BACKFILL_ROWS"

// Stage stores staged chunks.
type Stage struct{ os jetstream.ObjectStore }

// EnsureStage creates or updates the object store.
func EnsureStage(ctx context.Context, js jetstream.JetStream, replicas int) (*Stage, error) {
	os, err := js.CreateOrUpdateObjectStore(ctx, jetstream.ObjectStoreConfig{Bucket: StageBucket, Replicas: replicas,
		Storage: jetstream.FileStorage, Description: "pgs2: backfill chunks between their high watermark and their rows' publication"})
	if err != nil {
		return nil, fmt.Errorf("create or update object store %s: %w", StageBucket, err)
	}
	return &Stage{os: os}, nil
}

// StageName names chunk id of source's job.
func StageName(source string, id ChunkID) string {
	return ProgressKey(id.Job, source, id.Table) + "." + fmt.Sprint(id.Chunk)
}

// Put stores a chunk.
func (st *Stage) Put(ctx context.Context, name string, s *Staged) error {
	b, _ := s.MarshalBinary()
	if _, err := st.os.PutBytes(ctx, name, b); err != nil {
		return fmt.Errorf("stage backfill chunk %s: %w", name, err)
	}
	return nil
}

// Get reads a chunk; nil without error when it is not staged (done, or
// never staged).
func (st *Stage) Get(ctx context.Context, name string) (*Staged, error) {
	r, err := st.os.Get(ctx, name)
	if errors.Is(err, jetstream.ErrObjectNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read staged backfill chunk %s: %w", name, err)
	}
	defer r.Close()
	var buf bytes.Buffer
	if _, err := io.Copy(&buf, r); err != nil {
		return nil, fmt.Errorf("read staged backfill chunk %s: %w", name, err)
	}
	s := &Staged{}
	if err := s.UnmarshalBinary(buf.Bytes()); err != nil {
		return nil, fmt.Errorf("staged backfill chunk %s: %w", name, err)
	}
	return s, nil
}

// Delete drops a chunk (no error when it is not there).
func (st *Stage) Delete(ctx context.Context, name string) error {
	if err := st.os.Delete(ctx, name); err != nil && !errors.Is(err, jetstream.ErrObjectNotFound) {
		return fmt.Errorf("drop staged backfill chunk %s: %w", name, err)
	}
	return nil
}
