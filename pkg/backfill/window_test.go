package backfill

import (
	"testing"
)

func TestWindows(t *testing.T) {
	ws := NewWindows()
	if ws.Tracking([]byte("public.t")) {
		t.Fatal("tracking with no window open")
	}
	if _, ok := ws.Hold(); ok {
		t.Fatal("a hold with no window")
	}
	a1 := Marker{Job: "a", Table: "public.t", Chunk: 1}
	b1 := Marker{Job: "b", Table: "public.t", Chunk: 1}
	ws.Observe([]byte("public.t"), []byte(`["0"]`), nil) // before any window: not kept
	ws.Open(a1, 100)
	ws.Observe([]byte("public.t"), []byte(`["1"]`), nil)
	ws.Open(b1, 90)
	ws.Observe([]byte("public.t"), []byte(`["2"]`), []byte(`["3"]`)) // a key change: both keys
	ws.Observe([]byte("public.u"), []byte(`["4"]`), nil)             // another table
	if lsn, ok := ws.Hold(); !ok || lsn != 90 {
		t.Fatalf("hold %d %v, want 90", lsn, ok)
	}
	if _, ok := ws.Close(Marker{Job: "a", Table: "public.t", Chunk: 2}); ok {
		t.Fatal("closed a chunk that is not open")
	}
	got, ok := ws.Close(a1)
	if !ok || len(got) != 3 || !got[`["1"]`] || !got[`["2"]`] || !got[`["3"]`] {
		t.Fatalf("a1 changed %v %v", got, ok)
	}
	if _, ok := ws.Close(a1); ok {
		t.Fatal("closed twice")
	}
	ws.Observe([]byte("public.t"), []byte(`["5"]`), nil)
	if got, ok := ws.Close(b1); !ok || len(got) != 3 || !got[`["5"]`] || got[`["1"]`] {
		t.Fatalf("b1 changed %v %v", got, ok)
	}
	// Closed windows still hold the slot until their rows are durable.
	ws.Release("b", 1)
	if lsn, ok := ws.Hold(); !ok || lsn != 100 {
		t.Fatalf("hold %d %v, want 100", lsn, ok)
	}
	ws.Release("a", 7) // another chunk: nothing
	ws.Release("a", 1)
	if _, ok := ws.Hold(); ok || ws.Tracking([]byte("public.t")) {
		t.Fatal("released windows still held or tracked")
	}
	// A restart: the low watermark of a chunk that never got its high one
	// is replaced by the next chunk's, or dropped by an abort.
	ws.Open(Marker{Job: "a", Table: "public.t", Chunk: 3}, 200)
	ws.Open(Marker{Job: "a", Table: "public.t", Chunk: 4}, 300)
	if lsn, _ := ws.Hold(); lsn != 300 || len(ws.byTable["public.t"]) != 1 {
		t.Fatalf("hold %d, %d windows on the table", lsn, len(ws.byTable["public.t"]))
	}
	ws.Abort(Marker{Job: "a", Table: "public.t", Chunk: 4})
	if _, ok := ws.Hold(); ok || ws.Tracking([]byte("public.t")) {
		t.Fatal("an aborted window is still held")
	}
}
