package capture_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"testing"

	"github.com/pgs2/pgs2/pkg/change"
	"github.com/pgs2/pgs2/pkg/pgrepl"
)

// TestReadMatchesTheWAL: a row read by a query in text format and encoded
// by pgrepl.ReadEncoder (what a backfill emits) has the same record,
// record_pks and group as the same row captured from the WAL, for values of
// every kind the decoder renders; a table without a primary key is refused
// with the SQL that fixes it.
func TestReadMatchesTheWAL(t *testing.T) {
	e := newEnv(t, `CREATE TYPE mood AS ENUM ('ok', 'sad');
		CREATE TABLE "Odd Items" (org int, "Item Id" bigint, n numeric, big numeric, f float8, b bool, j jsonb, ts timestamp, tz timestamptz,
			iv interval, raw bytea, arr int[], txt text, m mood, nul text, gen int GENERATED ALWAYS AS (org * 2) STORED,
			PRIMARY KEY (org, "Item Id"));
		CREATE TABLE nopk (a int)`, `public.Odd Items`)
	stop := e.run(t)
	e.pg.MustExec(t, "app", `INSERT INTO "Odd Items" VALUES (3, 9007199254740993, 1.5, 123456789012345678901234567890.5, 0.1, true,
		'{"k": [1, 2.50]}', '2026-11-22 10:00:00.123456', '2026-11-22 10:00:00+02', '1 day 2 hours', '\xdead', '{{1,NULL},{3,4}}', 'a "q" ☃', 'sad', NULL)`)
	got := e.waitMessages(t, 1)[0]
	if err := stop(); err != nil {
		t.Fatal(err)
	}

	ctx := context.Background()
	conn, err := pgrepl.Connect(ctx, e.cfg.Repl)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	enc, err := pgrepl.NewReadEncoder(ctx, conn, "app", "public", "Odd Items", nil)
	if err != nil {
		t.Fatal(err)
	}
	if pk := enc.PrimaryKey(); len(pk) != 2 || pk[1] != "Item Id" {
		t.Fatalf("primary key %v", pk)
	}
	res := conn.PgConn().ExecParams(ctx, `SELECT `+enc.SelectList()+` FROM "Odd Items"`, nil, nil, nil, nil)
	if !res.NextRow() {
		_, cerr := res.Close()
		t.Fatalf("no row: %v", cerr)
	}
	vals := res.Values()
	pos := change.Position{LSN: 77, Idx: 3}
	row, err := enc.Encode(vals, pos, pgrepl.FormatCommitTime(nil, 1795341600123456))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := res.Close(); err != nil {
		t.Fatal(err)
	}
	var read, live map[string]json.RawMessage
	if err := json.Unmarshal(row.Body, &read); err != nil {
		t.Fatalf("read body %s: %v", row.Body, err)
	}
	if err := json.Unmarshal(got.Raw, &live); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(read["record"], live["record"]) {
		t.Errorf("read record\n%s\nlive record\n%s", read["record"], live["record"])
	}
	if string(read["changes"]) != "null" || string(read["action"]) != `"read"` {
		t.Errorf("read changes %s action %s", read["changes"], read["action"])
	}
	var m change.Message
	if err := json.Unmarshal(row.Body, &m); err != nil {
		t.Fatal(err)
	}
	md := m.Metadata
	if md.CommitLSN != 77 || md.CommitIdx != 3 || md.IdempotencyKey != pos.Key() || string(row.Key) != pos.Key() ||
		md.CommitTimestamp != "2026-11-22T10:00:00.123456Z" || md.TableName != "Odd Items" || md.DatabaseName != "app" {
		t.Errorf("read metadata %+v", md)
	}
	if lm := got.Msg.Metadata; len(md.RecordPKs) != 2 || md.RecordPKs[1] != lm.RecordPKs[1] || md.RecordPKs[1] != "9007199254740993" {
		t.Errorf("record_pks %v, live %v", md.RecordPKs, lm.RecordPKs)
	}
	if string(row.PK) != `["3","9007199254740993"]` {
		t.Errorf("read PK %s", row.PK)
	}
	if !bytes.Equal(row.Group, got.Entry.Group) {
		t.Errorf("group %s, live %s", row.Group, got.Entry.Group)
	}

	_, err = pgrepl.NewReadEncoder(ctx, conn, "app", "public", "nopk", nil)
	if !errors.Is(err, pgrepl.ErrSetup) || !bytes.Contains([]byte(err.Error()), []byte(`ALTER TABLE "public"."nopk" ADD PRIMARY KEY`)) {
		t.Fatalf("a table without a primary key: %v", err)
	}
}
