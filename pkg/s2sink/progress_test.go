package s2sink

import (
	"context"
	"strings"
	"testing"

	"github.com/s2-streamstore/s2-sdk-go/s2"

	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/s2local"
)

// TestProgressEdges: the resume point is exact after a drained park (a
// record carrying an older position appended last), behind records over
// 1 KiB (a read of the last 1000 stops at 1 MiB), and behind more than
// 1000 command records (a fence per session). On d7607e1 these returned
// 5.0, 493.0 and nothing.
func TestProgressEdges(t *testing.T) {
	_, url := local(t, s2local.Options{})
	c, _ := New(Config{Endpoint: url})
	ctx := context.Background()
	pos := func(seq uint64) bus.DeliveryPos { return bus.DeliveryPos{Stream: "A@1", Seq: seq} }
	appendPos := func(stream string, body []byte, through *bus.DeliveryPos, seqs ...uint64) {
		t.Helper()
		b := NewBatch(0, 0)
		for i, seq := range seqs {
			r := Record(&bus.Entry{}, body, pos(seq))
			if through != nil && i == len(seqs)-1 {
				r = WithResume(r, bus.Progress{through.Stream: *through, "B@2": {Stream: "B@2", Seq: 4}}, "")
			}
			if err := b.Add(r); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := c.Append(ctx, basin, stream, b, nil); err != nil {
			t.Fatal(err)
		}
	}
	check := func(stream string, want bus.DeliveryPos, others ...bus.DeliveryPos) {
		t.Helper()
		r, err := FindResume(ctx, c, basin, stream)
		w := bus.Progress{want.Stream: want}
		for _, o := range others {
			w[o.Stream] = o
		}
		if err != nil || !r.Found || !r.Through.Equal(w) {
			t.Fatalf("%s: Resume = %+v, %v; want through %v", stream, r, err, w)
		}
	}

	_ = c.CreateStream(ctx, basin, "drained")
	appendPos("drained", []byte("x"), nil, 1, 2, 3, 4, 10)
	ten := pos(10)
	appendPos("drained", []byte("x"), &ten, 5) // the park of 5 drained after 10
	check("drained", ten, bus.DeliveryPos{Stream: "B@2", Seq: 4})

	_ = c.CreateStream(ctx, basin, "large")
	big := []byte(strings.Repeat("x", 2048))
	for seq := uint64(0); seq < 1000; seq += 100 {
		seqs := make([]uint64, 100)
		for i := range seqs {
			seqs[i] = seq + uint64(i)
		}
		appendPos("large", big, nil, seqs...)
	}
	check("large", pos(999))

	_ = c.CreateStream(ctx, basin, "fenced")
	appendPos("fenced", []byte("x"), nil, 7)
	for i := 0; i < 1100; i++ {
		if _, err := c.Fence(ctx, basin, "fenced", "w"); err != nil {
			t.Fatal(err)
		}
	}
	check("fenced", pos(7))

	_ = c.CreateStream(ctx, basin, "foreign")
	appendPos("foreign", []byte("x"), nil, 3)
	fb := NewBatch(0, 0)
	_ = fb.Add(s2.AppendRecord{Body: big})
	for i := 0; i < 3; i++ {
		if _, err := c.Append(ctx, basin, "foreign", fb, nil); err != nil {
			t.Fatal(err)
		}
	}
	check("foreign", pos(3))
}
