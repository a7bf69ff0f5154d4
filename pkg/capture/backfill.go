package capture

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgs2/pgs2/pkg/backfill"
	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/change"
	"github.com/pgs2/pgs2/pkg/config"
	"github.com/pgs2/pgs2/pkg/pgrepl"
	"github.com/pgs2/pgs2/pkg/restart"
)

// A backfill runs in capture, one chunk at a time per job and table:
//
//  1. the runner writes the low watermark L_k into the WAL, reads the chunk
//     (keyset, one short REPEATABLE READ transaction) and checks its
//     snapshot against the transactions the reader decoded before L_k;
//  2. it stages the rows in the object store and hands them to the reader
//     in memory, then writes the high watermark H_k;
//  3. the reader (the replication session) tracks the primary keys changed
//     in the table between L_k and H_k; at H_k it drops those rows and
//     places the rest in the stream as `read` changes at H_k's position, and
//     holds the slot at L_k until the runner has recorded the chunk;
//  4. once the changes stream holds everything up to H_k, the runner records
//     the chunk's progress and drops the staged rows.
//
// A restart of capture replays the WAL from before L_k: the reader rebuilds
// the window and finds the rows in the object store, so the same rows land
// at the same positions with the same keys (and the stream's own dedup skips
// those already in it).

// hub is where the runner's jobs and the reader meet.
type hub struct {
	mu       sync.Mutex
	rows     map[backfill.ChunkID]*backfill.Staged
	opened   map[backfill.ChunkID][]uint32 // the reader's decoded xids at a low watermark
	outcomes map[backfill.ChunkID]outcome
	release  []backfill.ChunkID
}

func newHub() *hub {
	return &hub{rows: map[backfill.ChunkID]*backfill.Staged{}, opened: map[backfill.ChunkID][]uint32{},
		outcomes: map[backfill.ChunkID]outcome{}}
}

// outcome is what the reader did at a chunk's high watermark.
type outcome struct {
	placed  bool // its rows are in the round (those not dropped)
	reason  string
	rows    int // read
	dropped int // changed in the window
	cursor  [][]byte
	last    bool
	bytes   int // of the rows read (set by the runner)
}

func (h *hub) putRows(id backfill.ChunkID, s *backfill.Staged) {
	h.mu.Lock()
	h.rows[id] = s
	h.mu.Unlock()
}

func (h *hub) takeRows(id backfill.ChunkID) *backfill.Staged {
	h.mu.Lock()
	defer h.mu.Unlock()
	s := h.rows[id]
	delete(h.rows, id)
	return s
}

func (h *hub) setOpened(id backfill.ChunkID, xids []uint32) {
	h.mu.Lock()
	h.opened[id] = xids
	h.mu.Unlock()
}

func (h *hub) takeOpened(id backfill.ChunkID) ([]uint32, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	x, ok := h.opened[id]
	delete(h.opened, id)
	return x, ok
}

func (h *hub) setOutcome(id backfill.ChunkID, o outcome) {
	h.mu.Lock()
	h.outcomes[id] = o
	h.mu.Unlock()
}

// takeOutcomes takes every outcome of job's table, by chunk.
func (h *hub) takeOutcomes(job, table string) map[int64]outcome {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := map[int64]outcome{}
	for id, o := range h.outcomes {
		if id.Job == job && id.Table == table {
			out[id.Chunk] = o
			delete(h.outcomes, id)
		}
	}
	return out
}

func (h *hub) takeOutcome(id backfill.ChunkID) (outcome, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	o, ok := h.outcomes[id]
	delete(h.outcomes, id)
	return o, ok
}

// releaseWindow lets the reader stop holding the slot for chunk id.
func (h *hub) releaseWindow(id backfill.ChunkID) {
	h.mu.Lock()
	h.release = append(h.release, id)
	delete(h.rows, id)
	h.mu.Unlock()
}

func (h *hub) released() []backfill.ChunkID {
	h.mu.Lock()
	defer h.mu.Unlock()
	r := h.release
	h.release = nil
	return r
}

