package fn

import (
	"errors"
	"fmt"
	"strings"
	"testing"
)

const body = `{"record":{"id":7,"name":"Ada","org":12345678901234,"price":"9.50","tags":["a","b"]},"changes":{"name":"Ad"},"action":"update","metadata":{"table_schema":"public","table_name":"users","commit_timestamp":"2026-11-22T10:00:00.123456Z","commit_lsn":24023128,"commit_idx":0,"database_name":"app","idempotency_key":"MjQwMjMxMjg6MA==","record_pks":["7"],"transaction_annotations":null}}`

func input(t *testing.T) *Input {
	t.Helper()
	in, err := ParseInput([]byte(body))
	if err != nil {
		t.Fatal(err)
	}
	return in
}

func TestFunctions(t *testing.T) {
	f, err := Compile("users-to-s2",
		`action != "delete" && record.id == 7`,
		`{"id": record.id, "action": action, "big": record.org, "tags": record.tags, "old": changes.name}`,
		`{"basin": "logs-" + metadata.table_schema, "stream": metadata.table_name}`)
	if err != nil {
		t.Fatal(err)
	}
	in := input(t)
	if keep, err := f.Keep(in); err != nil || !keep {
		t.Fatalf("Keep = %v, %v", keep, err)
	}
	b, err := f.TransformBody(in)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := string(b), `{"action":"update","big":12345678901234,"id":7,"old":"Ad","tags":["a","b"]}`; got != want {
		t.Fatalf("transform = %s, want %s", got, want)
	}
	basin, stream, err := f.Route(in)
	if err != nil || basin != "logs-public" || stream != "users" {
		t.Fatalf("Route = %q %q %v (the seed's routing example)", basin, stream, err)
	}
}

func TestFilterDrops(t *testing.T) {
	f, err := Compile("s", `action == "insert"`, "", "")
	if err != nil {
		t.Fatal(err)
	}
	if keep, err := f.Keep(input(t)); err != nil || keep {
		t.Fatalf("Keep = %v, %v; want false", keep, err)
	}
	if f.Empty() || f.HasTransform() {
		t.Fatal("Empty/HasTransform wrong")
	}
	g, _ := Compile("s", "", "", "")
	if !g.Empty() {
		t.Fatal("no functions should be Empty")
	}
}

func TestRoutingPartial(t *testing.T) {
	f, err := Compile("s", "", "", `{"stream": "t-" + metadata.table_name}`)
	if err != nil {
		t.Fatal(err)
	}
	basin, stream, err := f.Route(input(t))
	if err != nil || basin != "" || stream != "t-users" {
		t.Fatalf("Route = %q %q %v", basin, stream, err)
	}
}

func TestCompileErrors(t *testing.T) {
	for _, c := range []struct{ filter, transform, routing, want string }{
		{`action = "x"`, "", "", "filter function does not compile"},
		{`record.id + `, "", "", "<input>:1:"},
		{`"not a bool"`, "", "", "must return a bool"},
		{"", "", `"logs"`, "must return a map"},
		{"", `nosuchvar.x`, "", "undeclared reference"},
	} {
		_, err := Compile("mysink", c.filter, c.transform, c.routing)
		var ce *CompileError
		if !errors.As(err, &ce) || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), `sink "mysink"`) {
			t.Errorf("Compile(%q,%q,%q) = %v, want a CompileError naming the sink and %q", c.filter, c.transform, c.routing, err, c.want)
		}
	}
}

func TestRuntimeErrors(t *testing.T) {
	in := input(t)
	for _, c := range []struct{ filter, transform, routing string }{
		{`record.missing == 1`, "", ""},
		{"", `record.id / 0`, ""},
		{"", "", `{"basin": record.id}`},
		{"", "", `{"bucket": "x"}`},
	} {
		f, err := Compile("s", c.filter, c.transform, c.routing)
		if err != nil {
			t.Fatalf("compile %v: %v", c, err)
		}
		var rerr error
		switch {
		case c.filter != "":
			_, rerr = f.Keep(in)
		case c.transform != "":
			_, rerr = f.TransformBody(in)
		default:
			_, _, rerr = f.Route(in)
		}
		var re *RuntimeError
		if !errors.As(rerr, &re) {
			t.Errorf("%v: error %v, want a RuntimeError", c, rerr)
		}
	}
}

