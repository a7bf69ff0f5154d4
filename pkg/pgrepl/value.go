package pgrepl

import (
	"encoding/base64"
	"encoding/hex"
	"unicode/utf8"
)

// kind says how a column's text-format value becomes JSON.
type kind uint8

const (
	kindString      kind = iota // JSON string of the text
	kindInt                     // JSON number, verbatim
	kindFloat                   // JSON number; NaN/Infinity as strings
	kindNumeric                 // JSON number when float64 holds it exactly, else string
	kindBool                    // t/f → true/false
	kindJSON                    // embedded as is
	kindBytea                   // \x hex → base64 string
	kindTimestamp               // "2006-01-02 15:04:05" → "2006-01-02T15:04:05"
	kindTimestamptz             // "... +00" → RFC 3339 "...Z"
	kindArray                   // {a,b} → JSON array of elem
)

// pgType is how to render one Postgres type.
type pgType struct {
	kind  kind
	elem  *pgType // arrays
	delim byte    // arrays
}

// Built-in type OIDs (pg_type.dat).
const (
	oidBool        = 16
	oidBytea       = 17
	oidInt8        = 20
	oidInt2        = 21
	oidInt4        = 23
	oidOID         = 26
	oidJSON        = 114
	oidFloat4      = 700
	oidFloat8      = 701
	oidTimestamp   = 1114
	oidTimestamptz = 1184
	oidNumeric     = 1700
	oidJSONB       = 3802
)

var scalarKinds = map[uint32]kind{
	oidBool: kindBool, oidBytea: kindBytea, oidInt8: kindInt, oidInt2: kindInt, oidInt4: kindInt,
	oidOID: kindInt, oidJSON: kindJSON, oidJSONB: kindJSON, oidFloat4: kindFloat, oidFloat8: kindFloat,
	oidTimestamp: kindTimestamp, oidTimestamptz: kindTimestamptz, oidNumeric: kindNumeric,
	28 /* xid */ : kindInt,
}

// appendValue appends the JSON form of a text-format value of type t.
func appendValue(dst []byte, t *pgType, v []byte) []byte {
	switch t.kind {
	case kindInt:
		if isJSONInt(v) {
			return append(dst, v...)
		}
	case kindFloat:
		if isJSONNumber(v) {
			return append(dst, v...)
		}
	case kindNumeric:
		if isJSONNumber(v) && significantDigits(v) <= 15 {
			return append(dst, v...)
		}
	case kindBool:
		if len(v) == 1 {
			switch v[0] {
			case 't':
				return append(dst, "true"...)
			case 'f':
				return append(dst, "false"...)
			}
		}
	case kindJSON:
		if len(v) > 0 {
			return append(dst, v...)
		}
	case kindBytea:
		if len(v) >= 2 && v[0] == '\\' && v[1] == 'x' {
			raw := make([]byte, hex.DecodedLen(len(v)-2))
			if _, err := hex.Decode(raw, v[2:]); err == nil {
				dst = append(dst, '"')
				dst = base64.StdEncoding.AppendEncode(dst, raw)
				return append(dst, '"')
			}
		}
	case kindTimestamp, kindTimestamptz:
		return appendTimestamp(dst, v, t.kind == kindTimestamptz)
	case kindArray:
		if out, ok := appendArray(dst, t, v); ok {
			return out
		}
	}
	return appendString(dst, v)
}

func isJSONInt(v []byte) bool {
	if len(v) == 0 {
		return false
	}
	i := 0
	if v[0] == '-' {
		i++
	}
	if i == len(v) || (v[i] == '0' && len(v) > i+1) {
		return false
	}
	for ; i < len(v); i++ {
		if v[i] < '0' || v[i] > '9' {
			return false
		}
	}
	return true
}

// isJSONNumber reports whether v is a valid JSON number literal (so NaN,
// Infinity, "1." and ".5" are not).
func isJSONNumber(v []byte) bool {
	i, n := 0, len(v)
	if i < n && v[i] == '-' {
		i++
	}
	if i == n {
		return false
	}
	if v[i] == '0' {
		i++
	} else if v[i] >= '1' && v[i] <= '9' {
		for i < n && v[i] >= '0' && v[i] <= '9' {
			i++
		}
	} else {
		return false
	}
	if i < n && v[i] == '.' {
		i++
		start := i
		for i < n && v[i] >= '0' && v[i] <= '9' {
			i++
		}
		if i == start {
			return false
		}
	}
	if i < n && (v[i] == 'e' || v[i] == 'E') {
		i++
		if i < n && (v[i] == '+' || v[i] == '-') {
			i++
		}
		start := i
		for i < n && v[i] >= '0' && v[i] <= '9' {
			i++
		}
		if i == start {
			return false
		}
	}
	return i == n
}

// significantDigits counts the digits of a decimal literal without leading
// zeros; 15 or fewer round-trip through float64 exactly.
func significantDigits(v []byte) int {
	n, leading := 0, true
	for _, c := range v {
		if c == 'e' || c == 'E' {
			break
		}
		if c < '0' || c > '9' {
			continue
		}
		if leading && c == '0' {
			continue
		}
		leading = false
		n++
	}
	return n
}

