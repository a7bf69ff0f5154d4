package pgrepl

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"

	"github.com/pgs2/pgs2/pkg/change"
)

// EventKind says what a decoded WAL message was.
type EventKind uint8

// Event kinds.
const (
	EventNone     EventKind = iota // relation, type, origin, truncate, ...: nothing to publish
	EventBegin                     // a transaction starts; LSN = its commit LSN
	EventRow                       // Row is set
	EventCommit                    // a transaction ended; LSN = its end LSN (the one to confirm)
	EventTruncate                  // TRUNCATE of captured tables: not emitted as changes
	EventMessage                   // a logical decoding message (pg_logical_emit_message): Message is set
)

// Event is one decoded pgoutput message.
type Event struct {
	Kind EventKind
	LSN  uint64
	// CommitMs is the transaction's commit time in ms since the Unix epoch
	// (EventBegin).
	CommitMs int64
	// Xid is the transaction's id (EventBegin).
	Xid uint32
	Row Row
	// Moved is set when an update changed the row's group (its primary
	// key, or its group columns): Row is then the delete of the old row
	// in its old group and Moved the insert of the new row in its new
	// group (the next commit_idx), so each group's changes stay in order.
	// Valid until the next Decode.
	Moved *Row
	// Tables names the truncated tables for EventTruncate.
	Tables []string
	// Message is the logical decoding message of an EventMessage (LSN is
	// its own WAL position).
	Message Message
}

// Message is a logical decoding message, written with
// pg_logical_emit_message (pgoutput sends them with messages 'true').
// A non-transactional one arrives at its place in the WAL, between the
// transactions that committed before and after it.
type Message struct {
	Transactional bool
	Prefix        string
	// Content is valid until the next Decode.
	Content []byte
	// Invalid says why a message meant for pgs2 (annotations) was ignored.
	Invalid string
}

// PluginArgs are the pgoutput options capture starts replication with:
// protocol version 1, the publication, and logical decoding messages
// (PostgreSQL 14 and later), which carry pgs2's own markers in the WAL.
func PluginArgs(publication string) []string {
	return []string{"proto_version '1'", "publication_names '" + publication + "'", "messages 'true'"}
}

// Row is one captured change, its JSON body ready to publish.
type Row struct {
	Pos    change.Position
	Schema string
	Table  string
	Action change.Action
	// Group is the JSON array of the group columns' values (as strings).
	// Valid until the next Decode.
	Group []byte
	// Body is the message-format JSON (without metadata.consumer). Valid
	// until the next Decode.
	Body []byte
	// Key is the idempotency key (Pos.Key()). Valid until the next Decode.
	Key []byte
	// PK is the row's record_pks (a JSON array of strings, as Group), and
	// OldPK the old row's when an update sent it (the key may have
	// changed). Valid until the next Decode.
	PK, OldPK []byte
}

// Decoder turns pgoutput (protocol version 1) messages into events. It is
// not safe for concurrent use.
type Decoder struct {
	db        string
	groupCols map[string][]string
	tables    atomic.Pointer[tableSet]
	cat       *catalog
	rels      map[uint32]*relation

	inTx      bool
	commitLSN uint64
	commitTS  []byte
	idx       int

	newT, oldT              tuple
	body, group, key, oldPK []byte // reused: a Row is valid until the next Decode
	moved                   Row    // the insert half of a move
	body2, group2, key2     []byte // its buffers
	// annotations are the current transaction's, set by a transactional
	// message (AnnotationsSet): a JSON object, or nil.
	annotations []byte
}

// Prefixes of the transactional messages that set and clear a
// transaction's annotations (metadata.transaction_annotations of its later
// changes); Sequin's work too.
const (
	AnnotationsSet         = "pgs2:transaction_annotations.set"
	AnnotationsClear       = "pgs2:transaction_annotations.clear"
	SequinAnnotationsSet   = "sequin:transaction_annotations.set"
	SequinAnnotationsClear = "sequin:transaction_annotations.clear"
)

var jsonNull = []byte("null")

// tableSet is the tables a decoder emits changes of; gen counts the sets.
type tableSet struct {
	names map[string]bool
	gen   uint64
}

// ErrTableAdded means a table whose relation the decoder ignored is among
// its tables now: its changes can be decoded only from a new relation
// message, which a new replication session sends.
var ErrTableAdded = errors.New("a table was added to the captured tables")

// NewDecoder returns a decoder for database db. conn (a normal connection)
// is used for catalog lookups when relations are announced.
func NewDecoder(conn *pgx.Conn, db string, c Config) *Decoder {
	d := &Decoder{db: db, groupCols: c.GroupColumns, cat: newCatalog(conn), rels: map[uint32]*relation{}}
	d.SetTables(c.Tables)
	return d
}

