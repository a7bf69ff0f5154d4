// Package backfill reads a table's existing rows in primary-key chunks, each
// bracketed by watermarks written through the WAL, so that capture can place
// them in the change stream consistently with the live changes (the
// watermark technique of DBLog).
package backfill

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
)

// Prefix is the logical decoding message prefix of pgs2's watermarks.
const Prefix = "pgs2"

// FlushPrefix is the prefix of the transactional message that flushes a
// watermark (ignored by readers).
const FlushPrefix = "pgs2.flush"

// Watermark kinds.
const (
	Low   = "low"   // the chunk's window opens: track the keys changed in its table
	High  = "high"  // the chunk's rows go here, less those whose key changed since Low
	Abort = "abort" // the chunk was never read (a restart): close its window
)

// Marker is a watermark's content.
type Marker struct {
	Source string `json:"source"`
	Job    string `json:"job"`
	Table  string `json:"table"`
	Chunk  int64  `json:"chunk"`
	W      string `json:"w"`
}

// ParseMarker reads a watermark's content.
func ParseMarker(content []byte) (Marker, error) {
	var m Marker
	if err := json.Unmarshal(content, &m); err != nil {
		return Marker{}, fmt.Errorf("backfill watermark %q: %w", content, err)
	}
	if m.W != Low && m.W != High && m.W != Abort {
		return Marker{}, fmt.Errorf("backfill watermark %q: unknown kind %q", content, m.W)
	}
	return m, nil
}

// Emit writes m into the WAL as a non-transactional logical decoding
// message and returns its LSN: it appears in the slot's stream after every
// transaction that committed before it and before every one after.
func Emit(ctx context.Context, conn *pgx.Conn, m Marker) (uint64, error) {
	b, err := json.Marshal(m)
	if err != nil {
		return 0, err
	}
	// A non-transactional message is not flushed by itself, and walsenders
	// send only flushed WAL: it would wait for the WAL writer
	// (wal_writer_delay, 200ms by default). The same statement commits a
	// transactional message, which flushes the WAL past it (locally: no
	// wait for a synchronous standby). PostgreSQL 17's flush argument
	// would do the same.
	var lsn string
	if err := conn.QueryRow(ctx, `SELECT pg_logical_emit_message(false, $1, $2)::text
		FROM (SELECT set_config('synchronous_commit', 'local', true), pg_logical_emit_message(true, $3, '')) AS flush`,
		Prefix, string(b), FlushPrefix).Scan(&lsn); err != nil {
		return 0, fmt.Errorf("write the %s watermark of %s chunk %d: %w", m.W, m.Table, m.Chunk, err)
	}
	l, err := pglogrepl.ParseLSN(lsn)
	if err != nil {
		return 0, fmt.Errorf("watermark LSN %q: %w", lsn, err)
	}
	return uint64(l), nil
}

// ChunkQuery is the keyset query of one chunk: the columns of list from
// table (quoted), with primary key pk, after the cursor (when after: $1..$n,
// one per key column) and up to the bound (when until: the next n
// parameters), filtered by where, in key order.
func ChunkQuery(table, list string, pk []string, where string, after, until bool, limit int) string {
	cols := make([]string, len(pk))
	for i, c := range pk {
		cols[i] = pgx.Identifier{c}.Sanitize()
	}
	key := "(" + strings.Join(cols, ", ") + ")"
	n := 0
	params := func() string {
		p := make([]string, len(pk))
		for i := range p {
			n++
			p[i] = "$" + strconv.Itoa(n)
		}
		return "(" + strings.Join(p, ", ") + ")"
	}
	var conds []string
	if after {
		conds = append(conds, key+" > "+params())
	}
	if until {
		conds = append(conds, key+" <= "+params())
	}
	if strings.TrimSpace(where) != "" {
		conds = append(conds, "("+where+")")
	}
	q := "SELECT " + list + " FROM " + table
	if len(conds) > 0 {
		q += " WHERE " + strings.Join(conds, " AND ")
	}
	return q + " ORDER BY " + strings.Join(cols, ", ") + " LIMIT " + strconv.Itoa(limit)
}

// LastKeyQuery reads the largest primary key of table's rows matching
// where: a job reads up to it, no further (rows inserted later reach the
// stream as inserts).
func LastKeyQuery(table string, pk []string, where string) string {
	cols := make([]string, len(pk))
	desc := make([]string, len(pk))
	for i, c := range pk {
		cols[i] = pgx.Identifier{c}.Sanitize()
		desc[i] = cols[i] + " DESC"
	}
	q := "SELECT " + strings.Join(cols, ", ") + " FROM " + table
	if strings.TrimSpace(where) != "" {
		q += " WHERE (" + where + ")"
	}
	return q + " ORDER BY " + strings.Join(desc, ", ") + " LIMIT 1"
}

// Chunk is one chunk's rows, read in one short transaction.
type Chunk struct {
	// Rows are text values in the query's column order (nil = NULL).
	Rows [][][]byte
	// Snapshot is the transaction's pg_current_snapshot() (xmin:xmax:xip).
	Snapshot string
	// ReadAt is when the rows were read (µs since the Unix epoch, the
	// server's clock).
	ReadAt int64
}

// ReadChunk runs query (from ChunkQuery) with the cursor's text values in
// a REPEATABLE READ READ ONLY transaction bounded by timeout, and copies
// the rows out.
func ReadChunk(ctx context.Context, conn *pgx.Conn, query string, cursor [][]byte, timeout time.Duration) (*Chunk, error) {
	tx, err := conn.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return nil, fmt.Errorf("begin the chunk's transaction: %w", err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx))
	if timeout > 0 {
		if _, err := tx.Exec(ctx, "SET LOCAL statement_timeout = "+strconv.FormatInt(timeout.Milliseconds(), 10)); err != nil {
			return nil, fmt.Errorf("set the chunk's statement_timeout: %w", err)
		}
	}
	c := &Chunk{}
	if err := tx.QueryRow(ctx, `SELECT pg_current_snapshot()::text, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint`).Scan(&c.Snapshot, &c.ReadAt); err != nil {
		return nil, fmt.Errorf("read the chunk's snapshot: %w", err)
	}
	res := conn.PgConn().ExecParams(ctx, query, cursor, nil, nil, nil)
	for res.NextRow() {
		vals := res.Values()
		row := make([][]byte, len(vals))
		for i, v := range vals {
			if v != nil {
				row[i] = append(make([]byte, 0, len(v)), v...)
			}
		}
		c.Rows = append(c.Rows, row)
	}
	if _, err := res.Close(); err != nil {
		return nil, fmt.Errorf("read a chunk (%s): %w", query, err)
	}
	if err := tx.Commit(ctx); err != nil {
		return nil, fmt.Errorf("end the chunk's transaction: %w", err)
	}
	return c, nil
}
