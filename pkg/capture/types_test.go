package capture_test

import (
	"encoding/json"
	"strings"
	"testing"
)

// TestTypes checks the JSON of every common Postgres type, end to end
// through a real slot.
func TestTypes(t *testing.T) {
	e := newEnv(t, `
		CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
		CREATE DOMAIN posint AS int CHECK (VALUE > 0);
		CREATE DOMAIN email AS text;
		CREATE TABLE types (
			id int PRIMARY KEY,
			i2 int2, i4 int4, i8 int8, f4 float4, f8 float8, fnan float8, finf float8,
			n numeric, nbig numeric, nnan numeric, b bool, t text, vc varchar(10), c char(3),
			u uuid, j json, jb jsonb, ba bytea, d date, tm time, ttz timetz,
			ts timestamp, tstz timestamptz, iv interval,
			ai int[], at text[], am int[][], an int[], aj jsonb[], ae mood[],
			en mood, ip inet, ci cidr, mac macaddr, dom posint, dtext email, mon money, nul text
		)`, "public.types")
	e.run(t)
	e.pg.MustExec(t, "app", `INSERT INTO types VALUES (
		1, -32768, 2147483647, 9223372036854775807, 1.5, 0.1, 'NaN', '-Infinity',
		123.4500, 12345678901234567890.123456789, 'NaN', true, 'hé "q" \ n', 'abc', 'ab',
		'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"a": [1, 2.5, "x"]}', '{"b": {"c": null}, "a": 1}',
		'\xdeadbeef', '2026-11-22', '10:00:00.123', '10:00:00+02', '2026-11-22 10:00:00.123456',
		'2026-11-22 12:00:00.5+02', '1 year 2 months 3 days 04:05:06',
		'{1,2,3}', '{"a b","c\"d",NULL,"NULL"}', '{{1,2},{3,4}}', '{1,NULL}', ARRAY['{"k":1}'::jsonb, '[2]'::jsonb],
		'{sad,happy}', 'happy', '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03', 5, 'a@b.c', 12.34, NULL)`)
	msgs := e.waitMessages(t, 1)

	var body struct {
		Record map[string]json.RawMessage `json:"record"`
	}
	if err := json.Unmarshal(msgs[0].Raw, &body); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		"id": `1`, "i2": `-32768`, "i4": `2147483647`, "i8": `9223372036854775807`,
		"f4": `1.5`, "f8": `0.1`, "fnan": `"NaN"`, "finf": `"-Infinity"`,
		"n": `123.4500`, "nbig": `"12345678901234567890.123456789"`, "nnan": `"NaN"`,
		"b": `true`, "t": `"hé \"q\" \\ n"`, "vc": `"abc"`, "c": `"ab "`,
		"u":  `"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"`,
		"j":  `{"a": [1, 2.5, "x"]}`,
		"jb": `{"a": 1, "b": {"c": null}}`,
		"ba": `"3q2+7w=="`, "d": `"2026-11-22"`, "tm": `"10:00:00.123"`, "ttz": `"10:00:00+02"`,
		"ts":   `"2026-11-22T10:00:00.123456"`,
		"tstz": `"2026-11-22T10:00:00.5Z"`,
		"iv":   `"P1Y2M3DT4H5M6S"`,
		"ai":   `[1,2,3]`, "at": `["a b","c\"d",null,"NULL"]`, "am": `[[1,2],[3,4]]`, "an": `[1,null]`,
		"aj": `[{"k": 1},[2]]`, "ae": `["sad","happy"]`,
		"en": `"happy"`, "ip": `"192.168.0.1/24"`, "ci": `"10.0.0.0/8"`, "mac": `"08:00:2b:01:02:03"`,
		"dom": `5`, "dtext": `"a@b.c"`, "mon": `"$12.34"`, "nul": `null`,
	}
	for col, w := range want {
		got, ok := body.Record[col]
		if !ok {
			t.Errorf("%s: missing from record", col)
			continue
		}
		if string(got) != w {
			t.Errorf("%s = %s, want %s", col, got, w)
		}
	}
	if len(body.Record) != len(want) {
		t.Errorf("record has %d columns, want %d", len(body.Record), len(want))
	}
	// The whole body must be valid JSON that encoding/json accepts.
	var anyv any
	if err := json.Unmarshal(msgs[0].Raw, &anyv); err != nil {
		t.Fatal(err)
	}
}

