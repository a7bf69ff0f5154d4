package s2local

import (
	"encoding/binary"
	"hash/crc32"
	"sync"
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protowire"
)

// S2's limits on an append batch (common/src/caps.rs): 1–1000 records and a
// metered size of at most 1 MiB, which also bounds a single record.
const (
	maxBatchRecords    = 1000
	maxBatchBytes      = 1 << 20
	maxFencingTokenLen = 36
)

// On-disk and in-memory format of an append batch: one frame per batch,
//
//	frame  = magic u32 | payloadLen u32 | crc32c u32 | count u32 | firstSeq u64 | payload
//	record = timestamp u64 | metered u32 | restLen u32 | rest
//	rest   = the record's headers and body as protobuf fields 3 and 4 of
//	         s2.v1.SequencedRecord (its fields 1 and 2, seq_num and
//	         timestamp, are added when read)
//
// All integers are big-endian. The CRC-32C covers count, firstSeq and the
// payload. A frame is written with one write(2): a batch is atomic on disk
// as in S2, and recovery drops a frame that is torn or fails its checksum.
const (
	frameMagic     = 0x53324c31 // "S2L1"
	frameHeaderLen = 24
	recPrefixLen   = 16
	// maxFramePayload bounds a frame's payload when recovering (a batch is
	// at most 1 MiB metered plus small per-record overhead).
	maxFramePayload = 4 << 20
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Command records (common/src/record/command.rs): exactly one header with an
// empty name whose value is the command; the body is its payload.
const (
	cmdFence = 1
	cmdTrim  = 2
)

type command struct {
	index int // record index in the batch
	op    int
	token string // fence
	trim  uint64 // trim
}

type recInfo struct {
	off   int // offset of the record prefix in buf
	ts    uint64
	hasTS bool
}

// batchBuilder encodes an append batch straight into its frame, validating
// S2's limits as it goes. Builders are pooled; the frame is written as is.
type batchBuilder struct {
	buf     []byte
	recs    []recInfo
	cmds    []command
	metered int

	// record in progress
	nHeaders    int
	headerBytes int
	emptyName   bool
	firstValue  []byte
}

var builderPool = sync.Pool{New: func() any { return &batchBuilder{buf: make([]byte, 0, 64<<10)} }}

func getBuilder() *batchBuilder {
	b := builderPool.Get().(*batchBuilder)
	b.buf = append(b.buf[:0], make([]byte, frameHeaderLen)...)
	b.recs = b.recs[:0]
	b.cmds = b.cmds[:0]
	b.metered = 0
	return b
}

func putBuilder(b *batchBuilder) {
	if cap(b.buf) > 8<<20 {
		return
	}
	b.firstValue = nil
	builderPool.Put(b)
}

// beginRecord starts a record; ts is the client's timestamp if hasTS.
func (b *batchBuilder) beginRecord(ts uint64, hasTS bool) *apiError {
	if len(b.recs) == maxBatchRecords {
		return errorf(codeInvalid, "record batch must not exceed %d records", maxBatchRecords)
	}
	b.recs = append(b.recs, recInfo{off: len(b.buf), ts: ts, hasTS: hasTS})
	b.buf = append(b.buf, make([]byte, recPrefixLen)...)
	b.nHeaders, b.headerBytes, b.emptyName, b.firstValue = 0, 0, false, nil
	return nil
}

// header adds a header to the record in progress (as field 3, a Header
// message with name = 1 and value = 2).
func (b *batchBuilder) header(name, value []byte) {
	if b.nHeaders == 0 {
		b.firstValue = value
	}
	if len(name) == 0 {
		b.emptyName = true
	}
	b.nHeaders++
	b.headerBytes += len(name) + len(value)
	n := 0
	if len(name) > 0 {
		n += 1 + protowire.SizeBytes(len(name))
	}
	if len(value) > 0 {
		n += 1 + protowire.SizeBytes(len(value))
	}
	b.buf = protowire.AppendTag(b.buf, 3, protowire.BytesType)
	b.buf = protowire.AppendVarint(b.buf, uint64(n))
	if len(name) > 0 {
		b.buf = protowire.AppendTag(b.buf, 1, protowire.BytesType)
		b.buf = protowire.AppendBytes(b.buf, name)
	}
	if len(value) > 0 {
		b.buf = protowire.AppendTag(b.buf, 2, protowire.BytesType)
		b.buf = protowire.AppendBytes(b.buf, value)
	}
}

// endRecord adds the body (field 4), validates the record and finishes its
// prefix.
func (b *batchBuilder) endRecord(body []byte) *apiError {
	if len(body) > 0 {
		b.buf = protowire.AppendTag(b.buf, 4, protowire.BytesType)
		b.buf = protowire.AppendBytes(b.buf, body)
	}
	i := len(b.recs) - 1
	r := b.recs[i]
	metered := 8 + 2*b.nHeaders + b.headerBytes + len(body)
	if metered > maxBatchBytes {
		return errorf(codeInvalid, "record must not exceed a metered size of 1 MiB, got %d bytes", metered)
	}
	b.metered += metered
	if b.metered > maxBatchBytes {
		return errorf(codeInvalid, "record batch must not exceed a metered size of 1 MiB")
	}
	if b.emptyName {
		if b.nHeaders != 1 {
			return errorf(codeInvalid, "invalid header: empty name")
		}
		c := command{index: i}
		switch string(b.firstValue) {
		case "fence":
			if len(body) > maxFencingTokenLen {
				return errorf(codeInvalid, "invalid `fence` command: fencing token must not exceed %d bytes in length", maxFencingTokenLen)
			}
			if !utf8.Valid(body) {
				return errorf(codeInvalid, "invalid `fence` command: invalid UTF-8")
			}
			c.op, c.token = cmdFence, string(body)
		case "trim":
			if len(body) != 8 {
				return errorf(codeInvalid, "invalid `trim` command: earliest sequence number to trim to was %d bytes, must be 8", len(body))
			}
			c.op, c.trim = cmdTrim, binary.BigEndian.Uint64(body)
		default:
			return errorf(codeInvalid, "unknown command")
		}
		b.cmds = append(b.cmds, c)
	}
	binary.BigEndian.PutUint32(b.buf[r.off+8:], uint32(metered))
	binary.BigEndian.PutUint32(b.buf[r.off+12:], uint32(len(b.buf)-r.off-recPrefixLen))
	return nil
}

// validate checks the batch as a whole.
func (b *batchBuilder) validate() *apiError {
	if len(b.recs) == 0 {
		return errorf(codeInvalid, "record batch must not be empty")
	}
	return nil
}

func (b *batchBuilder) setTimestamp(i int, ts uint64) {
	binary.BigEndian.PutUint64(b.buf[b.recs[i].off:], ts)
}

// frame fills in the frame header for a batch starting at firstSeq.
func (b *batchBuilder) frame(firstSeq uint64) []byte {
	h := b.buf[:frameHeaderLen]
	binary.BigEndian.PutUint32(h[0:], frameMagic)
	binary.BigEndian.PutUint32(h[4:], uint32(len(b.buf)-frameHeaderLen))
	binary.BigEndian.PutUint32(h[12:], uint32(len(b.recs)))
	binary.BigEndian.PutUint64(h[16:], firstSeq)
	binary.BigEndian.PutUint32(h[8:], crc32.Checksum(b.buf[12:], castagnoli))
	return b.buf
}

// --- reading frames --------------------------------------------------------

// frameHeader is a parsed frame header.
type frameHeader struct {
	payloadLen int
	crc        uint32
	count      int
	firstSeq   uint64
}

func parseFrameHeader(h []byte) (frameHeader, bool) {
	if len(h) < frameHeaderLen || binary.BigEndian.Uint32(h) != frameMagic {
		return frameHeader{}, false
	}
	fh := frameHeader{
		payloadLen: int(binary.BigEndian.Uint32(h[4:])),
		crc:        binary.BigEndian.Uint32(h[8:]),
		count:      int(binary.BigEndian.Uint32(h[12:])),
		firstSeq:   binary.BigEndian.Uint64(h[16:]),
	}
	if fh.payloadLen > maxFramePayload || fh.count == 0 || fh.count > maxBatchRecords {
		return frameHeader{}, false
	}
	return fh, true
}

// storedRecord is a record as stored, seen in place.
type storedRecord struct {
	ts      uint64
	metered int
	rest    []byte
}

// nextRecord reads the record at the start of p; n is its stored size.
func nextRecord(p []byte) (r storedRecord, n int, ok bool) {
	if len(p) < recPrefixLen {
		return r, 0, false
	}
	r.ts = binary.BigEndian.Uint64(p)
	r.metered = int(binary.BigEndian.Uint32(p[8:]))
	restLen := int(binary.BigEndian.Uint32(p[12:]))
	if restLen > len(p)-recPrefixLen {
		return r, 0, false
	}
	r.rest = p[recPrefixLen : recPrefixLen+restLen]
	return r, recPrefixLen + restLen, true
}

// decodeRest walks a stored record's headers and body.
func decodeRest(rest []byte, header func(name, value []byte)) (body []byte, ok bool) {
	for len(rest) > 0 {
		num, typ, n := protowire.ConsumeTag(rest)
		if n < 0 || typ != protowire.BytesType {
			return nil, false
		}
		rest = rest[n:]
		v, n := protowire.ConsumeBytes(rest)
		if n < 0 {
			return nil, false
		}
		rest = rest[n:]
		switch num {
		case 3:
			var name, value []byte
			for len(v) > 0 {
				hn, ht, k := protowire.ConsumeTag(v)
				if k < 0 || ht != protowire.BytesType {
					return nil, false
				}
				v = v[k:]
				x, k := protowire.ConsumeBytes(v)
				if k < 0 {
					return nil, false
				}
				v = v[k:]
				if hn == 1 {
					name = x
				} else if hn == 2 {
					value = x
				}
			}
			if header != nil {
				header(name, value)
			}
		case 4:
			body = v
		}
	}
	return body, true
}

// storedCommand reports the command a stored record carries, if any.
func storedCommand(rest []byte) (c command, ok bool) {
	n, emptyName := 0, false
	var value []byte
	body, valid := decodeRest(rest, func(name, v []byte) {
		n++
		if len(name) == 0 {
			emptyName, value = true, v
		}
	})
	if !valid || n != 1 || !emptyName {
		return c, false
	}
	switch string(value) {
	case "fence":
		return command{op: cmdFence, token: string(body)}, true
	case "trim":
		if len(body) == 8 {
			return command{op: cmdTrim, trim: binary.BigEndian.Uint64(body)}, true
		}
	}
	return c, false
}
