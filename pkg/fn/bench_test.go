package fn

import "testing"

// benchBody is a change as the end-to-end benchmark's items table makes
// them (7 columns).
const benchBody = `{"record":{"id":123457,"name":"item-123457","qty":57,"price":"1234.57","tags":["tag-7","tag-3"],"doc":{"k":123457,"s":"v-57"},"updated_at":"2026-12-07T10:00:00.123456+00:00"},"changes":null,"action":"insert","metadata":{"table_schema":"public","table_name":"items","commit_timestamp":"2026-12-07T10:00:00.123456Z","commit_lsn":24023128,"commit_idx":17,"database_name":"app","idempotency_key":"MjQwMjMxMjg6MTc=","record_pks":["123457"],"transaction_annotations":null}}`

func benchFunctions(b *testing.B, filter, transform, routing string) {
	f, err := Compile("s", filter, transform, routing)
	if err != nil {
		b.Fatal(err)
	}
	body := []byte(benchBody)
	b.ReportAllocs()
	b.SetBytes(int64(len(body)))
	for b.Loop() {
		in, err := ParseInputReads(body, f.Reads())
		if err != nil {
			b.Fatal(err)
		}
		if _, err := f.Keep(in); err != nil {
			b.Fatal(err)
		}
		if _, _, err := f.Route(in); err != nil {
			b.Fatal(err)
		}
		if f.HasTransform() {
			if _, err := f.TransformBody(in); err != nil {
				b.Fatal(err)
			}
		}
	}
}

func BenchmarkParseOnly(b *testing.B) { benchFunctions(b, "", "", "") }

// BenchmarkRoutingByTable times the routing by table when not decided once
// per table (the router decides it once per table and action).
func BenchmarkRoutingByTable(b *testing.B) {
	benchFunctions(b, "", "", `{"stream": metadata.table_schema + "." + metadata.table_name}`)
}
func BenchmarkFilterOnRecord(b *testing.B) { benchFunctions(b, `record.qty > 10`, "", "") }
func BenchmarkTransform(b *testing.B) {
	benchFunctions(b, "", `{"id": record.id, "name": record.name, "action": action, "at": metadata.commit_timestamp}`, "")
}

// BenchmarkEvalOnly times the functions alone on a parsed change (a
// filter on a record field and a transform that builds a new body).
func BenchmarkEvalOnly(b *testing.B) {
	f, err := Compile("s", `record.qty > 10`, `{"id": record.id, "name": record.name, "action": action, "at": metadata.commit_timestamp}`, "")
	if err != nil {
		b.Fatal(err)
	}
	in, err := ParseInputReads([]byte(benchBody), f.Reads())
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := f.Keep(in); err != nil {
			b.Fatal(err)
		}
		if _, err := f.TransformBody(in); err != nil {
			b.Fatal(err)
		}
	}
}
