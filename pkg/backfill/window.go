package backfill

// Windows is the reader's side of the watermarks: for each open chunk, the
// primary keys changed in its table between its low and high watermark,
// whose rows the chunk must drop (their newer version is in the stream
// already). It also says how far the slot may be confirmed: not past the
// low watermark of a chunk whose rows are not yet durable, so that a
// restart replays the whole window. Windows is not safe for concurrent use.
type Windows struct {
	byJob   map[string]*window
	byTable map[string][]*window
}

type window struct {
	m       Marker
	low     uint64
	changed map[string]bool // primary keys (JSON arrays of strings)
	closed  bool            // its high watermark passed; held until Release
}

// NewWindows returns an empty set.
func NewWindows() *Windows {
	return &Windows{byJob: map[string]*window{}, byTable: map[string][]*window{}}
}

// Open starts chunk m's window at its low watermark's LSN, replacing any
// earlier window of the same job (a chunk started before a restart that
// never reached its high watermark).
func (ws *Windows) Open(m Marker, lsn uint64) {
	ws.remove(m.Job)
	w := &window{m: m, low: lsn, changed: map[string]bool{}}
	ws.byJob[m.Job] = w
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
// changed in it; ok is false when the window is not open (a high watermark
// of another chunk, or one already closed).
func (ws *Windows) Close(m Marker) (changed map[string]bool, ok bool) {
	w := ws.byJob[m.Job]
	if w == nil || w.m.Chunk != m.Chunk || w.closed {
		return nil, false
	}
	w.closed = true
	changed, w.changed = w.changed, nil
	return changed, true
}

// Abort drops chunk m's window (its rows were never read).
func (ws *Windows) Abort(m Marker) {
	if w := ws.byJob[m.Job]; w != nil && w.m.Chunk <= m.Chunk {
		ws.remove(m.Job)
	}
}

// Release drops chunk (job, chunk)'s window once its rows are durable.
func (ws *Windows) Release(job string, chunk int64) {
	if w := ws.byJob[job]; w != nil && w.m.Chunk == chunk {
		ws.remove(job)
	}
}

// Hold is the lowest low-watermark LSN of the windows held: the slot may
// be confirmed up to it and no further. ok is false when none is held.
func (ws *Windows) Hold() (lsn uint64, ok bool) {
	for _, w := range ws.byJob {
		if !ok || w.low < lsn {
			lsn, ok = w.low, true
		}
	}
	return lsn, ok
}

func (ws *Windows) remove(job string) {
	w := ws.byJob[job]
	if w == nil {
		return
	}
	delete(ws.byJob, job)
	list := ws.byTable[w.m.Table]
	for i, x := range list {
		if x == w {
			list = append(list[:i], list[i+1:]...)
			break
		}
	}
	if len(list) == 0 {
		delete(ws.byTable, w.m.Table)
	} else {
		ws.byTable[w.m.Table] = list
	}
}