// TestToastAndReplicaIdentity: an unchanged TOASTed value is filled from the
// old row with REPLICA IDENTITY FULL and marked "unchanged_toast" without it;
// changes and delete records follow the identity.
func TestToastAndReplicaIdentity(t *testing.T) {
	e := newEnv(t, `
		CREATE TABLE dflt (id int PRIMARY KEY, big text, n int);
		CREATE TABLE full_ (id int PRIMARY KEY, big text, n int);
		ALTER TABLE dflt ALTER COLUMN big SET STORAGE EXTERNAL;
		ALTER TABLE full_ ALTER COLUMN big SET STORAGE EXTERNAL;
		ALTER TABLE full_ REPLICA IDENTITY FULL`, "public.dflt", "public.full_")
	e.run(t)
	big := strings.Repeat("x", 10000) // > TOAST threshold, stored out of line
	for _, tb := range []string{"dflt", "full_"} {
		e.pg.MustExec(t, "app", `INSERT INTO `+tb+` VALUES (1, $1, 1)`, big)
		e.pg.MustExec(t, "app", `UPDATE `+tb+` SET n = 2 WHERE id = 1`)
		e.pg.MustExec(t, "app", `DELETE FROM `+tb+` WHERE id = 1`)
	}
	msgs := e.waitMessages(t, 6)
	type rec = map[string]any
	dUpd, fUpd := msgs[1].Msg, msgs[4].Msg
	if dUpd.Record["big"] != "unchanged_toast" {
		t.Errorf("default identity: unchanged TOAST = %.20v, want the marker", dUpd.Record["big"])
	}
	if len(dUpd.Changes) != 0 || dUpd.Changes == nil {
		t.Errorf("default identity: changes = %v, want {}", dUpd.Changes)
	}
	if fUpd.Record["big"] != big {
		t.Errorf("FULL identity: unchanged TOAST not filled from the old row: %.20v", fUpd.Record["big"])
	}
	if len(fUpd.Changes) != 1 || fUpd.Changes["n"] != float64(1) {
		t.Errorf("FULL identity: changes = %v, want {n: 1}", fUpd.Changes)
	}
	if d := msgs[2].Msg.Record; len(d) != 1 || d["id"] != float64(1) {
		t.Errorf("default identity delete record = %v, want the key", d)
	}
	if d := msgs[5].Msg.Record; len(d) != 3 || d["big"] != big || d["n"] != float64(2) {
		t.Errorf("FULL identity delete record = %.60v, want the whole old row", rec(d))
	}
	for _, m := range msgs {
		if strings.Contains(string(m.Raw), `"big":null`) {
			t.Errorf("a TOASTed value was emitted as null: %.200s", m.Raw)
		}
	}
}

// TestCompositeKeyAndGroupColumns: record_pks lists a composite key in key
// order; group_columns replace the key as the group (and subject partition).
func TestCompositeKeyAndGroupColumns(t *testing.T) {
	e := newEnv(t, `
		CREATE TABLE lines (order_id int, line int, org int, qty int, PRIMARY KEY (line, order_id));
		CREATE TABLE events (id int PRIMARY KEY, org text, v int);
		ALTER TABLE events REPLICA IDENTITY FULL`, "public.lines", "public.events")
	e.cfg.Repl.GroupColumns = map[string][]string{"public.events": {"org"}}
	e.run(t)
	e.pg.MustExec(t, "app", `INSERT INTO lines VALUES (10, 2, 1, 5)`)
	e.pg.MustExec(t, "app", `UPDATE lines SET qty = 6`)
	for i := 1; i <= 6; i++ {
		e.pg.MustExec(t, "app", `INSERT INTO events VALUES ($1, $2, 0)`, i, []string{"acme", "globex"}[i%2])
	}
	e.pg.MustExec(t, "app", `DELETE FROM events WHERE id = 2`)
	msgs := e.waitMessages(t, 9)
	for _, m := range msgs[:2] {
		pks := m.Msg.Metadata.RecordPKs
		if len(pks) != 2 || pks[0] != "2" || pks[1] != "10" {
			t.Errorf("composite record_pks = %v, want [2 10] (key order: line, order_id)", pks)
		}
		if g := m.Header.Get("Pgs2-Group"); g != `["2","10"]` {
			t.Errorf("composite group = %s", g)
		}
	}
	subjects := map[string]string{}
	for _, m := range msgs[2:] {
		org, _ := m.Msg.Record["org"].(string)
		if g := m.Header.Get("Pgs2-Group"); g != `["`+org+`"]` {
			t.Errorf("group_columns: group header %s for org %q", g, org)
		}
		if len(m.Msg.Metadata.RecordPKs) != 1 {
			t.Errorf("record_pks still the primary key: %v", m.Msg.Metadata.RecordPKs)
		}
		if s, ok := subjects[org]; ok && s != m.Subject {
			t.Errorf("org %s split over subjects %s and %s", org, s, m.Subject)
		}
		subjects[org] = m.Subject
	}
	if msgs[8].Msg.Action != "delete" || msgs[8].Header.Get("Pgs2-Group") != `["acme"]` {
		t.Errorf("delete with FULL identity must carry its group: %s %s", msgs[8].Msg.Action, msgs[8].Header.Get("Pgs2-Group"))
	}
}