// SetTables changes the tables the decoder emits changes of, from the next
// change on (safe to call from another goroutine). A table added whose
// relation the decoder already ignored makes its next change fail with
// ErrTableAdded.
func (d *Decoder) SetTables(tables []string) {
	names := make(map[string]bool, len(tables))
	for _, t := range tables {
		names[t] = true
	}
	var gen uint64
	if old := d.tables.Load(); old != nil {
		gen = old.gen + 1
	}
	d.tables.Store(&tableSet{names: names, gen: gen})
}

// CommitLSN is the current (or last) transaction's commit LSN.
func (d *Decoder) CommitLSN() uint64 { return d.commitLSN }

// InTx reports whether a transaction has begun and not yet committed.
func (d *Decoder) InTx() bool { return d.inTx }

type relation struct {
	schema, table string
	ignored       bool
	gen           uint64 // of the table set ignored was decided by
	cols          []column
	pk            []int // primary key columns
	group         []int // group columns (the primary key unless configured)
	meta          []byte
}

type column struct {
	name   []byte // `"name":`
	typ    *pgType
	key    bool // part of the replica identity
	rawKey string
}

type tuple struct {
	kinds []byte
	vals  [][]byte
}

// Decode decodes one XLogData payload.
func (d *Decoder) Decode(ctx context.Context, data []byte) (Event, error) {
	if len(data) == 0 {
		return Event{}, fmt.Errorf("empty pgoutput message")
	}
	switch data[0] {
	case 'B':
		if len(data) < 21 {
			return Event{}, fmt.Errorf("short begin message")
		}
		d.inTx = true
		d.commitLSN = binary.BigEndian.Uint64(data[1:])
		us := int64(binary.BigEndian.Uint64(data[9:]))
		ts := pgTime(us)
		d.commitTS = ts.AppendFormat(d.commitTS[:0], commitTimeLayout)
		d.idx = 0
		d.annotations = nil
		return Event{Kind: EventBegin, LSN: d.commitLSN, CommitMs: ts.UnixMilli(), Xid: binary.BigEndian.Uint32(data[17:])}, nil
	case 'C':
		if len(data) < 26 {
			return Event{}, fmt.Errorf("short commit message")
		}
		d.inTx = false
		return Event{Kind: EventCommit, LSN: binary.BigEndian.Uint64(data[10:])}, nil
	case 'I', 'U', 'D':
		return d.decodeRow(data)
	case 'R':
		m, err := pglogrepl.Parse(data)
		if err != nil {
			return Event{}, fmt.Errorf("parse relation message: %w", err)
		}
		return Event{}, d.relation(ctx, m.(*pglogrepl.RelationMessage))
	case 'T':
		m, err := pglogrepl.Parse(data)
		if err != nil {
			return Event{}, fmt.Errorf("parse truncate message: %w", err)
		}
		ev := Event{Kind: EventTruncate}
		for _, id := range m.(*pglogrepl.TruncateMessage).RelationIDs {
			if r := d.rels[id]; r != nil && !r.ignored {
				ev.Tables = append(ev.Tables, r.schema+"."+r.table)
			}
		}
		return ev, nil
	case 'M':
		m, err := pglogrepl.Parse(data)
		if err != nil {
			return Event{}, fmt.Errorf("parse logical decoding message: %w", err)
		}
		lm := m.(*pglogrepl.LogicalDecodingMessage)
		ev := Event{Kind: EventMessage, LSN: uint64(lm.LSN), Message: Message{Transactional: lm.Transactional, Prefix: lm.Prefix, Content: lm.Content}}
		if lm.Transactional && d.inTx {
			switch lm.Prefix {
			case AnnotationsSet, SequinAnnotationsSet:
				var obj map[string]json.RawMessage
				if err := json.Unmarshal(lm.Content, &obj); err != nil || obj == nil {
					d.annotations = nil
					ev.Message.Invalid = fmt.Sprintf("the content of %s is not a JSON object (%d bytes); the transaction's later changes carry no annotations", lm.Prefix, len(lm.Content))
				} else {
					var b bytes.Buffer
					_ = json.Compact(&b, lm.Content) // valid: it parsed
					d.annotations = b.Bytes()
				}
			case AnnotationsClear, SequinAnnotationsClear:
				d.annotations = nil
			}
		}
		return ev, nil
	default: // 'Y' type, 'O' origin: nothing to emit
		return Event{}, nil
	}
}

var pgEpoch = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)

