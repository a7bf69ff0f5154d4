// Package change holds the message model of one captured change: the JSON
// body every S2 record carries (Sequin's message format) and its idempotency
// key.
package change

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
)

// Action is what happened to the row.
type Action string

// Actions.
const (
	Insert Action = "insert"
	Update Action = "update"
	Delete Action = "delete"
	Read   Action = "read" // backfill
)

// Message is the decoded JSON body. Capture writes the body directly as bytes;
// this type is for readers (router, tests, tools).
type Message struct {
	Record   map[string]any `json:"record"`
	Changes  map[string]any `json:"changes"`
	Action   Action         `json:"action"`
	Metadata Metadata       `json:"metadata"`
}

// Metadata describes where a change came from.
type Metadata struct {
	TableSchema            string          `json:"table_schema"`
	TableName              string          `json:"table_name"`
	CommitTimestamp        string          `json:"commit_timestamp"`
	CommitLSN              uint64          `json:"commit_lsn"`
	CommitIdx              int             `json:"commit_idx"`
	DatabaseName           string          `json:"database_name"`
	IdempotencyKey         string          `json:"idempotency_key"`
	RecordPKs              []string        `json:"record_pks"`
	TransactionAnnotations json.RawMessage `json:"transaction_annotations"`
	Consumer               *Consumer       `json:"consumer,omitempty"`
}

// Consumer names the sink a message was delivered for.
type Consumer struct {
	Name string `json:"name"`
}

// Position is a change's place in the WAL: its transaction's commit LSN and
// its index within that transaction. Positions are totally ordered in commit
// order.
type Position struct {
	LSN uint64
	Idx int
}

// Less reports whether p comes before q.
func (p Position) Less(q Position) bool {
	return p.LSN < q.LSN || (p.LSN == q.LSN && p.Idx < q.Idx)
}

// IsZero reports whether p is the zero position (nothing captured yet).
func (p Position) IsZero() bool { return p.LSN == 0 && p.Idx == 0 }

// String formats p as "<lsn>:<idx>".
func (p Position) String() string {
	return strconv.FormatUint(p.LSN, 10) + ":" + strconv.Itoa(p.Idx)
}

// Key returns the idempotency key: base64("<commit_lsn>:<commit_idx>"), as
// Sequin computes it.
func (p Position) Key() string {
	return base64.StdEncoding.EncodeToString([]byte(p.String()))
}

// AppendKey appends p.Key() to dst without intermediate allocations.
func (p Position) AppendKey(dst []byte) []byte {
	var raw [48]byte
	b := strconv.AppendUint(raw[:0], p.LSN, 10)
	b = append(b, ':')
	b = strconv.AppendInt(b, int64(p.Idx), 10)
	return base64.StdEncoding.AppendEncode(dst, b)
}

// ParseKey decodes an idempotency key back into its position.
func ParseKey(key string) (Position, error) {
	raw, err := base64.StdEncoding.DecodeString(key)
	if err != nil {
		return Position{}, fmt.Errorf("idempotency key %q: not base64: %w", key, err)
	}
	l, i, ok := strings.Cut(string(raw), ":")
	if !ok {
		return Position{}, fmt.Errorf("idempotency key %q: want <lsn>:<idx>, got %q", key, raw)
	}
	lsn, err := strconv.ParseUint(l, 10, 64)
	if err != nil {
		return Position{}, fmt.Errorf("idempotency key %q: lsn: %w", key, err)
	}
	idx, err := strconv.Atoi(i)
	if err != nil {
		return Position{}, fmt.Errorf("idempotency key %q: idx: %w", key, err)
	}
	return Position{LSN: lsn, Idx: idx}, nil
}

// UnchangedToast is Sequin's marker for a TOASTed value that Postgres did not
// send because it did not change and the old row is unknown.
const UnchangedToast = "unchanged_toast"
