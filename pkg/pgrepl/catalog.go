package pgrepl

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// catalog resolves type and key information from the source's system
// catalogs, with caches. Lookups happen on relation messages, not per row.
type catalog struct {
	conn  *pgx.Conn
	types map[uint32]*pgType
}

func newCatalog(conn *pgx.Conn) *catalog {
	return &catalog{conn: conn, types: map[uint32]*pgType{}}
}

func (c *catalog) typeOf(ctx context.Context, oid uint32) (*pgType, error) {
	if t, ok := c.types[oid]; ok {
		return t, nil
	}
	if k, ok := scalarKinds[oid]; ok {
		t := &pgType{kind: k}
		c.types[oid] = t
		return t, nil
	}
	var typtype, category string
	var elem, base uint32
	var delim string
	err := c.conn.QueryRow(ctx, `SELECT typtype::text, typcategory::text, typelem, typbasetype, typdelim::text
		FROM pg_type WHERE oid = $1`, oid).Scan(&typtype, &category, &elem, &base, &delim)
	if errors.Is(err, pgx.ErrNoRows) {
		t := &pgType{kind: kindString}
		c.types[oid] = t
		return t, nil
	}
	if err != nil {
		return nil, fmt.Errorf("look up type %d: %w", oid, err)
	}
	var t *pgType
	switch {
	case typtype == "d" && base != 0: // domain: render as its base type
		if t, err = c.typeOf(ctx, base); err != nil {
			return nil, err
		}
	case category == "A" && elem != 0:
		et, err := c.typeOf(ctx, elem)
		if err != nil {
			return nil, err
		}
		var d string
		if err := c.conn.QueryRow(ctx, `SELECT typdelim::text FROM pg_type WHERE oid = $1`, elem).Scan(&d); err != nil {
			return nil, fmt.Errorf("look up type %d: %w", elem, err)
		}
		t = &pgType{kind: kindArray, elem: et, delim: d[0]}
	default: // enums, inet, money, uuid, text, ...: strings
		t = &pgType{kind: kindString}
	}
	c.types[oid] = t
	return t, nil
}

func (c *catalog) primaryKey(ctx context.Context, relid uint32) ([]string, error) {
	rows, err := c.conn.Query(ctx, `SELECT a.attname::text FROM pg_index i
		JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
		WHERE i.indrelid = $1 AND i.indisprimary
		ORDER BY array_position(i.indkey::int2[], a.attnum)`, relid)
	if err != nil {
		return nil, fmt.Errorf("primary key of relation %d: %w", relid, err)
	}
	return pgx.CollectRows(rows, pgx.RowTo[string])
}
