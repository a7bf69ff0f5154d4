package bus

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

func TestBatchRoundTrip(t *testing.T) {
	var b BatchBuilder
	var want []Entry
	for i := range 50 {
		e := Entry{Key: fmt.Appendf(nil, "k%d", i), Group: []byte(`["1"]`), Action: []byte("insert"), Table: []byte("public.users"),
			CommitMs: int64(i*1000 - 1), Body: bytes.Repeat([]byte{'x'}, i*37)}
		if i%3 == 0 {
			e.Error, e.ErrorKind, e.TraceParent = []byte("boom"), ErrorFunction, []byte("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
		}
		if i%2 == 0 { // Schema nil: unknown
			e.Schema = e.Table[:len("public")]
		}
		if i%5 == 2 {
			e.Table, e.Schema = []byte("a.b.c"), []byte("a.b") // the schema "a.b", the table "c"
		}
		if i%4 == 1 {
			e.Action, e.Sink, e.Backfill = []byte("read"), []byte("users-to-s2"), fmt.Appendf(nil, "bf-%d", i)
			e.BackfillLast = i%8 == 1
		}
		want = append(want, e)
		before := b.Size()
		b.Add(&e)
		if grew := b.Size() - before; grew > e.Size() || (i > 0 && grew < e.Size()-2*binaryMaxVarint) {
			t.Fatalf("entry %d grew the batch by %d, Size says %d", i, grew, e.Size())
		}
	}
	if b.Len() != 50 {
		t.Fatalf("Len %d", b.Len())
	}
	r := NewBatchReader(b.Bytes())
	var e Entry
	i := 0
	for r.Next(&e) {
		w := want[i]
		if !bytes.Equal(e.Key, w.Key) || !bytes.Equal(e.Group, w.Group) || !bytes.Equal(e.Action, w.Action) || !bytes.Equal(e.Table, w.Table) ||
			e.CommitMs != w.CommitMs || !bytes.Equal(e.TraceParent, w.TraceParent) || !bytes.Equal(e.Error, w.Error) || e.ErrorKind != w.ErrorKind || !bytes.Equal(e.Body, w.Body) ||
			!bytes.Equal(e.Sink, w.Sink) || !bytes.Equal(e.Backfill, w.Backfill) || e.BackfillLast != w.BackfillLast ||
			(e.Schema == nil) != (w.Schema == nil) || !bytes.Equal(e.Schema, w.Schema) {
			t.Fatalf("entry %d = %+v, want %+v", i, e, w)
		}
		i++
	}
	if r.Err() != nil || i != 50 {
		t.Fatalf("read %d entries, err %v", i, r.Err())
	}
	b.Reset()
	if b.Len() != 0 || b.Size() != 0 {
		t.Fatal("Reset left entries")
	}
}

const binaryMaxVarint = 10

// TestBatchVersion1: batches written before error kinds are still read;
// their errors are of an unknown kind.
func TestBatchVersion1(t *testing.T) {
	v1 := []byte{1}
	for _, f := range []string{"k", `["1"]`, "insert", "public.t"} {
		v1 = appendField(v1, []byte(f))
	}
	v1 = append(v1, 2) // commit_ms 1 (zigzag)
	v1 = appendField(v1, nil)
	v1 = appendField(v1, []byte("too large"))
	v1 = appendField(v1, []byte("{}"))
	r := NewBatchReader(v1)
	var e Entry
	if !r.Next(&e) || string(e.Key) != "k" || e.CommitMs != 1 || string(e.Error) != "too large" || e.ErrorKind != ErrorUnknown || string(e.Body) != "{}" {
		t.Fatalf("v1 entry %+v, err %v", e, r.Err())
	}
	if r.Next(&e) || r.Err() != nil {
		t.Fatalf("a second entry, or err %v", r.Err())
	}
	for _, k := range []ErrorKind{ErrorNone, ErrorTooLarge, ErrorFunction, ErrorUnknown} {
		if ParseErrorKind(k.String()) != k {
			t.Errorf("ParseErrorKind(%q) != %d", k.String(), k)
		}
	}
}

// TestBatchVersion2: batches written before the sink and backfill fields
// are still read; their changes are for every sink and not of a backfill.
func TestBatchVersion2(t *testing.T) {
	v2 := []byte{2}
	for _, f := range []string{"k", `["1"]`, "insert", "public.t"} {
		v2 = appendField(v2, []byte(f))
	}
	v2 = append(v2, 2) // commit_ms 1 (zigzag)
	v2 = appendField(v2, nil)
	v2 = appendField(v2, []byte("boom"))
	v2 = append(v2, byte(ErrorFunction))
	v2 = appendField(v2, []byte("{}"))
	r := NewBatchReader(v2)
	e := Entry{Sink: []byte("stale"), Backfill: []byte("stale"), BackfillLast: true}
	if !r.Next(&e) || string(e.Key) != "k" || e.ErrorKind != ErrorFunction || string(e.Body) != "{}" || e.Sink != nil || e.Backfill != nil || e.BackfillLast {
		t.Fatalf("v2 entry %+v, err %v", e, r.Err())
	}
	if r.Next(&e) || r.Err() != nil {
		t.Fatalf("a second entry, or err %v", r.Err())
	}
}

// TestBatchVersion3: batches written before the schema length are still
// read; their schema is unknown (their change subject named the table).
func TestBatchVersion3(t *testing.T) {
	v3 := []byte{3}
	for _, f := range []string{"k", `["1"]`, "insert", "public.t"} {
		v3 = appendField(v3, []byte(f))
	}
	v3 = append(v3, 2) // commit_ms 1 (zigzag)
	v3 = appendField(v3, nil)
	v3 = appendField(v3, nil)
	v3 = append(v3, byte(ErrorNone))
	v3 = appendField(v3, []byte("s"))
	v3 = appendField(v3, []byte("bf"))
	v3 = append(v3, 1)
	v3 = appendField(v3, []byte("{}"))
	r := NewBatchReader(v3)
	e := Entry{Schema: []byte("stale")}
	if !r.Next(&e) || string(e.Table) != "public.t" || e.Schema != nil || e.CommitMs != 1 || string(e.Sink) != "s" || !e.BackfillLast || string(e.Body) != "{}" {
		t.Fatalf("v3 entry %+v, err %v", e, r.Err())
	}
	if r.Next(&e) || r.Err() != nil {
		t.Fatalf("a second entry, or err %v", r.Err())
	}
}

func TestBatchReaderRejects(t *testing.T) {
	var b BatchBuilder
	b.Add(&Entry{Key: []byte("k"), Body: []byte("hello")})
	full := b.Bytes()
	var split BatchBuilder // a schema length that does not end at a dot of the table
	split.Add(&Entry{Key: []byte("k"), Table: []byte("public.t"), Schema: []byte("pub"), Body: []byte("hello")})
	var long BatchBuilder // or is past its end
	long.Add(&Entry{Key: []byte("k"), Table: []byte("public"), Schema: []byte("public"), Body: []byte("hello")})
	for _, data := range [][]byte{nil, {0}, {9}, full[:len(full)-1], append([]byte{1}, 0xff, 0xff), split.Bytes(), long.Bytes()} {
		r := NewBatchReader(data)
		var e Entry
		for r.Next(&e) {
		}
		if !errors.Is(r.Err(), ErrBadBatch) {
			t.Errorf("%x: err %v, want ErrBadBatch", data, r.Err())
		}
	}
}

func FuzzBatchReader(f *testing.F) {
	var b BatchBuilder
	b.Add(&Entry{Key: []byte("k"), Body: []byte(`{"a":1}`), CommitMs: -1})
	f.Add(b.Bytes())
	f.Fuzz(func(t *testing.T, data []byte) {
		r := NewBatchReader(data)
		var e Entry
		for r.Next(&e) {
		}
	})
}

func TestDeliveryPos(t *testing.T) {
	p, err := ParseDeliveryPos("A@k:12.3")
	if err != nil || p != (DeliveryPos{"A@k", 12, 3}) || p.String() != "A@k:12.3" {
		t.Fatalf("%v %v", p, err)
	}
	if whole, _ := ParseDeliveryPos("A@k:12"); !p.Less(whole) || whole.Less(p) {
		t.Fatal("a bare sequence covers the whole message")
	}
	for _, bad := range []string{"", "x", "12.3", ":12.3", "A:1.x", "A:1.-2"} {
		if _, err := ParseDeliveryPos(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
	key := StreamKey("my.stream", time.UnixMilli(1795341600123))
	if strings.ContainsAny(key, ".:,") {
		t.Fatalf("stream key %q holds a separator", key)
	}
}

func TestProgress(t *testing.T) {
	p := Progress{}
	a5, a7, b2 := DeliveryPos{"a", 5, 0}, DeliveryPos{"a", 7, 1}, DeliveryPos{"b", 2, 0}
	if p.Covers(a5) {
		t.Fatal("empty progress covers a position")
	}
	p.Advance(a7)
	p.Advance(a5) // earlier: no effect
	p.Advance(b2)
	if !p.Covers(a5) || !p.Covers(a7) || p.Covers(DeliveryPos{"a", 7, 2}) || !p.Covers(b2) || p.Covers(DeliveryPos{"c", 1, 0}) {
		t.Fatalf("covers wrong: %v", p)
	}
	s := p.String()
	if s != "a:7.1,b:2.0" {
		t.Fatalf("String = %q", s)
	}
	q, err := ParseProgress(s)
	if err != nil || !q.Equal(p) {
		t.Fatalf("ParseProgress(%q) = %v, %v", s, q, err)
	}
	c := p.Clone()
	c.Advance(DeliveryPos{"a", 9, 0})
	if p.Covers(DeliveryPos{"a", 9, 0}) {
		t.Fatal("Clone shares its map")
	}
	p.Merge(Progress{"a": {"a", 8, 0}, "c": {"c", 1, 0}})
	if p.String() != "a:8.0,b:2.0,c:1.0" {
		t.Fatalf("Merge = %v", p)
	}
	if e, err := ParseProgress(""); err != nil || len(e) != 0 {
		t.Fatalf("ParseProgress(\"\") = %v, %v", e, err)
	}
	if _, err := ParseProgress("a:1.0,12.3"); err == nil {
		t.Fatal("a position without its stream accepted")
	}
}

func TestRoundIsDeterministic(t *testing.T) {
	build := func() []string {
		r := NewRound(3, 1<<20)
		for i := range 20 {
			r.Add(fmt.Sprintf("s.%d", i%4), &Entry{Key: fmt.Appendf(nil, "k%d", i), Body: []byte("x")})
		}
		var out []string
		for _, m := range r.Msgs() {
			out = append(out, fmt.Sprintf("%s/%d/%s", m.Subject, m.Batch.Len(), m.LastKey))
		}
		return out
	}
	a, b := build(), build()
	if fmt.Sprint(a) != fmt.Sprint(b) {
		t.Fatalf("same entries, different rounds:\n%v\n%v", a, b)
	}
	// 4 subjects × 5 entries, at most 3 per batch: 2 batches per subject,
	// the second opened when the first filled.
	if len(a) != 8 || a[0] != "s.0/3/k8" || a[4] != "s.0/2/k16" {
		t.Fatalf("round %v", a)
	}
	r := NewRound(1000, 100)
	r.Add("s", &Entry{Key: []byte("a"), Body: make([]byte, 500)})
	r.Add("s", &Entry{Key: []byte("b"), Body: []byte("x")})
	if len(r.Msgs()) != 2 || r.Entries() != 2 {
		t.Fatalf("an oversized entry should get a batch of its own: %d messages", len(r.Msgs()))
	}
	r.Reset()
	if len(r.Msgs()) != 0 || r.Entries() != 0 || r.Bytes() != 0 {
		t.Fatal("Reset left entries")
	}
}
