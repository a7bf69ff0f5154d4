package fn

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"

	"github.com/valyala/fastjson"
)

// parsers are reused: a fastjson.Parser keeps its buffers between parses.
var parsers fastjson.ParserPool

var emptyMap = map[string]any{}

// ParseInputReads decodes of a message-format body only what r reads:
// its variables (the others are left empty: the functions do not read
// them), and of record, changes and metadata only the fields r names (a
// field absent from the body stays absent). Integers become int64 (so
// record.id == 7 holds), other numbers float64; strings are unescaped,
// invalid UTF-8 replaced.
func ParseInputReads(body []byte, r Reads) (*Input, error) {
	need := r.Vars
	if surrogateEscape(body) {
		return parseStd(body) // fastjson keeps a lone surrogate's escape as text
	}
	p := parsers.Get()
	defer parsers.Put(p)
	v, err := p.ParseBytes(body)
	if err != nil {
		return nil, fmt.Errorf("change body is not a JSON object: %w", err)
	}
	o, err := v.Object()
	if err != nil {
		return nil, fmt.Errorf("change body is not a JSON object: %w", err)
	}
	vars := map[string]any{"action": "", "record": emptyMap, "changes": nil, "metadata": emptyMap}
	// Top-level values, the last of a repeated key (as encoding/json).
	var top [4]*fastjson.Value
	names := [4]string{"action", "record", "changes", "metadata"}
	o.Visit(func(k []byte, x *fastjson.Value) {
		for i, n := range names {
			if string(k) == n {
				top[i] = x
			}
		}
	})
	if a := top[0]; need&ReadsAction != 0 && a != nil && a.Type() == fastjson.TypeString {
		vars["action"] = text(a.GetStringBytes())
	}
	for i, f := range []struct {
		want Vars
		obj  bool // must be an object, else {}
	}{{ReadsRecord, true}, {ReadsChanges, false}, {ReadsTable | ReadsMetadata, true}} {
		name, x := names[i+1], top[i+1]
		if need&f.want == 0 || x == nil || f.obj && x.Type() != fastjson.TypeObject {
			continue
		}
		if fs, only := r.fields[name]; only && x.Type() == fastjson.TypeObject {
			xo, _ := x.Object()
			m := make(map[string]any, len(fs))
			xo.Visit(func(k []byte, e *fastjson.Value) {
				if fs[string(k)] { // the last of a repeated key wins
					m[text(k)] = native(e)
				}
			})
			vars[name] = m
			continue
		}
		vars[name] = native(x)
	}
	return &Input{vars: vars}, nil
}

// native is a JSON value as plain Go values.
func native(v *fastjson.Value) any {
	switch v.Type() {
	case fastjson.TypeObject:
		o, _ := v.Object()
		m := make(map[string]any, o.Len())
		o.Visit(func(k []byte, x *fastjson.Value) { m[text(k)] = native(x) })
		return m
	case fastjson.TypeArray:
		a, _ := v.Array()
		out := make([]any, len(a))
		for i, x := range a {
			out[i] = native(x)
		}
		return out
	case fastjson.TypeString:
		return text(v.GetStringBytes())
	case fastjson.TypeNumber:
		if i, err := v.Int64(); err == nil {
			return i
		}
		f, _ := v.Float64()
		return f
	case fastjson.TypeTrue:
		return true
	case fastjson.TypeFalse:
		return false
	}
	return nil
}

// text is b as a string, invalid UTF-8 replaced (as encoding/json does).
func text(b []byte) string {
	if utf8.Valid(b) {
		return string(b)
	}
	return strings.ToValidUTF8(string(b), "\uFFFD")
}

// surrogateEscape reports whether body holds a \uD800–\uDFFF escape.
func surrogateEscape(body []byte) bool {
	for i := 0; ; {
		j := bytes.Index(body[i:], []byte(`\u`))
		if j < 0 {
			return false
		}
		i += j + 2
		if i+1 < len(body) && (body[i] == 'd' || body[i] == 'D') {
			switch body[i+1] {
			case '8', '9', 'a', 'b', 'c', 'd', 'e', 'f', 'A', 'B', 'C', 'D', 'E', 'F':
				return true
			}
		}
	}
}

// parseStd decodes body with encoding/json (which replaces a lone
// surrogate by U+FFFD), every variable.
func parseStd(body []byte) (*Input, error) {
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	var m map[string]any
	if err := dec.Decode(&m); err != nil {
		return nil, fmt.Errorf("change body is not a JSON object: %w", err)
	}
	if dec.More() {
		return nil, errors.New("change body is not a JSON object: data after it")
	}
	v := normalize(m).(map[string]any)
	vars := map[string]any{"action": v["action"], "record": v["record"], "changes": v["changes"], "metadata": v["metadata"]}
	if _, ok := vars["action"].(string); !ok {
		vars["action"] = ""
	}
	for _, k := range []string{"record", "metadata"} {
		if _, ok := vars[k].(map[string]any); !ok {
			vars[k] = emptyMap
		}
	}
	return &Input{vars: vars}, nil
}

func normalize(v any) any {
	switch t := v.(type) {
	case json.Number:
		if i, err := t.Int64(); err == nil {
			return i
		}
		f, _ := t.Float64()
		return f
	case map[string]any:
		for k, e := range t {
			t[k] = normalize(e)
		}
		return t
	case []any:
		for i, e := range t {
			t[i] = normalize(e)
		}
		return t
	}
	return v
}