// BackfillConfig are a source's backfill defaults.
type BackfillConfig struct {
	// ChunkSize is the most rows a chunk reads (default 1000); chunks
	// start smaller and grow while they read little (nextChunkSize).
	ChunkSize int
	// StatementTimeout bounds a chunk's query (default 30s).
	StatementTimeout time.Duration
	// MaxRowsPerSecond limits a job's reads (0: no limit).
	MaxRowsPerSecond int
	// SinkTables are each sink's tables: a job without tables reads its
	// sink's.
	SinkTables map[string][]string
	// Replicas of the KV bucket and object store.
	Replicas int
	// Initial are the sinks' initial backfills: created when missing, so
	// each runs once, when its sink first starts.
	Initial []backfill.Job
}

// backfills watches the jobs and runs this source's share of each.
type backfills struct {
	c     *Capture
	db    string
	store *backfill.Store
	stage *backfill.Stage

	mu      sync.Mutex
	running map[string]*jobRun
}

type jobRun struct {
	mu    sync.Mutex
	job   backfill.Job
	wake  chan struct{} // a state change
	ended bool
}

func (j *jobRun) state() string {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.job.State
}

// runBackfills runs until ctx ends.
func (c *Capture) runBackfills(ctx context.Context, db string) {
	b := &backfills{c: c, db: db, running: map[string]*jobRun{}}
	err := restart.Until(ctx, sessionRestarts, func(ctx context.Context) (err error) {
		if b.store, err = backfill.Ensure(ctx, c.js, c.cfg.Backfill.Replicas); err != nil {
			return err
		}
		b.stage, err = backfill.EnsureStage(ctx, c.js, c.cfg.Backfill.Replicas)
		return err
	}, nil, func(err error, wait time.Duration) {
		c.log.Warn("cannot set up the backfill store yet; retrying", "error", err, "retry_in", wait)
	})
	if err != nil {
		return
	}
	c.stage.Store(b.stage)
	c.store.Store(b.store)
	c.createInitial(ctx, b.store, c.live.Load().Backfill.Initial)
	restart.Loop(ctx, sessionRestarts, func(ctx context.Context) error {
		return b.store.WatchJobs(ctx, func(j backfill.Job) { b.update(ctx, j) })
	}, func(err error, wait time.Duration) bool {
		c.log.Warn("backfill watch ended; restarting", "error", err, "retry_in", wait)
		return true
	})
}

// createInitial creates the sinks' initial backfills that do not exist yet.
func (c *Capture) createInitial(ctx context.Context, store *backfill.Store, jobs []backfill.Job) {
	for _, j := range jobs {
		err := restart.Until(ctx, sessionRestarts, func(ctx context.Context) error {
			j.Created = time.Now().UTC()
			err := store.Create(ctx, j)
			if errors.Is(err, backfill.ErrExists) {
				return nil
			}
			if err == nil {
				c.log.Info("initial backfill of a sink started", "backfill", j.ID, "sink", j.Sink)
			}
			return err
		}, func(err error) bool { return errors.Is(err, backfill.ErrBadID) }, func(err error, wait time.Duration) {
			c.log.Warn("cannot create a sink's initial backfill yet; retrying", "backfill", j.ID, "error", err, "retry_in", wait)
		})
		if err != nil && ctx.Err() == nil {
			c.log.Error("cannot create a sink's initial backfill", "backfill", j.ID, "error", err)
		}
	}
}

