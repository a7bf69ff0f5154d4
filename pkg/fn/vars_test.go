package fn

import (
	"fmt"
	"reflect"
	"testing"

	"github.com/pgs2/pgs2/pkg/seed"
)

func TestVars(t *testing.T) {
	for _, c := range []struct {
		filter, transform, routing string
		want                       Vars
		byTable                    bool
	}{
		{routing: `{"stream": metadata.table_schema + "." + metadata.table_name}`, want: ReadsTable, byTable: true},
		{routing: `{"stream": metadata["table_name"]}`, filter: `action != "delete"`, want: ReadsTable | ReadsAction, byTable: true},
		{filter: `has(metadata.table_name) && action == "insert"`, want: ReadsTable | ReadsAction, byTable: true},
		{routing: `{"stream": "fixed"}`, want: 0, byTable: true},
		{routing: `{"stream": metadata.database_name}`, want: ReadsMetadata},
		{routing: `{"stream": metadata.table_name + string(metadata.commit_lsn)}`, want: ReadsTable | ReadsMetadata},
		{filter: `metadata.size() > 3`, want: ReadsMetadata},
		{filter: `record.qty > 10`, want: ReadsRecord},
		{filter: `changes != null`, want: ReadsChanges},
		{routing: `{"stream": metadata.table_name}`, transform: `{"a": action}`, want: ReadsTable | ReadsAction},
		{filter: `[1, 2].exists(record, record > 1)`, want: ReadsRecord}, // a comprehension's variable counts
		{filter: `record.tags.exists(t, t == metadata.table_name)`, want: ReadsRecord | ReadsTable},
	} {
		f, err := Compile("s", c.filter, c.transform, c.routing)
		if err != nil {
			t.Fatal(err)
		}
		if f.Needs() != c.want || f.ByTable() != c.byTable {
			t.Errorf("filter %q transform %q routing %q: needs %05b by table %v, want %05b %v",
				c.filter, c.transform, c.routing, f.Needs(), f.ByTable(), c.want, c.byTable)
		}
	}
}

// oldParse is what the decoder fastjson replaced gives: encoding/json
// with numbers normalized (parseStd, kept for lone surrogate escapes).
func oldParse(t *testing.T, body []byte) map[string]any {
	t.Helper()
	in, err := parseStd(body)
	if err != nil {
		t.Fatal(err)
	}
	return in.vars
}

// TestParseInputMatchesEncodingJSON: seeded random records decode as
// encoding/json decoded them (numbers, escapes, nesting).
func TestParseInputMatchesEncodingJSON(t *testing.T) {
	r, _ := seed.Rand(t)
	atoms := []string{`0`, `-7`, `9007199254740993`, `12345678901234567890`, `1.5`, `-2.5e-3`, `1e3`, `1.0`, `true`, `false`, `null`,
		`""`, `"plain"`, `"esc \" \\ \/ \b\f\n\r\t"`, `"\u00e9\u4e2d\ud83d\ude00"`, `"\ud800"`, `"naïve ☃"`}
	var value func(depth int) string
	value = func(depth int) string {
		switch k := r.IntN(6); {
		case depth < 3 && k == 0:
			n := r.IntN(4)
			s := "["
			for i := range n {
				if i > 0 {
					s += ","
				}
				s += value(depth + 1)
			}
			return s + "]"
		case depth < 3 && k == 1:
			n := r.IntN(4)
			s := "{"
			for i := range n {
				if i > 0 {
					s += ","
				}
				s += fmt.Sprintf(`"k%d":%s`, i, value(depth+1))
			}
			return s + "}"
		}
		return atoms[r.IntN(len(atoms))]
	}
	for range 300 {
		body := []byte(fmt.Sprintf(`{"record":{"a":%s,"b":%s},"changes":%s,"action":"update","metadata":{"table_schema":"public","table_name":"t","x":%s}}`,
			value(0), value(0), value(0), value(0)))
		in, err := ParseInput(body)
		if err != nil {
			t.Fatalf("%s: %v", body, err)
		}
		want := oldParse(t, body)
		for _, k := range []string{"record", "changes", "action", "metadata"} {
			if !reflect.DeepEqual(in.vars[k], want[k]) {
				t.Fatalf("%s: %s = %#v, encoding/json gives %#v", body, k, in.vars[k], want[k])
			}
		}
	}
	for _, bad := range []string{``, `[1]`, `{"record":`, `{"a":1}x`} {
		if _, err := ParseInput([]byte(bad)); err == nil {
			t.Errorf("%q decoded", bad)
		}
	}
}

