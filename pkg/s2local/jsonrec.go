package s2local

import (
	"encoding/base64"
	"encoding/json"
	"strconv"
	"strings"
	"unicode/utf8"
)

// JSON record formats. S2's s2-format header says how record bytes (header
// names and values, bodies) are JSON strings: "raw" (default; the UTF-8
// bytes of the string) or "base64".

type format int

const (
	formatRaw format = iota
	formatBase64
)

func parseFormat(v string) (format, *apiError) {
	switch strings.TrimSpace(v) {
	case "", "raw", "json":
		return formatRaw, nil
	case "base64", "json-binsafe":
		return formatBase64, nil
	}
	return 0, errorf(codeBadHeader, "s2-format: %q is not \"raw\" or \"base64\"", v)
}

func (f format) decode(s string) ([]byte, *apiError) {
	if f == formatRaw {
		return []byte(s), nil
	}
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return nil, errorf(codeInvalid, "invalid Base64 encoding")
	}
	return b, nil
}

type jsonAppendRecord struct {
	Timestamp *uint64    `json:"timestamp"`
	Headers   [][]string `json:"headers"`
	Body      string     `json:"body"`
}

type jsonAppendInput struct {
	Records      *[]jsonAppendRecord `json:"records"`
	MatchSeqNum  *uint64             `json:"match_seq_num"`
	FencingToken *string             `json:"fencing_token"`
}

// decodeAppendJSON parses S2's JSON AppendInput into b.
func decodeAppendJSON(data []byte, f format, b *batchBuilder) (appendRequest, *apiError) {
	var req appendRequest
	var in jsonAppendInput
	if err := json.Unmarshal(data, &in); err != nil {
		return req, errorf(codeBadJSON, "invalid AppendInput: %v", err)
	}
	if in.Records == nil {
		return req, errorf(codeBadJSON, "invalid AppendInput: missing field `records`")
	}
	for i, r := range *in.Records {
		for _, h := range r.Headers {
			if len(h) != 2 {
				return req, errorf(codeBadJSON, "invalid AppendInput: records[%d]: a header is an array of 2 strings [name, value]", i)
			}
		}
	}
	for _, r := range *in.Records {
		var ts uint64
		if r.Timestamp != nil {
			ts = *r.Timestamp
		}
		if e := b.beginRecord(ts, r.Timestamp != nil); e != nil {
			return req, e
		}
		for _, h := range r.Headers {
			name, e := f.decode(h[0])
			if e != nil {
				return req, e
			}
			value, e := f.decode(h[1])
			if e != nil {
				return req, e
			}
			b.header(name, value)
		}
		body, e := f.decode(r.Body)
		if e != nil {
			return req, e
		}
		if e := b.endRecord(body); e != nil {
			return req, e
		}
	}
	if in.MatchSeqNum != nil {
		req.matchSeq, req.hasMatch = *in.MatchSeqNum, true
	}
	if in.FencingToken != nil {
		req.fence, req.hasFence = *in.FencingToken, true
	}
	return req, nil
}

// appendBytesJSON appends record bytes as a JSON string in format f.
func appendBytesJSON(buf []byte, f format, s []byte) []byte {
	if f == formatBase64 {
		buf = append(buf, '"')
		buf = base64.StdEncoding.AppendEncode(buf, s)
		return append(buf, '"')
	}
	const hex = "0123456789abcdef"
	buf = append(buf, '"')
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			switch {
			case c == '"' || c == '\\':
				buf = append(buf, '\\', c)
			case c == '\n':
				buf = append(buf, '\\', 'n')
			case c == '\r':
				buf = append(buf, '\\', 'r')
			case c == '\t':
				buf = append(buf, '\\', 't')
			case c < 0x20:
				buf = append(buf, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
			default:
				buf = append(buf, c)
			}
			i++
			continue
		}
		r, n := utf8.DecodeRune(s[i:])
		if r == utf8.RuneError && n == 1 {
			buf = append(buf, "\ufffd"...) // as S2's from_utf8_lossy
		} else {
			buf = append(buf, s[i:i+n]...)
		}
		i += n
	}
	return append(buf, '"')
}

// appendReadBatchJSON encodes S2's JSON ReadBatch.
func appendReadBatchJSON(buf []byte, f format, recs []recordRef, tail *position) []byte {
	buf = append(buf, `{"records":[`...)
	for i, rr := range recs {
		if i > 0 {
			buf = append(buf, ',')
		}
		buf = append(buf, `{"seq_num":`...)
		buf = strconv.AppendUint(buf, rr.seq, 10)
		buf = append(buf, `,"timestamp":`...)
		buf = strconv.AppendUint(buf, rr.rec.ts, 10)
		nh := 0
		body, _ := decodeRest(rr.rec.rest, func(name, value []byte) {
			if nh == 0 {
				buf = append(buf, `,"headers":[`...)
			} else {
				buf = append(buf, ',')
			}
			nh++
			buf = append(buf, '[')
			buf = appendBytesJSON(buf, f, name)
			buf = append(buf, ',')
			buf = appendBytesJSON(buf, f, value)
			buf = append(buf, ']')
		})
		if nh > 0 {
			buf = append(buf, ']')
		}
		if len(body) > 0 {
			buf = append(buf, `,"body":`...)
			buf = appendBytesJSON(buf, f, body)
		}
		buf = append(buf, '}')
	}
	buf = append(buf, ']')
	if tail != nil {
		buf = append(buf, `,"tail":`...)
		buf = append(buf, tail.json()...)
	}
	return append(buf, '}')
}
