package s2local

import (
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protowire"
)

// Hand-written protobuf codecs for the messages of S2's s2.proto on the hot
// paths (the SDK's generated types are used by the tests to check them):
// parsing AppendInput straight into a batch frame and encoding ReadBatch
// straight from stored records avoids per-record allocations.

// appendRequest is what an AppendInput asks besides its records.
type appendRequest struct {
	matchSeq uint64
	hasMatch bool
	fence    string
	hasFence bool
}

func badProto(what string) *apiError { return errorf(codeBadProto, "invalid AppendInput: %s", what) }

// decodeAppendProto parses an s2.v1.AppendInput into b.
func decodeAppendProto(data []byte, b *batchBuilder) (appendRequest, *apiError) {
	var req appendRequest
	for len(data) > 0 {
		num, typ, n := protowire.ConsumeTag(data)
		if n < 0 {
			return req, badProto("bad tag")
		}
		data = data[n:]
		switch {
		case num == 1 && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(data)
			if n < 0 {
				return req, badProto("truncated record")
			}
			data = data[n:]
			if e := decodeRecordProto(v, b); e != nil {
				return req, e
			}
		case num == 2 && typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(data)
			if n < 0 {
				return req, badProto("bad match_seq_num")
			}
			data = data[n:]
			req.matchSeq, req.hasMatch = v, true
		case num == 3 && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(data)
			if n < 0 || !utf8.Valid(v) {
				return req, badProto("bad fencing_token")
			}
			data = data[n:]
			req.fence, req.hasFence = string(v), true
		case num >= 1 && num <= 3:
			return req, badProto("wrong wire type")
		default:
			n := protowire.ConsumeFieldValue(num, typ, data)
			if n < 0 {
				return req, badProto("bad field")
			}
			data = data[n:]
		}
	}
	return req, nil
}

// decodeRecordProto parses an s2.v1.AppendRecord into b: a first pass finds
// the timestamp and body (fields may come in any order), a second emits the
// headers in order.
func decodeRecordProto(m []byte, b *batchBuilder) *apiError {
	var ts uint64
	var hasTS bool
	var body []byte
	p := m
	for len(p) > 0 {
		num, typ, n := protowire.ConsumeTag(p)
		if n < 0 {
			return badProto("bad record tag")
		}
		p = p[n:]
		switch {
		case num == 1 && typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(p)
			if n < 0 {
				return badProto("bad timestamp")
			}
			p = p[n:]
			ts, hasTS = v, true
		case (num == 2 || num == 3) && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(p)
			if n < 0 {
				return badProto("truncated record field")
			}
			p = p[n:]
			if num == 3 {
				body = v
			}
		case num >= 1 && num <= 3:
			return badProto("wrong wire type in record")
		default:
			n := protowire.ConsumeFieldValue(num, typ, p)
			if n < 0 {
				return badProto("bad record field")
			}
			p = p[n:]
		}
	}
	if e := b.beginRecord(ts, hasTS); e != nil {
		return e
	}
	p = m
	for len(p) > 0 {
		num, typ, n := protowire.ConsumeTag(p)
		p = p[n:]
		if num != 2 || typ != protowire.BytesType {
			p = p[protowire.ConsumeFieldValue(num, typ, p):]
			continue
		}
		h, n := protowire.ConsumeBytes(p)
		p = p[n:]
		var name, value []byte
		for len(h) > 0 {
			hn, ht, k := protowire.ConsumeTag(h)
			if k < 0 {
				return badProto("bad header tag")
			}
			h = h[k:]
			if (hn == 1 || hn == 2) && ht == protowire.BytesType {
				x, k := protowire.ConsumeBytes(h)
				if k < 0 {
					return badProto("truncated header")
				}
				h = h[k:]
				if hn == 1 {
					name = x
				} else {
					value = x
				}
				continue
			}
			if hn == 1 || hn == 2 {
				return badProto("wrong wire type in header")
			}
			k = protowire.ConsumeFieldValue(hn, ht, h)
			if k < 0 {
				return badProto("bad header field")
			}
			h = h[k:]
		}
		b.header(name, value)
	}
	return b.endRecord(body)
}

func sizePos(p position) int {
	n := 0
	if p.seq != 0 {
		n += 1 + protowire.SizeVarint(p.seq)
	}
	if p.ts != 0 {
		n += 1 + protowire.SizeVarint(p.ts)
	}
	return n
}

func appendPosFields(buf []byte, p position) []byte {
	if p.seq != 0 {
		buf = protowire.AppendTag(buf, 1, protowire.VarintType)
		buf = protowire.AppendVarint(buf, p.seq)
	}
	if p.ts != 0 {
		buf = protowire.AppendTag(buf, 2, protowire.VarintType)
		buf = protowire.AppendVarint(buf, p.ts)
	}
	return buf
}

// appendPosMsg appends a StreamPosition as message field num.
func appendPosMsg(buf []byte, num protowire.Number, p position) []byte {
	buf = protowire.AppendTag(buf, num, protowire.BytesType)
	buf = protowire.AppendVarint(buf, uint64(sizePos(p)))
	return appendPosFields(buf, p)
}

// appendAck is an append's acknowledgement.
type appendAck struct{ start, end, tail position }

// encodeAckProto encodes an s2.v1.AppendAck.
func encodeAckProto(buf []byte, a appendAck) []byte {
	buf = appendPosMsg(buf, 1, a.start)
	buf = appendPosMsg(buf, 2, a.end)
	return appendPosMsg(buf, 3, a.tail)
}

func (a appendAck) json() string {
	return `{"start":` + a.start.json() + `,"end":` + a.end.json() + `,"tail":` + a.tail.json() + `}`
}

// appendRecordProto appends one s2.v1.SequencedRecord as ReadBatch field 1.
func appendRecordProto(buf []byte, seq uint64, r storedRecord) []byte {
	p := position{seq, r.ts}
	buf = protowire.AppendTag(buf, 1, protowire.BytesType)
	buf = protowire.AppendVarint(buf, uint64(sizePos(p)+len(r.rest)))
	buf = appendPosFields(buf, p)
	return append(buf, r.rest...)
}

// appendTailProto appends ReadBatch's tail (field 2).
func appendTailProto(buf []byte, tail position) []byte { return appendPosMsg(buf, 2, tail) }