// TestPartialInputGivesTheSameResults: functions evaluated over only the
// fields they read decide as over the whole change.
func TestPartialInputGivesTheSameResults(t *testing.T) {
	for _, c := range []struct{ filter, transform, routing string }{
		{filter: `record.qty > 10`},
		{filter: `has(record.nope) || record["qty"] == 57`},
		{filter: `record.size() == 7`}, // whole record
		{transform: `{"id": record.id, "name": record.name, "doc": record.doc, "at": metadata.commit_timestamp, "a": action}`},
		{transform: `{"r": record, "m": metadata.table_name}`},
		{routing: `{"stream": metadata.table_name + "-" + string(record.qty)}`},
		{filter: `changes == null && record.tags.exists(t, t == "tag-7")`},
		{filter: `[1].all(record, record == 1) && record.qty == 57`}, // a comprehension's record: read whole
		{filter: `record.missing == 1`},                              // no such key, in both
	} {
		f, err := Compile("s", c.filter, c.transform, c.routing)
		if err != nil {
			t.Fatal(err)
		}
		full, err := ParseInput([]byte(benchBody))
		if err != nil {
			t.Fatal(err)
		}
		part, err := ParseInputReads([]byte(benchBody), f.Reads())
		if err != nil {
			t.Fatal(err)
		}
		type result struct {
			keep          bool
			basin, stream string
			body          string
			err           string
		}
		run := func(in *Input) (r result) {
			keep, err := f.Keep(in)
			if err != nil {
				return result{err: err.Error()}
			}
			r.keep = keep
			if r.basin, r.stream, err = f.Route(in); err != nil {
				return result{err: err.Error()}
			}
			if f.HasTransform() {
				b, err := f.TransformBody(in)
				if err != nil {
					return result{err: err.Error()}
				}
				r.body = string(b)
			}
			return r
		}
		if a, b := run(full), run(part); a != b {
			t.Errorf("%+v: whole change %+v, fields read %+v (reads %+v)", c, a, b, f.Reads())
		}
	}
	f, _ := Compile("s", `record.qty > 10 && metadata.commit_lsn > 0`, "", "")
	in, _ := ParseInputReads([]byte(benchBody), f.Reads())
	if r := in.vars["record"].(map[string]any); len(r) != 1 || r["qty"] != int64(57) {
		t.Errorf("record decoded as %v, want qty alone", r)
	}
	if m := in.vars["metadata"].(map[string]any); len(m) != 1 {
		t.Errorf("metadata decoded as %v, want commit_lsn alone", m)
	}
}

// TestRepeatedKeys: the last of a repeated key wins, as with
// encoding/json, whether a field is decoded alone or with the rest.
func TestRepeatedKeys(t *testing.T) {
	body := []byte(`{"record":{"qty":1,"x":0},"record":{"qty":1,"qty":2},"action":"insert","action":"update","metadata":{"table_name":"a","table_name":"b"}}`)
	want := oldParse(t, body)
	f, err := Compile("s", `record.qty == 2 && action == "update" && metadata.table_name == "b"`, "", "")
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range []Reads{f.Reads(), {Vars: AllVars}} {
		in, err := ParseInputReads(body, r)
		if err != nil {
			t.Fatal(err)
		}
		if keep, err := f.Keep(in); err != nil || !keep {
			t.Errorf("reads %+v: keep %v, %v; want the last of each repeated key", r, keep, err)
		}
		if r.Vars == AllVars && !reflect.DeepEqual(in.vars["record"], want["record"]) {
			t.Errorf("record %v, encoding/json %v", in.vars["record"], want["record"])
		}
	}
}
