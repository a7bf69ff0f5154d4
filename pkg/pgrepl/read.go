package pgrepl

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgs2/pgs2/pkg/change"
)

// ReadEncoder encodes a table's rows, read with a query in text format on
// a connection from Connect, as `read` messages: the same JSON as the
// decoder writes for a change from the WAL (same session settings, same
// value rendering), with changes null. It is not safe for concurrent use.
type ReadEncoder struct {
	db    string
	rel   *relation
	t     tuple
	list  string   // the select list: quoted columns in pgoutput's order
	shape string   // the list and the columns' types
	pk    []string // primary key columns
	body  []byte
	group []byte
	key   []byte
}

// ErrNoPrimaryKey means a table has no primary key to read it by.
var ErrNoPrimaryKey = errors.New("table has no primary key")

// NewReadEncoder describes schema.table: its columns as pgoutput sends
// them (attnum order, no generated columns), primary key and group.
func NewReadEncoder(ctx context.Context, conn *pgx.Conn, db, schema, table string, groupCols []string) (*ReadEncoder, error) {
	qualified := pgx.Identifier{schema, table}.Sanitize()
	relid, descs, err := readColumns(ctx, conn, qualified)
	if err != nil {
		return nil, err
	}
	list, shape := shapeOf(descs)
	// No column is marked as replica identity: without a primary key the
	// relation has no key at all.
	rel, err := newRelation(ctx, newCatalog(conn), relid, schema, table, descs, groupCols)
	if err != nil {
		return nil, err
	}
	if len(rel.pk) == 0 {
		return nil, &SetupError{Problem: fmt.Sprintf("table %s.%s has no primary key, so a backfill cannot read it in order (%v)", schema, table, ErrNoPrimaryKey),
			Fix: fmt.Sprintf("`ALTER TABLE %s ADD PRIMARY KEY (...);`", qualified)}
	}
	pk := make([]string, len(rel.pk))
	for j, i := range rel.pk {
		pk[j] = rel.cols[i].rawKey
	}
	return &ReadEncoder{db: db, rel: rel, list: list, shape: shape, pk: pk}, nil
}

// ReadShape is the Shape a ReadEncoder of schema.table would have now.
func ReadShape(ctx context.Context, conn *pgx.Conn, schema, table string) (string, error) {
	_, descs, err := readColumns(ctx, conn, pgx.Identifier{schema, table}.Sanitize())
	if err != nil {
		return "", err
	}
	_, shape := shapeOf(descs)
	return shape, nil
}

// readColumns reads a table's oid and the columns pgoutput sends.
func readColumns(ctx context.Context, conn *pgx.Conn, qualified string) (uint32, []columnDesc, error) {
	var relid uint32
	if err := conn.QueryRow(ctx, `SELECT $1::regclass::oid`, qualified).Scan(&relid); err != nil {
		return 0, nil, fmt.Errorf("look up table %s: %w", qualified, err)
	}
	rows, err := conn.Query(ctx, `SELECT attname::text, atttypid FROM pg_attribute
		WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped AND attgenerated = '' ORDER BY attnum`, relid)
	if err != nil {
		return 0, nil, fmt.Errorf("columns of %s: %w", qualified, err)
	}
	descs, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (c columnDesc, err error) {
		err = r.Scan(&c.name, &c.oid)
		return c, err
	})
	if err != nil {
		return 0, nil, fmt.Errorf("columns of %s: %w", qualified, err)
	}
	return relid, descs, nil
}

// shapeOf is the select list of columns, and it with their types.
func shapeOf(descs []columnDesc) (list, shape string) {
	names := make([]string, len(descs))
	for i, d := range descs {
		names[i] = pgx.Identifier{d.name}.Sanitize()
	}
	list = strings.Join(names, ", ")
	b := []byte(list + "\x00")
	for i, d := range descs {
		if i > 0 {
			b = append(b, ',')
		}
		b = strconv.AppendUint(b, uint64(d.oid), 10)
	}
	return list, string(b)
}

// SelectList is the columns to select, quoted, in the order Encode takes.
func (e *ReadEncoder) SelectList() string { return e.list }

// Shape names the columns and their types: rows read with one encoder are
// encoded right by another only if their shapes are equal (a column was
// not added, dropped, renamed or retyped in between).
func (e *ReadEncoder) Shape() string { return e.shape }

// PrimaryKey names the primary key columns in key order.
func (e *ReadEncoder) PrimaryKey() []string { return e.pk }

// Schema is the table's schema.
func (e *ReadEncoder) Schema() string { return e.rel.schema }

// Name is the table's name.
func (e *ReadEncoder) Name() string { return e.rel.table }

// PrimaryKeyIndexes are the primary key columns' places in SelectList, in
// key order.
func (e *ReadEncoder) PrimaryKeyIndexes() []int { return e.rel.pk }

// Encode encodes one row (text values in SelectList's order; nil is NULL)
// read at pos, at commitTS (formatted as the decoder formats commit times).
// The Row's slices are valid until the next Encode.
func (e *ReadEncoder) Encode(vals [][]byte, pos change.Position, commitTS []byte) (Row, error) {
	if len(vals) != len(e.rel.cols) {
		return Row{}, fmt.Errorf("%s.%s: a row of %d values, the table has %d columns (did its schema change?)", e.rel.schema, e.rel.table, len(vals), len(e.rel.cols))
	}
	t := &e.t
	t.kinds, t.vals = t.kinds[:0], t.vals[:0]
	for _, v := range vals {
		k := byte('t')
		if v == nil {
			k = 'n'
		}
		t.kinds, t.vals = append(t.kinds, k), append(t.vals, v)
	}
	b := append(e.body[:0], `{"record":`...)
	b = appendRecord(b, e.rel, t, nil, false)
	b = append(b, `,"changes":null`...)
	var pk [2]int
	e.body, e.key, pk = appendTail(b, e.key, e.rel, change.Read, commitTS, pos, e.db, t, nil, nil)
	e.group = appendKeyValues(e.group[:0], e.rel.group, t, nil)
	return Row{Pos: pos, Schema: e.rel.schema, Table: e.rel.table, Action: change.Read, Body: e.body, Group: e.group, Key: e.key,
		PK: e.body[pk[0]:pk[1]]}, nil
}

// FormatCommitTime formats a time in µs since the Unix epoch as the
// decoder formats commit times.
func FormatCommitTime(dst []byte, unixMicros int64) []byte {
	return time.UnixMicro(unixMicros).UTC().AppendFormat(dst, commitTimeLayout)
}