// TestCostLimitOnLargeInput: an expression whose cost grows with its
// input (here a list's size) is still held to the cost limit at run time,
// while one whose cost CEL bounds is evaluated without tracking it (half
// its time): a huge record must not make a function run away.
func TestCostLimitOnLargeInput(t *testing.T) {
	f, err := Compile("s", `record.tags.all(a, record.tags.all(b, a != b || a == b))`, "", "")
	if err != nil {
		t.Fatal(err)
	}
	tags := make([]string, 3000)
	for i := range tags {
		tags[i] = fmt.Sprintf("%q", fmt.Sprint("t", i))
	}
	in, err := ParseInput([]byte(`{"record":{"tags":[` + strings.Join(tags, ",") + `]},"action":"insert","metadata":{}}`))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Keep(in); err == nil || !strings.Contains(err.Error(), "cost") {
		t.Fatalf("a filter of 9 million steps: %v, want a cost limit error", err)
	}
	small, err := ParseInput([]byte(`{"record":{"tags":["a","b"]},"action":"insert","metadata":{}}`))
	if err != nil {
		t.Fatal(err)
	}
	if keep, err := f.Keep(small); err != nil || !keep {
		t.Fatalf("the same filter on two tags: %v, %v; want true", keep, err)
	}
}

func TestCostLimit(t *testing.T) {
	f, err := Compile("s", "", `[1,2,3,4,5,6,7,8,9,10].map(a, [1,2,3,4,5,6,7,8,9,10].map(b, [1,2,3,4,5,6,7,8,9,10].map(c, [1,2,3,4,5,6,7,8,9,10].map(d, [1,2,3,4,5,6,7,8,9,10].map(e, [1,2,3,4,5,6,7,8,9,10].map(g, a+b+c+d+e+g))))))`, "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.TransformBody(input(t)); err == nil || !strings.Contains(err.Error(), "cost") {
		t.Fatalf("an expensive transform: %v, want a cost limit error", err)
	}
}

// TestConvertedSizes: what the cost estimate takes for the size of a
// number or bool converted to a string holds at the extremes (a smaller
// size than the real one would let an expression past the cost limit
// untracked).
func TestConvertedSizes(t *testing.T) {
	for _, e := range []string{`string(-9223372036854775808)`, `string(18446744073709551615u)`, `string(-1.2345678901234567e-308)`,
		`string(-1.7976931348623157e308)`, `string(false)`} {
		a, iss := env.Compile(e)
		if iss.Err() != nil {
			t.Fatal(iss.Err())
		}
		p, err := env.Program(a)
		if err != nil {
			t.Fatal(err)
		}
		v, _, err := p.Eval(map[string]any{})
		if err != nil {
			t.Fatal(err)
		}
		if s, ok := v.Value().(string); !ok || len(s) > 32 {
			t.Errorf("%s = %q: more than the 32 characters the estimate takes", e, v.Value())
		}
	}
}

// TestTrackedExpressions: which expressions run without CEL's cost
// tracker: only core operators and functions, no comprehension, and a
// cost CEL bounds under the limit. CEL estimates `join` and `flatten`
// from their arguments' count, not their sizes: untracked, a filter
// could build gigabytes from a large row (found in review).
func TestTrackedExpressions(t *testing.T) {
	for expr, want := range map[string]bool{
		`record.qty >= 0`: false,
		`{"id": record.id, "name": record.name, "qty": record.qty, "action": action}`: false,
		`{"stream": "s-" + string(record.id % 16)}`:                                   false,
		`{"stream": metadata.table_schema + "." + metadata.table_name}`:               false,
		`record.name.startsWith("a") && action != "delete"`:                           false,
		`{"stream": "s-" + string(record.name)}`:                                      true, // a string of the row
		`record.tags.exists(t, t == "x")`:                                             true,
		`[record.s, record.s].join().size() > 0`:                                      true,
		`[record.l, record.l].flatten().size() > 0`:                                   true,
		`lists.range(3).size() > 0`:                                                   true,
	} {
		a, iss := env.Compile(expr)
		if iss.Err() != nil {
			t.Fatal(iss.Err())
		}
		if got := tracked(a); got != want {
			t.Errorf("%s: tracked %v, want %v", expr, got, want)
		}
	}
}