// commitTimeLayout is metadata.commit_timestamp's: RFC 3339 in UTC with µs.
const commitTimeLayout = "2006-01-02T15:04:05.000000Z07:00"

func pgTime(us int64) time.Time { return pgEpoch.Add(time.Duration(us) * time.Microsecond) }

func (d *Decoder) relation(ctx context.Context, m *pglogrepl.RelationMessage) error {
	name := m.Namespace + "." + m.RelationName
	set := d.tables.Load()
	if !set.names[name] {
		d.rels[m.RelationID] = &relation{schema: m.Namespace, table: m.RelationName, ignored: true, gen: set.gen}
		return nil
	}
	cols := make([]columnDesc, len(m.Columns))
	for i, c := range m.Columns {
		cols[i] = columnDesc{name: c.Name, oid: c.DataType, key: c.Flags&1 != 0}
	}
	r, err := newRelation(ctx, d.cat, m.RelationID, m.Namespace, m.RelationName, cols, d.groupCols[name])
	if err != nil {
		return err
	}
	r.gen = set.gen
	d.rels[m.RelationID] = r
	return nil
}

// columnDesc is a column as a relation message (or the catalog) names it.
type columnDesc struct {
	name string
	oid  uint32
	key  bool // part of the replica identity
}

// newRelation describes a table's columns, primary key and group for
// encoding its rows (from the WAL, or read by a backfill).
func newRelation(ctx context.Context, cat *catalog, relid uint32, schema, table string, descs []columnDesc, groupCols []string) (*relation, error) {
	r := &relation{schema: schema, table: table}
	name := schema + "." + table
	idx := map[string]int{}
	for i, c := range descs {
		t, err := cat.typeOf(ctx, c.oid)
		if err != nil {
			return nil, err
		}
		n := appendStringS(nil, c.name)
		r.cols = append(r.cols, column{name: append(n, ':'), typ: t, key: c.key, rawKey: c.name})
		idx[c.name] = i
	}
	pk, err := cat.primaryKey(ctx, relid)
	if err != nil {
		return nil, err
	}
	for _, c := range pk {
		if i, ok := idx[c]; ok {
			r.pk = append(r.pk, i)
		}
	}
	if len(r.pk) == 0 { // no primary key: the replica identity columns
		for i, c := range r.cols {
			if c.key {
				r.pk = append(r.pk, i)
			}
		}
	}
	r.group = r.pk
	if len(groupCols) > 0 {
		r.group = nil
		for _, c := range groupCols {
			i, ok := idx[c]
			if !ok {
				return nil, &SetupError{Problem: fmt.Sprintf("group column %q does not exist in table %s", c, name), Fix: "fix group_columns in the sink config"}
			}
			r.group = append(r.group, i)
		}
	}
	meta := []byte(`,"metadata":{"table_schema":`)
	meta = appendStringS(meta, schema)
	meta = append(meta, `,"table_name":`...)
	meta = appendStringS(meta, table)
	meta = append(meta, `,"commit_timestamp":"`...)
	r.meta = meta
	return r, nil
}

func (t *tuple) decode(src []byte) (int, error) {
	if len(src) < 2 {
		return 0, fmt.Errorf("short tuple")
	}
	n := int(binary.BigEndian.Uint16(src))
	t.kinds = slices.Grow(t.kinds[:0], n)[:n]
	t.vals = slices.Grow(t.vals[:0], n)[:n]
	p := 2
	for i := 0; i < n; i++ {
		if p >= len(src) {
			return 0, fmt.Errorf("short tuple column %d", i)
		}
		k := src[p]
		p++
		t.kinds[i] = k
		t.vals[i] = nil
		if k == 't' || k == 'b' {
			if p+4 > len(src) {
				return 0, fmt.Errorf("short tuple column %d", i)
			}
			l := int(binary.BigEndian.Uint32(src[p:]))
			p += 4
			if p+l > len(src) {
				return 0, fmt.Errorf("short tuple column %d value", i)
			}
			t.vals[i] = src[p : p+l]
			p += l
		}
	}
	return p, nil
}

