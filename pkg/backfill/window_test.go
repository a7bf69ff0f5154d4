package backfill

import (
	"slices"
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
	ws.Release(b1.ID())
	if lsn, ok := ws.Hold(); !ok || lsn != 100 {
		t.Fatalf("hold %d %v, want 100", lsn, ok)
	}
	ws.Release(ChunkID{Job: "a", Table: "public.t", Chunk: 7}) // another chunk: nothing
	ws.Release(a1.ID())
	if _, ok := ws.Hold(); ok || ws.Tracking([]byte("public.t")) {
		t.Fatal("released windows still held or tracked")
	}
	// A chunk's abort drops its window; a job's abort (chunk 0, a restart)
	// drops every window of the job still open, not the closed ones.
	a3, a4, a5 := Marker{Job: "a", Table: "public.t", Chunk: 3}, Marker{Job: "a", Table: "public.u", Chunk: 4}, Marker{Job: "a", Table: "public.t", Chunk: 5}
	ws.Open(a3, 200)
	ws.Close(a3)
	ws.Open(a4, 300)
	ws.Open(a5, 400)
	ws.Abort(a5)
	if ws.open[a5.ID()] != nil {
		t.Fatal("an aborted chunk is still open")
	}
	// A runner stopped after the high watermark aborts its chunk: the
	// rows are placed, the hold stays until the chunk is recorded.
	ws.Abort(a3)
	if !ws.Held(a3.ID()) {
		t.Fatal("an abort after the high watermark released the chunk's hold")
	}
	ws.Abort(Marker{Job: "a"})
	if lsn, ok := ws.Hold(); !ok || lsn != 200 || ws.Tracking([]byte("public.u")) {
		t.Fatalf("hold %d %v after the job's abort, want 200 (the closed chunk)", lsn, ok)
	}
}

func TestRing(t *testing.T) {
	r := NewRing(4)
	for x := uint32(1); x <= 6; x++ {
		r.Add(x)
	}
	got := r.Copy()
	slices.Sort(got)
	if !slices.Equal(got, []uint32{3, 4, 5, 6}) {
		t.Fatalf("ring %v", got)
	}
	// 64-bit ids of pg_snapshot: the low 32 bits are pgoutput's xid.
	xip := Xip("4294967300:4294967310:4294967301,4294967305")
	if !slices.Equal(xip, []uint32{5, 9}) {
		t.Fatalf("xip %v", xip)
	}
	if m := Missed(xip, got); !slices.Equal(m, []uint32{5}) {
		t.Fatalf("missed %v", m)
	}
	if Xip("10:10:") != nil || Missed(nil, got) != nil {
		t.Fatal("an empty snapshot has no xids in progress")
	}
}

// TestReleaseBeforeOpen: a chunk released before its low watermark is
// decoded opens no window (nothing would ever close it).
func TestReleaseBeforeOpen(t *testing.T) {
	ws := NewWindows()
	m := Marker{Source: "app", Job: "j", Table: "public.t", Chunk: 7, W: Low}
	ws.Release(m.ID())
	ws.Open(m, 100)
	if _, ok := ws.Hold(); ok || ws.Tracking([]byte("public.t")) {
		t.Fatal("a released chunk's window opened and holds the slot")
	}
	m.Chunk = 8 // another chunk opens as before
	ws.Open(m, 200)
	if lsn, ok := ws.Hold(); !ok || lsn != 200 {
		t.Fatalf("hold %d %v, want 200", lsn, ok)
	}
}