// appendTimestamp turns Postgres ISO output ("2026-11-22 10:00:00.123456+00")
// into RFC 3339 ("2026-11-22T10:00:00.123456Z"). Values it does not recognise
// (infinity, BC dates) pass through as strings.
func appendTimestamp(dst []byte, v []byte, tz bool) []byte {
	if !isISOTimestamp(v) {
		return appendString(dst, v)
	}
	dst = append(dst, '"')
	dst = append(dst, v[:10]...)
	dst = append(dst, 'T')
	rest := v[11:]
	if !tz {
		dst = append(dst, rest...)
		return append(dst, '"')
	}
	// Find the zone offset: the last '+' or '-' after the time.
	z := -1
	for i := len(rest) - 1; i >= 8; i-- {
		if rest[i] == '+' || rest[i] == '-' {
			z = i
			break
		}
	}
	if z < 0 {
		dst = append(dst, rest...)
		return append(dst, '"')
	}
	dst = append(dst, rest[:z]...)
	off := rest[z:]
	switch {
	case string(off) == "+00" || string(off) == "+00:00":
		dst = append(dst, 'Z')
	case len(off) == 3: // +05 → +05:00
		dst = append(dst, off...)
		dst = append(dst, ":00"...)
	case len(off) == 9: // +05:30:15 has seconds; RFC 3339 cannot say that
		dst = append(dst, off[:6]...)
	default:
		dst = append(dst, off...)
	}
	return append(dst, '"')
}

// isISOTimestamp reports whether v looks like "YYYY-MM-DD HH:MM:SS[.f][±zone]"
// with nothing else (no " BC", no "infinity").
func isISOTimestamp(v []byte) bool {
	if len(v) < 19 || v[4] != '-' || v[7] != '-' || v[10] != ' ' || v[13] != ':' || v[16] != ':' {
		return false
	}
	for i, c := range v {
		switch i {
		case 4, 7, 10, 13, 16:
			continue
		}
		if (c < '0' || c > '9') && (i < 19 || (c != ':' && c != '.' && c != '+' && c != '-')) {
			return false
		}
	}
	return true
}

// appendArray parses the text form of an array ({1,2,NULL}, {{1,2},{3,4}},
// [0:1]={a,b}, {"a b","c\"d"}) into a nested JSON array.
func appendArray(dst []byte, t *pgType, v []byte) ([]byte, bool) {
	if len(v) > 0 && v[0] == '[' { // dimension decoration
		eq := -1
		for i, c := range v {
			if c == '=' {
				eq = i
				break
			}
		}
		if eq < 0 {
			return dst, false
		}
		v = v[eq+1:]
	}
	p := arrayParser{src: v, elem: t.elem, delim: t.delim}
	if p.delim == 0 {
		p.delim = ','
	}
	start := len(dst)
	out, ok := p.parse(dst)
	if !ok || p.pos != len(v) {
		return dst[:start], false
	}
	return out, true
}

type arrayParser struct {
	src   []byte
	pos   int
	elem  *pgType
	delim byte
	buf   []byte
}

func (p *arrayParser) parse(dst []byte) ([]byte, bool) {
	if p.pos >= len(p.src) || p.src[p.pos] != '{' {
		return dst, false
	}
	p.pos++
	dst = append(dst, '[')
	if p.pos < len(p.src) && p.src[p.pos] == '}' {
		p.pos++
		return append(dst, ']'), true
	}
	for first := true; ; first = false {
		if !first {
			dst = append(dst, ',')
		}
		if p.pos >= len(p.src) {
			return dst, false
		}
		var ok bool
		switch c := p.src[p.pos]; {
		case c == '{':
			if dst, ok = p.parse(dst); !ok {
				return dst, false
			}
		case c == '"':
			p.buf = p.buf[:0]
			p.pos++
			for {
				if p.pos >= len(p.src) {
					return dst, false
				}
				c := p.src[p.pos]
				if c == '\\' && p.pos+1 < len(p.src) {
					p.buf = append(p.buf, p.src[p.pos+1])
					p.pos += 2
					continue
				}
				p.pos++
				if c == '"' {
					break
				}
				p.buf = append(p.buf, c)
			}
			dst = p.appendElem(dst, p.buf)
		default:
			start := p.pos
			for p.pos < len(p.src) && p.src[p.pos] != p.delim && p.src[p.pos] != '}' {
				p.pos++
			}
			tok := p.src[start:p.pos]
			if string(tok) == "NULL" {
				dst = append(dst, "null"...)
			} else {
				dst = p.appendElem(dst, tok)
			}
		}
		if p.pos >= len(p.src) {
			return dst, false
		}
		switch p.src[p.pos] {
		case p.delim:
			p.pos++
		case '}':
			p.pos++
			return append(dst, ']'), true
		default:
			return dst, false
		}
	}
}

func (p *arrayParser) appendElem(dst, v []byte) []byte {
	if p.elem == nil {
		return appendString(dst, v)
	}
	if p.elem.kind == kindArray { // array of a type whose own text has braces: keep as string
		return appendString(dst, v)
	}
	return appendValue(dst, p.elem, v)
}

const hexDigits = "0123456789abcdef"

// appendString appends v as a JSON string, escaping as encoding/json does
// (without HTML escaping). Invalid UTF-8 becomes U+FFFD.
func appendString(dst []byte, v []byte) []byte {
	dst = append(dst, '"')
	start := 0
	for i := 0; i < len(v); {
		c := v[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			dst = append(dst, v[start:i]...)
			switch c {
			case '"', '\\':
				dst = append(dst, '\\', c)
			case '\n':
				dst = append(dst, '\\', 'n')
			case '\r':
				dst = append(dst, '\\', 'r')
			case '\t':
				dst = append(dst, '\\', 't')
			default:
				dst = append(dst, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xF])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRune(v[i:])
		if r == utf8.RuneError && size == 1 {
			dst = append(dst, v[start:i]...)
			dst = append(dst, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			dst = append(dst, v[start:i]...)
			dst = append(dst, '\\', 'u', '2', '0', '2', hexDigits[r&0xF])
			i += size
			start = i
			continue
		}
		i += size
	}
	dst = append(dst, v[start:]...)
	return append(dst, '"')
}

// appendStringS is appendString for a string.
func appendStringS(dst []byte, s string) []byte {
	return appendString(dst, []byte(s))
}