func (d *Decoder) decodeRow(data []byte) (Event, error) {
	if len(data) < 6 {
		return Event{}, fmt.Errorf("short %c message", data[0])
	}
	relid := binary.BigEndian.Uint32(data[1:])
	r := d.rels[relid]
	if r == nil {
		return Event{}, fmt.Errorf("row for unknown relation %d (no relation message)", relid)
	}
	if set := d.tables.Load(); set.gen != r.gen {
		in := set.names[r.schema+"."+r.table]
		if r.ignored && in {
			return Event{}, fmt.Errorf("%w: %s.%s", ErrTableAdded, r.schema, r.table)
		}
		r.ignored, r.gen = r.ignored || !in, set.gen
	}
	if !d.inTx {
		return Event{}, fmt.Errorf("row outside a transaction")
	}
	p := 5
	var old *tuple
	oldKind := byte(0)
	if data[0] != 'I' && (data[p] == 'K' || data[p] == 'O') {
		oldKind = data[p]
		n, err := d.oldT.decode(data[p+1:])
		if err != nil {
			return Event{}, fmt.Errorf("old tuple of %s.%s: %w", r.schema, r.table, err)
		}
		old = &d.oldT
		p += 1 + n
	}
	var nu *tuple
	if data[0] != 'D' {
		if p >= len(data) || data[p] != 'N' {
			return Event{}, fmt.Errorf("%c message of %s.%s without new tuple", data[0], r.schema, r.table)
		}
		if _, err := d.newT.decode(data[p+1:]); err != nil {
			return Event{}, fmt.Errorf("new tuple of %s.%s: %w", r.schema, r.table, err)
		}
		nu = &d.newT
	}
	if r.ignored {
		return Event{}, nil
	}
	if (nu != nil && len(nu.kinds) != len(r.cols)) || (old != nil && len(old.kinds) != len(r.cols)) {
		return Event{}, fmt.Errorf("%s.%s: tuple has a different column count than its relation message", r.schema, r.table)
	}

	row := Row{Pos: change.Position{LSN: d.commitLSN, Idx: d.idx}, Schema: r.schema, Table: r.table}
	d.idx++
	b := append(d.body[:0], `{"record":`...)
	rec := nu // the tuple record_pks and group values come from
	switch data[0] {
	case 'I':
		row.Action = change.Insert
		b = appendRecord(b, r, nu, nil, false)
		b = append(b, `,"changes":null`...)
	case 'U':
		row.Action = change.Update
		full := oldKind == 'O'
		var fill *tuple
		if full {
			fill = old
		}
		b = appendRecord(b, r, nu, fill, false)
		b = append(b, `,"changes":`...)
		b = d.appendChanges(b, r, nu, old, oldKind)
	case 'D':
		row.Action = change.Delete
		rec = old
		if old == nil {
			b = append(b, "{}"...)
		} else {
			b = appendRecord(b, r, old, nil, oldKind == 'K')
		}
		b = append(b, `,"changes":null`...)
	}
	var pk [2]int
	d.body, d.key, pk = appendTail(b, d.key, r, row.Action, d.commitTS, row.Pos, d.db, rec, old, d.annotations)
	d.group = appendKeyValues(d.group[:0], r.group, rec, old)
	row.Body, row.Group, row.Key, row.PK = d.body, d.group, d.key, d.body[pk[0]:pk[1]]
	if data[0] != 'U' || old == nil {
		return Event{Kind: EventRow, Row: row}, nil
	}
	d.oldPK = appendKeyValues(d.oldPK[:0], r.pk, old, nil)
	row.OldPK = d.oldPK
	if !groupKnown(r, oldKind) {
		return Event{Kind: EventRow, Row: row}, nil
	}
	d.group2 = appendKeyValues(d.group2[:0], r.group, old, nil)
	if string(d.group2) == string(d.group) {
		return Event{Kind: EventRow, Row: row}, nil
	}
	// The row moves to another group: the delete of the old row in the
	// old group, then the insert of the new one in the new group.
	d.idx++
	full := oldKind == 'O'
	del := Row{Pos: row.Pos, Schema: r.schema, Table: r.table, Action: change.Delete}
	b = append(d.body2[:0], `{"record":`...)
	b = appendRecord(b, r, old, nil, !full)
	b = append(b, `,"changes":null`...)
	d.body2, d.key2, pk = appendTail(b, d.key2, r, change.Delete, d.commitTS, del.Pos, d.db, old, old, d.annotations)
	del.Body, del.Group, del.Key, del.PK = d.body2, d.group2, d.key2, d.body2[pk[0]:pk[1]]
	var fill *tuple
	if full {
		fill = old
	}
	ins := &d.moved
	*ins = Row{Pos: change.Position{LSN: d.commitLSN, Idx: row.Pos.Idx + 1}, Schema: r.schema, Table: r.table, Action: change.Insert}
	b = append(d.body[:0], `{"record":`...)
	b = appendRecord(b, r, nu, fill, false)
	b = append(b, `,"changes":null`...)
	d.body, d.key, pk = appendTail(b, d.key, r, change.Insert, d.commitTS, ins.Pos, d.db, nu, old, d.annotations)
	ins.Body, ins.Group, ins.Key, ins.PK = d.body, d.group, d.key, d.body[pk[0]:pk[1]]
	return Event{Kind: EventRow, Row: del, Moved: ins}, nil
}

