package pgrepl

import (
	"encoding/json"
	"testing"
)

func TestAppendValue(t *testing.T) {
	intT, txtT, numT, tsT := &pgType{kind: kindInt}, &pgType{kind: kindString}, &pgType{kind: kindNumeric}, &pgType{kind: kindTimestamptz}
	arr := func(e *pgType) *pgType { return &pgType{kind: kindArray, elem: e, delim: ','} }
	for _, c := range []struct {
		typ      *pgType
		in, want string
	}{
		{intT, "42", "42"},
		{intT, "007", `"007"`}, // not a JSON number: kept as a string, never invalid JSON
		{numT, "1.5", "1.5"},
		{numT, "-0.000000000000001", "-0.000000000000001"},
		{numT, "1234567890123456", `"1234567890123456"`},
		{numT, "Infinity", `"Infinity"`},
		{&pgType{kind: kindFloat}, "1e+100", "1e+100"},
		{&pgType{kind: kindFloat}, "Infinity", `"Infinity"`},
		{tsT, "2026-11-22 10:00:00+00", `"2026-11-22T10:00:00Z"`},
		{tsT, "2026-11-22 10:00:00.1+05:30", `"2026-11-22T10:00:00.1+05:30"`},
		{tsT, "2026-11-22 10:00:00-03", `"2026-11-22T10:00:00-03:00"`},
		{tsT, "infinity", `"infinity"`},
		{tsT, "0044-03-15 12:00:00+00 BC", `"0044-03-15 12:00:00+00 BC"`},
		{&pgType{kind: kindTimestamp}, "2026-11-22 10:00:00", `"2026-11-22T10:00:00"`},
		{&pgType{kind: kindBytea}, `\x00ff`, `"AP8="`},
		{&pgType{kind: kindBool}, "f", "false"},
		{txtT, "tab\there\x01\u2028", `"tab\there\u0001\u2028"`},
		{txtT, "bad\xffutf8", `"bad\ufffdutf8"`},
		{arr(intT), "{}", "[]"},
		{arr(intT), "[0:1]={1,2}", "[1,2]"},
		{arr(intT), "{{1,NULL},{3,4}}", "[[1,null],[3,4]]"},
		{arr(txtT), `{"a,b","\\","x y",NULL,""}`, `["a,b","\\","x y",null,""]`},
		{arr(txtT), `{broken`, `"{broken"`},
		{&pgType{kind: kindArray, elem: txtT, delim: ';'}, `{(1,2),(3,4);(0,0),(1,1)}`, `["(1,2),(3,4)","(0,0),(1,1)"]`},
	} {
		got := string(appendValue(nil, c.typ, []byte(c.in)))
		if got != c.want {
			t.Errorf("appendValue(%q) = %s, want %s", c.in, got, c.want)
		}
		if !json.Valid([]byte(got)) {
			t.Errorf("appendValue(%q) = %s is not valid JSON", c.in, got)
		}
	}
}

// FuzzAppendValue: whatever text Postgres sends, the output is valid JSON
// (json/jsonb excepted: Postgres validates those).
func FuzzAppendValue(f *testing.F) {
	for _, s := range []string{"1", "{1,2}", `{"a\"b",NULL}`, "2026-11-22 10:00:00+00", `\x00`, "-", "{{}}"} {
		f.Add(s)
	}
	kinds := []kind{kindString, kindInt, kindFloat, kindNumeric, kindBool, kindBytea, kindTimestamp, kindTimestamptz}
	f.Fuzz(func(t *testing.T, s string) {
		for _, k := range kinds {
			for _, typ := range []*pgType{{kind: k}, {kind: kindArray, elem: &pgType{kind: k}, delim: ','}} {
				out := appendValue(nil, typ, []byte(s))
				if !json.Valid(out) {
					t.Fatalf("kind %d array=%v: %q → invalid JSON %s", k, typ.kind == kindArray, s, out)
				}
			}
		}
	})
}