func (b *backfills) update(ctx context.Context, j backfill.Job) {
	if j.Source != "" && j.Source != b.c.cfg.Source {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if r := b.running[j.ID]; r != nil {
		r.mu.Lock()
		r.job = j
		ended := r.ended
		r.mu.Unlock()
		select {
		case r.wake <- struct{}{}:
		default:
		}
		if !ended {
			return
		}
	}
	if j.State != backfill.Running {
		return
	}
	r := &jobRun{job: j, wake: make(chan struct{}, 1)}
	b.running[j.ID] = r
	go func() {
		b.run(ctx, r)
		r.mu.Lock()
		r.ended = true
		r.mu.Unlock()
	}()
}

// run works through the job's tables, retrying after failures.
func (b *backfills) run(ctx context.Context, r *jobRun) {
	restart.Loop(ctx, sessionRestarts, func(ctx context.Context) error {
		err := b.runOnce(ctx, r)
		if err == nil {
			return errJobEnded
		}
		return err
	}, func(err error, wait time.Duration) bool {
		if errors.Is(err, errJobEnded) {
			return false
		}
		b.c.log.Warn("backfill interrupted; resuming", "backfill", r.job.ID, "error", err, "retry_in", wait)
		b.c.serverStopping(err)
		return true
	})
}

var errJobEnded = errors.New("backfill ended")

func (b *backfills) runOnce(ctx context.Context, r *jobRun) error {
	c := b.c
	conn, err := pgrepl.Connect(ctx, c.cfg.Repl)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	job := func() backfill.Job { r.mu.Lock(); defer r.mu.Unlock(); return r.job }()
	// Chunks started before this run and never finished are abandoned; the
	// reader passes the abort after every earlier watermark of the job.
	lsn, err := c.emit(ctx, conn, backfill.Marker{Source: c.cfg.Source, Job: job.ID, W: backfill.Abort})
	if err != nil {
		return err
	}
	if err := c.waitAcked(ctx, lsn); err != nil {
		return err
	}
	for _, spec := range b.tables(job) {
		if err := b.table(ctx, conn, r, spec); err != nil {
			return err
		}
		if r.state() == backfill.Cancelled {
			return nil
		}
	}
	return nil
}

// tables are the job's tables this source captures.
func (b *backfills) tables(j backfill.Job) []backfill.TableSpec {
	if len(j.Tables) > 0 {
		return j.Tables
	}
	var out []backfill.TableSpec
	for _, t := range b.c.live.Load().Backfill.SinkTables[j.Sink] {
		out = append(out, backfill.TableSpec{Table: t})
	}
	return out
}

// table backfills one table until it is done, cancelled or fails.
func (b *backfills) table(ctx context.Context, conn *pgx.Conn, r *jobRun, spec backfill.TableSpec) error {
	c := b.c
	job := func() backfill.Job { r.mu.Lock(); defer r.mu.Unlock(); return r.job }()
	table := spec.Table // as config.ParseTable names it
	if !strings.Contains(table, ".") {
		table = "public." + table
	}
	p, rev, err := b.store.Progress(ctx, job.ID, c.cfg.Source, table)
	if err != nil {
		return err
	}
	if p.State == backfill.Done || p.State == backfill.Cancelled || p.State == backfill.Failed {
		return nil
	}
	if rev == 0 {
		p = backfill.Progress{Job: job.ID, Source: c.cfg.Source, Table: table, State: backfill.Running, Started: time.Now().UTC()}
	}
	fail := func(err error) error {
		p.State, p.Error = backfill.Failed, err.Error()
		_, perr := b.store.PutProgress(ctx, p, rev)
		c.log.Error("backfill of a table failed", "backfill", job.ID, "table", table, "error", err)
		return perr
	}
	live := c.live.Load()
	if err := config.CheckWhere(spec.Where); err != nil {
		return fail(err)
	}
	if !slices.Contains(live.Repl.Tables, table) {
		return fail(fmt.Errorf("table %s is not captured by source %s: add it to source.tables", table, c.cfg.Source))
	}
	schema, name := config.SplitTable(table)
	enc, err := pgrepl.NewReadEncoder(ctx, conn, b.db, schema, name, c.cfg.Repl.GroupColumns[table])
	if err != nil {
		if errors.Is(err, pgrepl.ErrSetup) {
			return fail(err)
		}
		return err
	}
	qualified := pgx.Identifier{schema, name}.Sanitize()
	if rev == 0 {
		p.Estimate = estimate(ctx, conn, qualified, spec.Where)
		// Read up to the largest key of now: rows inserted later reach the
		// stream as inserts, and a table growing at its end cannot keep
		// the backfill from finishing.
		until, err := lastKey(ctx, conn, backfill.LastKeyQuery(qualified, enc.PrimaryKey(), spec.Where), live.Backfill.StatementTimeout)
		var pe *pgconn.PgError
		if errors.As(err, &pe) {
			return fail(fmt.Errorf("cannot read %s where %q: %w", table, spec.Where, err))
		} else if err != nil {
			return err
		}
		for _, v := range until {
			p.Until = append(p.Until, string(v))
		}
		if until == nil {
			p.State = backfill.Done // nothing to read
		}
		if rev, err = b.store.PutProgress(ctx, p, 0); err != nil {
			return err
		}
	}
	until := make([][]byte, len(p.Until))
	for i, v := range p.Until {
		until[i] = []byte(v)
	}
	maxSize := job.ChunkSize
	if maxSize <= 0 {
		maxSize = live.Backfill.ChunkSize
	}
	size := min(firstChunk, maxSize)
	rate := job.MaxRowsPerSecond
	if rate <= 0 {
		rate = live.Backfill.MaxRowsPerSecond
	}
	cursor := make([][]byte, len(p.Cursor))
	for i, v := range p.Cursor {
		cursor[i] = []byte(v)
	}
	id := backfill.ChunkID{Job: job.ID, Table: table}
	// A chunk of an earlier run that reached its high watermark was placed
	// by the reader on its way to the job's abort.
	record := func(k int64, o outcome) error {
		p.Rows += int64(o.rows)
		p.Cursor = p.Cursor[:0]
		for _, v := range o.cursor {
			p.Cursor = append(p.Cursor, string(v))
		}
		cursor = o.cursor
		p.ChunkDone, p.ChunkStarted, p.Error = k, k, ""
		if o.last {
			p.State = backfill.Done
		}
		rev, err = b.store.PutProgress(ctx, p, rev)
		return err
	}
	// Chunks an earlier run left unfinished: one that reached its high
	// watermark was placed by the reader on its way to the job's abort.
	next := p.ChunkDone + 1
	earlier := c.hub.takeOutcomes(job.ID, table)
	for _, k := range slices.Sorted(maps.Keys(earlier)) {
		id.Chunk = k
		if o := earlier[k]; k > p.ChunkDone && o.placed {
			if err := record(k, o); err != nil {
				c.hub.setOutcome(id, o) // for the next run
				return err
			}
		}
		if err := b.stage.Delete(ctx, backfill.StageName(c.cfg.Source, id)); err != nil {
			return err
		}
		c.hub.releaseWindow(id)
		next = max(next, k+1)
	}
	started := time.Now()
	var read int64
	for p.State != backfill.Done {
		switch r.state() {
		case backfill.Paused:
			if p.State != backfill.Paused {
				p.State = backfill.Paused
				if rev, err = b.store.PutProgress(ctx, p, rev); err != nil {
					return err
				}
				c.log.Info("backfill paused", "backfill", job.ID, "table", table)
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-r.wake:
			}
			started, read = time.Now(), 0
			continue
		case backfill.Cancelled:
			p.State = backfill.Cancelled
			_, err := b.store.PutProgress(ctx, p, rev)
			c.log.Info("backfill cancelled", "backfill", job.ID, "table", table)
			return err
		}
		if p.State == backfill.Paused {
			p.State = backfill.Running
			if rev, err = b.store.PutProgress(ctx, p, rev); err != nil {
				return err
			}
			c.log.Info("backfill resumed", "backfill", job.ID, "table", table)
		}
		// Chunk numbers are never reused: a window released late must not
		// be a newer chunk's.
		id.Chunk, next = next, next+1
		m := backfill.Marker{Source: c.cfg.Source, Job: job.ID, Table: table, Chunk: id.Chunk}
		o, err := b.chunk(ctx, conn, enc, m, qualified, spec.Where, cursor, until, size, job.Sink)
		if err != nil {
			// Close the chunk's window, if it opened (the reader holds the
			// slot for it until then).
			m.W = backfill.Abort
			_, _ = c.emit(context.WithoutCancel(ctx), conn, m)
			return err
		}
		if o.placed || o.bytes > 0 { // an abandoned chunk read nothing to size by
			size = nextChunkSize(size, maxSize, o.bytes)
		}
		if o.placed {
			if err := record(id.Chunk, o); err != nil {
				c.hub.setOutcome(id, o) // for the next run
				return err
			}
		} else {
			c.metrics.Rereads.Inc()
			c.log.Warn("backfill chunk read again", "backfill", job.ID, "table", table, "chunk", id.Chunk, "reason", o.reason)
			// The table's columns may have changed: read with its columns of now.
			if enc, err = pgrepl.NewReadEncoder(ctx, conn, b.db, schema, name, c.cfg.Repl.GroupColumns[table]); err != nil {
				if errors.Is(err, pgrepl.ErrSetup) {
					return fail(err)
				}
				return err
			}
		}
		if err := b.stage.Delete(ctx, backfill.StageName(c.cfg.Source, id)); err != nil {
			return err
		}
		c.hub.releaseWindow(id)
		c.metrics.BackfillRows.Add(float64(o.rows - o.dropped))
		read += int64(o.rows)
		if rate > 0 {
			due := started.Add(time.Duration(float64(read) / float64(rate) * float64(time.Second)))
			if wait := time.Until(due); wait > 0 {
				select {
				case <-ctx.Done():
					return ctx.Err()
				case <-time.After(wait):
				}
			}
		}
	}
	if p.State == backfill.Done {
		c.log.Info("backfill of a table done", "backfill", job.ID, "table", table, "rows", p.Rows)
	}
	return nil
}

// chunk reads and places one chunk; the outcome is the reader's.
func (b *backfills) chunk(ctx context.Context, conn *pgx.Conn, enc *pgrepl.ReadEncoder, m backfill.Marker, qualified, where string,
	cursor, until [][]byte, size int, sink string) (_ outcome, err error) {
	c := b.c
	id := m.ID()
	// Until its high watermark is written no row of the chunk can be in
	// the stream: a failure before it releases the window, so that the
	// slot is not held for a chunk nobody will finish (a Postgres
	// shutdown waits for the slot to be confirmed up to the end).
	high := false
	defer func() {
		if err != nil && !high {
			c.hub.releaseWindow(id)
		}
	}()
	m.W = backfill.Low
	if _, err := c.emit(ctx, conn, m); err != nil {
		return outcome{}, err
	}

	q := backfill.ChunkQuery(qualified, enc.SelectList(), enc.PrimaryKey(), where, len(cursor) > 0, true, size+1)
	ch, err := backfill.ReadChunk(ctx, conn, q, append(slices.Clone(cursor), until...), c.live.Load().Backfill.StatementTimeout)
	if err != nil {
		return outcome{}, err
	}
	// A transaction the reader decoded before L_k that the snapshot saw
	// running (in its commit, waiting for a synchronous standby) changed
	// rows this chunk read in their older version: read it again.
	decoded, err := c.waitOpened(ctx, id)
	if err != nil {
		return outcome{}, err
	}
	xip := backfill.Xip(ch.Snapshot)
	if missed := backfill.Missed(xip, decoded); len(missed) > 0 {
		return b.abandon(ctx, conn, m, fmt.Sprintf("its snapshot missed transactions %v committed before its low watermark", missed))
	}
	if n, err := syncRepWaiters(ctx, conn, xip); err != nil {
		return outcome{}, err
	} else if n > 0 {
		return b.abandon(ctx, conn, m, fmt.Sprintf("%d transactions of its snapshot were waiting for a synchronous standby", n))
	}
	st := &backfill.Staged{Shape: enc.Shape(), Schema: enc.Schema(), Name: enc.Name(), Sink: sink, ReadAt: ch.ReadAt,
		Last: len(ch.Rows) <= size, Rows: ch.Rows[:min(len(ch.Rows), size)], Cursor: cursor}
	if n := len(st.Rows); n > 0 {
		last := st.Rows[n-1]
		st.Cursor = make([][]byte, 0, len(enc.PrimaryKeyIndexes()))
		for _, i := range enc.PrimaryKeyIndexes() {
			st.Cursor = append(st.Cursor, last[i])
		}
	}
	if err := b.stage.Put(ctx, backfill.StageName(c.cfg.Source, id), st); err != nil {
		return outcome{}, err
	}
	c.hub.putRows(id, st)
	m.W = backfill.High
	high = true // from here it may be in the WAL
	highLSN, err := c.emit(ctx, conn, m)
	if err != nil {
		high = !pgconn.SafeToRetry(err) // not sent at all: not in the WAL
		return outcome{}, err
	}
	if err := c.waitAcked(ctx, highLSN); err != nil {
		return outcome{}, err
	}
	o, ok := c.hub.takeOutcome(id)
	if !ok {
		return outcome{}, fmt.Errorf("backfill %s chunk %d of %s: no outcome at its high watermark", m.Job, m.Chunk, m.Table)
	}
	for _, r := range st.Rows {
		for _, v := range r {
			o.bytes += len(v)
		}
	}
	return o, nil
}

// Chunks grow from firstChunk rows, doubling while they read less than
// chunkBytesLow, up to the configured size, and halve above chunkBytesHigh:
// a table of small rows is read in large chunks (cheaper per row all
// along the pipeline), one of wide rows in small ones (memory stays
// bounded by bytes, not rows).
const (
	firstChunk     = 100
	chunkBytesLow  = 2 << 20
	chunkBytesHigh = 8 << 20
)

// nextChunkSize adapts a table's chunk size to what its last chunk read.
func nextChunkSize(size, maxSize, bytes int) int {
	switch {
	case bytes > chunkBytesHigh && size > 1:
		return size / 2
	case bytes < chunkBytesLow && size < maxSize:
		return min(maxSize, 2*size)
	}
	return min(size, maxSize)
}

// abandon closes chunk m's window without rows.
func (b *backfills) abandon(ctx context.Context, conn *pgx.Conn, m backfill.Marker, reason string) (outcome, error) {
	m.W = backfill.Abort
	lsn, err := b.c.emit(ctx, conn, m)
	if err != nil {
		return outcome{}, err
	}
	if err := b.c.waitAcked(ctx, lsn); err != nil {
		return outcome{}, err
	}
	return outcome{reason: reason}, nil
}

// syncRepWaiters counts the backends of xids (a snapshot's in-progress
// list) that are in their commit, waiting for a synchronous standby.
func syncRepWaiters(ctx context.Context, conn *pgx.Conn, xids []uint32) (int, error) {
	if len(xids) == 0 {
		return 0, nil
	}
	ids := make([]int64, len(xids))
	for i, x := range xids {
		ids[i] = int64(x)
	}
	var n int
	if err := conn.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity
		WHERE backend_xid IS NOT NULL AND backend_xid::text::bigint = ANY($1) AND wait_event = 'SyncRep'`, ids).Scan(&n); err != nil {
		return 0, fmt.Errorf("check the chunk's snapshot for commits in progress: %w", err)
	}
	return n, nil
}

// lastKey runs query (backfill.LastKeyQuery) and returns the key's text
// values; nil when there are no rows.
func lastKey(ctx context.Context, conn *pgx.Conn, query string, timeout time.Duration) ([][]byte, error) {
	// As a chunk: read only, under the statement timeout.
	ch, err := backfill.ReadChunk(ctx, conn, query, nil, timeout)
	if err != nil || len(ch.Rows) == 0 {
		return nil, err
	}
	return ch.Rows[0], nil
}

// estimate is the planner's row estimate of the table (with where).
func estimate(ctx context.Context, conn *pgx.Conn, qualified, where string) int64 {
	q := "EXPLAIN (FORMAT JSON) SELECT 1 FROM " + qualified
	if where != "" {
		q += " WHERE (" + where + ")"
	}
	var plan []struct {
		Plan struct {
			Rows float64 `json:"Plan Rows"`
		} `json:"Plan"`
	}
	var raw []byte
	if err := conn.QueryRow(ctx, q).Scan(&raw); err != nil || json.Unmarshal(raw, &plan) != nil || len(plan) == 0 {
		return 0
	}
	return int64(plan[0].Plan.Rows)
}

// waitAcked waits until the changes stream holds everything before lsn
// (the reader marks a watermark's position once it has handled it).
func (c *Capture) waitAcked(ctx context.Context, lsn uint64) error {
	t := time.NewTicker(time.Millisecond)
	defer t.Stop()
	for {
		if p := c.pub.Load(); p != nil && p.Acked() >= lsn {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

// waitOpened waits until the reader passed chunk id's low watermark and
// returns the xids it had decoded before it.
func (c *Capture) waitOpened(ctx context.Context, id backfill.ChunkID) ([]uint32, error) {
	t := time.NewTicker(time.Millisecond)
	defer t.Stop()
	for {
		if x, ok := c.hub.takeOpened(id); ok {
			return x, nil
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-t.C:
		}
	}
}

// placeChunk is the reader at chunk m's high watermark (at lsn): it places
// the chunk's rows less those changed in its window.
func (s *session) placeChunk(ctx context.Context, m backfill.Marker, lsn uint64) error {
	id := m.ID()
	changed, ok := s.windows.Close(m)
	if !ok {
		s.hub.setOutcome(id, outcome{reason: "its high watermark came without its low one"})
		s.markAt(lsn)
		return nil
	}
	st := s.hub.takeRows(id)
	if st == nil {
		if stage := s.stage.Load(); stage != nil {
			var err error
			if st, err = stage.Get(ctx, backfill.StageName(s.cfg.Source, id)); err != nil {
				return err
			}
		}
	}
	if st == nil { // finished before a restart, or never staged
		s.windows.Release(id)
		s.markAt(lsn)
		return nil
	}
	enc, err := s.readEncoder(ctx, st)
	if err != nil {
		return err
	}
	if enc == nil {
		s.windows.Release(id)
		s.hub.setOutcome(id, outcome{reason: "the table's columns changed since the chunk was read"})
		s.markAt(lsn)
		return nil
	}
	// The rows go between the transactions before H_k and after it: at
	// lsn-1, inside H_k's own record, where no transaction commits.
	at := lsn - 1
	ts := pgrepl.FormatCommitTime(s.readTS[:0], st.ReadAt)
	s.readTS = ts
	dropped := func(i int) (bool, error) {
		row, err := enc.Encode(st.Rows[i], change.Position{LSN: at, Idx: i}, ts)
		if err != nil {
			return false, err
		}
		return changed[string(row.PK)], nil
	}
	last := -1
	if st.Last {
		for i := len(st.Rows) - 1; i >= 0; i-- {
			d, err := dropped(i)
			if err != nil {
				return err
			}
			if !d {
				last = i
				break
			}
		}
	}
	o := outcome{placed: true, rows: len(st.Rows), cursor: st.Cursor, last: st.Last}
	sink, job := []byte(st.Sink), []byte(m.Job)
	s.table = append(append(append(s.table[:0], st.Schema...), '.'), st.Name...)
	for i, vals := range st.Rows {
		r, err := enc.Encode(vals, change.Position{LSN: at, Idx: i}, ts)
		if err != nil {
			return err
		}
		if changed[string(r.PK)] {
			o.dropped++
			continue
		}
		if s.resume.Skip(r.Pos, r.Key) {
			s.skipped++
			s.metrics.Skipped.Inc()
			continue
		}
		e := &s.entry
		*e = bus.Entry{Key: r.Key, Group: r.Group, Action: []byte(r.Action), Table: s.table, Schema: s.table[:len(st.Schema)], CommitMs: st.ReadAt / 1000,
			Sink: sink, Backfill: job, BackfillLast: i == last, Body: r.Body}
		if err := s.add(ctx, &r, e); err != nil {
			return err
		}
	}
	s.hub.setOutcome(id, o)
	s.markAt(lsn)
	return nil
}

// readEncoder returns an encoder of st's table with st's columns; nil when
// the table's columns are no longer those.
func (s *session) readEncoder(ctx context.Context, st *backfill.Staged) (*pgrepl.ReadEncoder, error) {
	// The table's columns now, not when the encoder was made: a schema
	// change before H_k gives the changes after it new columns, and the
	// reads at H_k must have them too.
	shape, err := pgrepl.ReadShape(ctx, s.catConn, st.Schema, st.Name)
	if err != nil {
		var pe *pgconn.PgError
		if errors.As(err, &pe) {
			return nil, nil // the table is gone: the runner finds out
		}
		return nil, err
	}
	if shape != st.Shape {
		return nil, nil
	}
	key := st.Schema + "." + st.Name
	if e := s.encoders[key]; e != nil && e.Shape() == st.Shape {
		return e, nil
	}
	e, err := pgrepl.NewReadEncoder(ctx, s.catConn, s.db, st.Schema, st.Name, s.cfg.Repl.GroupColumns[key])
	if err != nil {
		if errors.Is(err, pgrepl.ErrSetup) {
			return nil, nil
		}
		return nil, err
	}
	s.encoders[key] = e
	if e.Shape() != st.Shape {
		return nil, nil
	}
	return e, nil
}

// onMarker handles a backfill watermark of this source at lsn.
func (s *session) onMarker(ctx context.Context, content []byte, lsn uint64) error {
	m, err := backfill.ParseMarker(content)
	if err != nil {
		s.log.Warn("ignoring a logical decoding message with pgs2's prefix", "error", err)
		return nil
	}
	if m.Source != s.cfg.Source {
		return nil // another pgs2 source on the same database
	}
	switch m.W {
	case backfill.Low:
		s.windows.Open(m, s.pub.Acked())
		s.hub.setOpened(m.ID(), s.ring.Copy())
	case backfill.High:
		return s.placeChunk(ctx, m, lsn)
	case backfill.Abort:
		s.windows.Abort(m)
		s.markAt(lsn)
	}
	return nil
}

// markAt marks lsn for confirmation once everything before it is
// published: a watermark's position, which the runner waits for.
func (s *session) markAt(lsn uint64) {
	if s.round.Entries() == 0 && s.pendingCommit == 0 {
		s.pub.Mark(lsn)
		return
	}
	s.pendingCommit = max(s.pendingCommit, lsn)
}
