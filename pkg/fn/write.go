package fn

import (
	"encoding/base64"
	"fmt"
	"math"
	"slices"
	"strconv"
	"time"
	"unicode/utf8"

	"github.com/google/cel-go/common/types"
	"github.com/google/cel-go/common/types/ref"
	"github.com/google/cel-go/common/types/traits"
)

// writeJSON appends v as JSON, written as encoding/json writes toNative(v):
// object keys sorted, HTML characters and U+2028/U+2029 escaped, invalid
// UTF-8 replaced, floats in its format; without the intermediate values.
func writeJSON(dst []byte, v ref.Val) ([]byte, error) {
	switch t := v.(type) {
	case types.Null:
		return append(dst, "null"...), nil
	case types.Bool:
		return strconv.AppendBool(dst, bool(t)), nil
	case types.Int:
		return strconv.AppendInt(dst, int64(t), 10), nil
	case types.Uint:
		return strconv.AppendUint(dst, uint64(t), 10), nil
	case types.Double:
		f := float64(t)
		if math.IsNaN(f) || math.IsInf(f, 0) {
			return appendString(dst, strconv.FormatFloat(f, 'g', -1, 64)), nil
		}
		return appendFloat(dst, f), nil
	case types.String:
		return appendString(dst, string(t)), nil
	case types.Bytes:
		return appendString(dst, base64.StdEncoding.EncodeToString(t)), nil
	case types.Timestamp:
		return appendString(dst, t.Time.UTC().Format(time.RFC3339Nano)), nil
	case types.Duration:
		return appendString(dst, t.Duration.String()), nil
	case traits.Mapper:
		type kv struct {
			k string
			v ref.Val
		}
		var kvs []kv
		for it := t.Iterator(); it.HasNext() == types.True; {
			k := it.Next()
			key, ok := k.(types.String)
			if !ok {
				return nil, fmt.Errorf("map key %v is %s, JSON needs strings", k, k.Type())
			}
			kvs = append(kvs, kv{string(key), t.Get(k)})
		}
		slices.SortFunc(kvs, func(a, b kv) int {
			switch {
			case a.k < b.k:
				return -1
			case a.k > b.k:
				return 1
			}
			return 0
		})
		dst = append(dst, '{')
		for i, e := range kvs {
			if i > 0 {
				dst = append(dst, ',')
			}
			dst = appendString(dst, e.k)
			dst = append(dst, ':')
			var err error
			if dst, err = writeJSON(dst, e.v); err != nil {
				return nil, err
			}
		}
		return append(dst, '}'), nil
	case traits.Lister:
		n := int(t.Size().(types.Int))
		dst = append(dst, '[')
		for i := 0; i < n; i++ {
			if i > 0 {
				dst = append(dst, ',')
			}
			var err error
			if dst, err = writeJSON(dst, t.Get(types.Int(i))); err != nil {
				return nil, err
			}
		}
		return append(dst, ']'), nil
	}
	if e, ok := v.(*types.Err); ok {
		return nil, e
	}
	return nil, fmt.Errorf("cannot write a %s as JSON", v.Type())
}

// appendFloat writes f as encoding/json does (ES6 number formatting).
func appendFloat(dst []byte, f float64) []byte {
	abs, format := math.Abs(f), byte('f')
	if abs != 0 && (abs < 1e-6 || abs >= 1e21) {
		format = 'e'
	}
	dst = strconv.AppendFloat(dst, f, format, -1, 64)
	if format == 'e' { // clean up e-09 to e-9
		if n := len(dst); n >= 4 && dst[n-4] == 'e' && dst[n-3] == '-' && dst[n-2] == '0' {
			dst[n-2] = dst[n-1]
			dst = dst[:n-1]
		}
	}
	return dst
}

const hexDigits = "0123456789abcdef"

// appendString writes s as a JSON string as encoding/json does (with its
// HTML escaping).
func appendString(dst []byte, s string) []byte {
	dst = append(dst, '"')
	start := 0
	for i := 0; i < len(s); {
		if b := s[i]; b < utf8.RuneSelf {
			if b >= ' ' && b != '"' && b != '\\' && b != '<' && b != '>' && b != '&' {
				i++
				continue
			}
			dst = append(dst, s[start:i]...)
			switch b {
			case '\\', '"':
				dst = append(dst, '\\', b)
			case '\b':
				dst = append(dst, '\\', 'b')
			case '\f':
				dst = append(dst, '\\', 'f')
			case '\n':
				dst = append(dst, '\\', 'n')
			case '\r':
				dst = append(dst, '\\', 'r')
			case '\t':
				dst = append(dst, '\\', 't')
			default:
				dst = append(dst, '\\', 'u', '0', '0', hexDigits[b>>4], hexDigits[b&0xF])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			dst = append(dst, s[start:i]...)
			dst = append(dst, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			dst = append(dst, s[start:i]...)
			dst = append(dst, '\\', 'u', '2', '0', '2', hexDigits[r&0xF])
			i += size
			start = i
			continue
		}
		i += size
	}
	dst = append(dst, s[start:]...)
	return append(dst, '"')
}
