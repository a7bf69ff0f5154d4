package s2local

import (
	"bytes"
	"math/rand/v2"
	"testing"

	s2pb "github.com/s2-streamstore/s2-sdk-go/generated"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

func randBytes(r *rand.Rand, max int) []byte {
	n := r.IntN(max + 1)
	if n == 0 {
		return nil
	}
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.IntN(256))
	}
	return b
}

// TestProtoCodecsMatchGenerated checks the hand-written codecs against the
// SDK's generated s2.proto types: AppendInput in, ReadBatch out.
func TestProtoCodecsMatchGenerated(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for iter := range 300 {
		in := &s2pb.AppendInput{}
		for range 1 + r.IntN(20) {
			rec := &s2pb.AppendRecord{Body: randBytes(r, 300)}
			if r.IntN(2) == 0 {
				ts := r.Uint64N(1 << 50)
				rec.Timestamp = &ts
			}
			for range r.IntN(4) {
				rec.Headers = append(rec.Headers, &s2pb.Header{Name: append([]byte("h"), randBytes(r, 10)...), Value: randBytes(r, 20)})
			}
			in.Records = append(in.Records, rec)
		}
		if r.IntN(2) == 0 {
			m := r.Uint64()
			in.MatchSeqNum = &m
		}
		if r.IntN(2) == 0 {
			f := "token"
			in.FencingToken = &f
		}
		data, err := proto.Marshal(in)
		if err != nil {
			t.Fatal(err)
		}
		if iter%3 == 0 {
			// Unknown fields are skipped.
			data = protowire.AppendTag(data, 15, protowire.BytesType)
			data = protowire.AppendBytes(data, []byte("future"))
		}
		b := getBuilder()
		req, e := decodeAppendProto(data, b)
		if e != nil {
			t.Fatalf("iter %d: %v", iter, e)
		}
		if req.hasMatch != (in.MatchSeqNum != nil) || (req.hasMatch && req.matchSeq != *in.MatchSeqNum) ||
			req.hasFence != (in.FencingToken != nil) {
			t.Fatalf("iter %d: request %+v", iter, req)
		}
		// Sequence it (timestamps are the client's when given) and encode
		// a ReadBatch from the stored records.
		for i, ri := range b.recs {
			b.setTimestamp(i, ri.ts)
		}
		frame := b.frame(100)
		p := frame[frameHeaderLen:]
		var out []byte
		for i := range b.recs {
			sr, n, ok := nextRecord(p)
			if !ok {
				t.Fatal("bad stored record")
			}
			p = p[n:]
			out = appendRecordProto(out, 100+uint64(i), sr)
		}
		out = appendTailProto(out, position{100 + uint64(len(b.recs)), 7})
		putBuilder(b)
		var got s2pb.ReadBatch
		if err := proto.Unmarshal(out, &got); err != nil {
			t.Fatal(err)
		}
		if len(got.Records) != len(in.Records) || got.Tail.GetSeqNum() != 100+uint64(len(in.Records)) {
			t.Fatalf("iter %d: %d records, tail %v", iter, len(got.Records), got.Tail)
		}
		for i, want := range in.Records {
			g := got.Records[i]
			if g.SeqNum != 100+uint64(i) || g.Timestamp != want.GetTimestamp() || !bytes.Equal(g.Body, want.Body) || len(g.Headers) != len(want.Headers) {
				t.Fatalf("iter %d record %d: %v, want %v", iter, i, g, want)
			}
			for j := range want.Headers {
				if !bytes.Equal(g.Headers[j].Name, want.Headers[j].Name) || !bytes.Equal(g.Headers[j].Value, want.Headers[j].Value) {
					t.Fatalf("iter %d record %d header %d: %v, want %v", iter, i, j, g.Headers[j], want.Headers[j])
				}
			}
		}
	}
}

// TestProtoFieldOrder: fields may come in any order; the last body wins.
func TestProtoFieldOrder(t *testing.T) {
	var rec []byte
	rec = protowire.AppendTag(rec, 3, protowire.BytesType)
	rec = protowire.AppendBytes(rec, []byte("first"))
	rec = protowire.AppendTag(rec, 2, protowire.BytesType)
	rec = protowire.AppendBytes(rec, []byte("\x12\x01v\x0a\x01n")) // value before name
	rec = protowire.AppendTag(rec, 1, protowire.VarintType)
	rec = protowire.AppendVarint(rec, 5)
	rec = protowire.AppendTag(rec, 3, protowire.BytesType)
	rec = protowire.AppendBytes(rec, []byte("body"))
	var in []byte
	in = protowire.AppendTag(in, 1, protowire.BytesType)
	in = protowire.AppendBytes(in, rec)
	b := getBuilder()
	defer putBuilder(b)
	if _, e := decodeAppendProto(in, b); e != nil {
		t.Fatal(e)
	}
	var m s2pb.AppendRecord
	if err := proto.Unmarshal(rec, &m); err != nil {
		t.Fatal(err)
	}
	sr, _, _ := nextRecord(b.buf[frameHeaderLen:])
	var names, values []string
	body, ok := decodeRest(sr.rest, func(n, v []byte) { names, values = append(names, string(n)), append(values, string(v)) })
	if !ok || string(body) != string(m.Body) || b.recs[0].ts != 5 || !b.recs[0].hasTS ||
		len(names) != 1 || names[0] != "n" || values[0] != "v" || sr.metered != 8+2+2+4 {
		t.Fatalf("record: body %q ts %d names %v values %v metered %d", body, b.recs[0].ts, names, values, sr.metered)
	}
}