// groupKnown reports whether an update's old tuple (of kind 'K': the
// replica identity's columns, or 'O': the whole row) holds every group
// column, so that a change of group shows.
func groupKnown(r *relation, oldKind byte) bool {
	if oldKind == 'O' {
		return true
	}
	for _, i := range r.group {
		if !r.cols[i].key {
			return false
		}
	}
	return true
}

// appendTail ends a message body after its changes: action and metadata.
// The idempotency key is also written into key; pk is where record_pks
// is in the body.
func appendTail(b, key []byte, r *relation, action change.Action, commitTS []byte, pos change.Position, db string, rec, old *tuple, ann []byte) (body, keyOut []byte, pk [2]int) {
	b = append(b, `,"action":"`...)
	b = append(b, action...)
	b = append(b, '"')
	b = append(b, r.meta...)
	b = append(b, commitTS...)
	b = append(b, `","commit_lsn":`...)
	b = strconv.AppendUint(b, pos.LSN, 10)
	b = append(b, `,"commit_idx":`...)
	b = strconv.AppendInt(b, int64(pos.Idx), 10)
	b = append(b, `,"database_name":`...)
	b = appendStringS(b, db)
	b = append(b, `,"idempotency_key":"`...)
	keyStart := len(b)
	b = pos.AppendKey(b)
	key = append(key[:0], b[keyStart:]...)
	b = append(b, `","record_pks":`...)
	pk[0] = len(b)
	b = appendKeyValues(b, r.pk, rec, old)
	pk[1] = len(b)
	b = append(b, `,"transaction_annotations":`...)
	if ann == nil {
		ann = jsonNull
	}
	b = append(b, ann...)
	b = append(b, "}}"...)
	return b, key, pk
}

// appendRecord writes a tuple as a JSON object. Unchanged TOASTed values are
// taken from fill (the old row) when it has them, else written as Sequin's
// marker. keyOnly writes only replica identity columns.
func appendRecord(b []byte, r *relation, t, fill *tuple, keyOnly bool) []byte {
	b = append(b, '{')
	first := true
	for i, c := range r.cols {
		if keyOnly && !c.key {
			continue
		}
		if !first {
			b = append(b, ',')
		}
		first = false
		b = append(b, c.name...)
		b = appendCell(b, c.typ, t.kinds[i], t.vals[i], fill, i)
	}
	return append(b, '}')
}

func appendCell(b []byte, typ *pgType, k byte, v []byte, fill *tuple, i int) []byte {
	switch k {
	case 'n':
		return append(b, "null"...)
	case 't':
		return appendValue(b, typ, v)
	case 'u':
		if fill != nil && fill.kinds[i] != 'u' {
			return appendCell(b, typ, fill.kinds[i], fill.vals[i], nil, i)
		}
		return append(b, `"`+change.UnchangedToast+`"`...)
	default: // binary format is never requested
		return appendString(b, v)
	}
}

// appendChanges writes the previous values of the columns an update
// changed, or {} when Postgres sent no old row.
func (d *Decoder) appendChanges(b []byte, r *relation, nu, old *tuple, oldKind byte) []byte {
	b = append(b, '{')
	if old == nil {
		return append(b, '}')
	}
	first := true
	for i, c := range r.cols {
		if oldKind == 'K' && !c.key {
			continue
		}
		ok, nk := old.kinds[i], nu.kinds[i]
		if ok == 'u' || nk == 'u' {
			continue // not sent: unchanged
		}
		if ok == nk && (ok == 'n' || string(old.vals[i]) == string(nu.vals[i])) {
			continue
		}
		if !first {
			b = append(b, ',')
		}
		first = false
		b = append(b, c.name...)
		b = appendCell(b, c.typ, ok, old.vals[i], nil, i)
	}
	return append(b, '}')
}

// appendKeyValues writes the values of cols as a JSON array of strings (null
// for NULL), taking unchanged TOASTed values from old.
func appendKeyValues(b []byte, cols []int, t, old *tuple) []byte {
	b = append(b, '[')
	for j, i := range cols {
		if j > 0 {
			b = append(b, ',')
		}
		k, v := t.kinds[i], t.vals[i]
		if k == 'u' && old != nil && t != old {
			k, v = old.kinds[i], old.vals[i]
		}
		switch k {
		case 't', 'b':
			b = appendString(b, v)
		case 'u':
			b = append(b, `"`+change.UnchangedToast+`"`...)
		default:
			b = append(b, "null"...)
		}
	}
	return append(b, ']')
}
