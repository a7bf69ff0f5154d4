package backfill

import (
	"strconv"
	"strings"
)

// Windows is the reader's side of the watermarks: for each open chunk, the
// primary keys changed in its table between its low and high watermark,
// whose rows the chunk must drop (their newer version is in the stream
// already). It also says how far the slot may be confirmed: not past the
// low watermark of a chunk whose rows are not yet durable, so that a
// restart replays the whole window. Windows is not safe for concurrent use.
type Windows struct {
	open    map[ChunkID]*window
	byTable map[string][]*window
	// released are chunks released before their window opened (their
	// runner gave up before the high watermark): a later low watermark
	// of theirs opens nothing.
	released map[ChunkID]bool
}

// ChunkID names one chunk of a job.
type ChunkID struct {
	Job   string
	Table string
	Chunk int64
}

// ID is m's chunk.
func (m Marker) ID() ChunkID { return ChunkID{Job: m.Job, Table: m.Table, Chunk: m.Chunk} }

type window struct {
	id      ChunkID
	hold    uint64 // how far the slot may be confirmed while it is held
	changed map[string]bool
	closed  bool // its high watermark passed; held until Release
}

// NewWindows returns an empty set.
func NewWindows() *Windows {
	return &Windows{open: map[ChunkID]*window{}, byTable: map[string][]*window{}}
}

// Open starts chunk m's window at its low watermark; hold is how far the
// slot may be confirmed until the window is released (at most the last
// position confirmable before the watermark).
func (ws *Windows) Open(m Marker, hold uint64) {
	id := m.ID()
	if ws.released[id] {
		delete(ws.released, id)
		return
	}
	ws.remove(id)
	w := &window{id: id, hold: hold, changed: map[string]bool{}}
	ws.open[id] = w
	ws.byTable[m.Table] = append(ws.byTable[m.Table], w)
}

// Tracking reports whether changes of table (schema.table) must be
// observed.
func (ws *Windows) Tracking(table []byte) bool {
	return len(ws.byTable[string(table)]) > 0
}

// Observe records a change of table: its primary key and, for an update
// that sent the old row, the old one.
func (ws *Windows) Observe(table, pk, oldPK []byte) {
	for _, w := range ws.byTable[string(table)] {
		if w.closed {
			continue
		}
		w.changed[string(pk)] = true
		if len(oldPK) > 0 {
			w.changed[string(oldPK)] = true
		}
	}
}

// Close ends chunk m's window at its high watermark and returns the keys
// changed in it; ok is false when the window is not open (a high
// watermark without its low one, or seen twice).
func (ws *Windows) Close(m Marker) (changed map[string]bool, ok bool) {
	w := ws.open[m.ID()]
	if w == nil || w.closed {
		return nil, false
	}
	w.closed = true
	changed, w.changed = w.changed, nil
	return changed, true
}

// Abort drops chunk m's window or, when m.Chunk is 0, every window of
// m.Job, if its high watermark has not passed (abandoned chunks). A
// window past its high watermark has its rows in the stream: it holds the
// slot until Release, whatever the runner that read it did next.
func (ws *Windows) Abort(m Marker) {
	for id, w := range ws.open {
		if id.Job == m.Job && (m.Chunk == 0 || id == m.ID()) && !w.closed {
			ws.remove(id)
		}
	}
}

// Release drops chunk id's window once its rows are durable.
func (ws *Windows) Release(id ChunkID) {
	if ws.open[id] == nil {
		if ws.released == nil {
			ws.released = map[ChunkID]bool{}
		}
		ws.released[id] = true
		return
	}
	ws.remove(id)
}

// Held reports whether chunk id's window is open or held.
func (ws *Windows) Held(id ChunkID) bool { return ws.open[id] != nil }

// Hold is how far the slot may be confirmed: the lowest hold of the
// windows. ok is false when none is held.
func (ws *Windows) Hold() (lsn uint64, ok bool) {
	for _, w := range ws.open {
		if !ok || w.hold < lsn {
			lsn, ok = w.hold, true
		}
	}
	return lsn, ok
}

func (ws *Windows) remove(id ChunkID) {
	w := ws.open[id]
	if w == nil {
		return
	}
	delete(ws.open, id)
	list := ws.byTable[id.Table]
	for i, x := range list {
		if x == w {
			list = append(list[:i], list[i+1:]...)
			break
		}
	}
	if len(list) == 0 {
		delete(ws.byTable, id.Table)
	} else {
		ws.byTable[id.Table] = list
	}
}

// Ring keeps the xids of the last transactions decoded, for the staleness
// check of a chunk: a transaction whose commit record precedes the chunk's
// low watermark but which its snapshot still saw running (it was in its
// commit, typically waiting for a synchronous standby) changed rows the
// chunk read in their older version. Every transaction committed after
// it and before the watermark is in flight at the same time, so their
// number is bounded by the server's connections: a ring of RingSize
// (or max_connections, if larger) covers them. Not safe for concurrent use.
type Ring struct {
	xids []uint32
	next int
	full bool
}

// RingSize is the default ring length.
const RingSize = 8192

// NewRing returns a ring of n xids (RingSize when n ≤ 0).
func NewRing(n int) *Ring {
	if n <= 0 {
		n = RingSize
	}
	return &Ring{xids: make([]uint32, n)}
}

// Add records a decoded transaction.
func (r *Ring) Add(xid uint32) {
	r.xids[r.next] = xid
	r.next++
	if r.next == len(r.xids) {
		r.next, r.full = 0, true
	}
}

// Copy returns the xids held (in no particular order).
func (r *Ring) Copy() []uint32 {
	if r.full {
		return append([]uint32(nil), r.xids...)
	}
	return append([]uint32(nil), r.xids[:r.next]...)
}

// Xip parses the in-progress list of a pg_snapshot (xmin:xmax:xip, 64-bit
// ids) into pgoutput's 32-bit xids.
func Xip(snapshot string) []uint32 {
	parts := strings.SplitN(snapshot, ":", 3)
	if len(parts) != 3 || parts[2] == "" {
		return nil
	}
	var xip []uint32
	for _, x := range strings.Split(parts[2], ",") {
		if v, err := strconv.ParseUint(x, 10, 64); err == nil {
			xip = append(xip, uint32(v))
		}
	}
	return xip
}

// Missed returns the xids of xip found in decoded: transactions the
// snapshot saw running although their commit was already decoded.
func Missed(xip, decoded []uint32) []uint32 {
	if len(xip) == 0 {
		return nil
	}
	in := make(map[uint32]bool, len(xip))
	for _, x := range xip {
		in[x] = true
	}
	var out []uint32
	for _, x := range decoded {
		if in[x] {
			out = append(out, x)
			delete(in, x)
		}
	}
	return out
}
