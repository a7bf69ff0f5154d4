package configcheck

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgs2/pgs2/pkg/capture"
	"github.com/pgs2/pgs2/pkg/config"
	"github.com/pgs2/pgs2/pkg/pgrepl"
	"github.com/pgs2/pgs2/pkg/units"
)

// dbState is what the database check learnt that the NATS check uses.
type dbState struct {
	connected bool
	walLSN    string // the server's WAL end (replay position on a standby)
}

// checkTimeout bounds each part of the check (connecting, the queries).
const checkTimeout = 30 * time.Second

// connectReadOnly connects as capture does (pgrepl's DSN parsing, the
// password from PGS2_SOURCE_PASSWORD, TLS from the DSN), under another
// application_name, with every transaction read-only.
func connectReadOnly(ctx context.Context, c pgrepl.Config) (*pgx.Conn, string, error) {
	pc, err := c.ConnConfig(false)
	if err != nil {
		return nil, "", err
	}
	where := fmt.Sprintf("%s@%s:%d/%s", pc.User, pc.Host, pc.Port, pc.Database)
	pc.RuntimeParams["application_name"] = "pgs2ctl-config-check"
	pc.RuntimeParams["default_transaction_read_only"] = "on"
	pc.RuntimeParams["statement_timeout"] = "30s"
	pc.RuntimeParams["lock_timeout"] = "5s"
	if pc.ConnectTimeout == 0 || pc.ConnectTimeout > checkTimeout {
		pc.ConnectTimeout = 10 * time.Second
	}
	cc, err := pgx.ParseConfig("")
	if err != nil {
		return nil, where, err
	}
	cc.Config = *pc
	conn, err := pgx.ConnectConfig(ctx, cc)
	if err != nil {
		return nil, where, err
	}
	return conn, where, nil
}

// tableInfo is one configured table as the catalog has it.
type tableInfo struct {
	name      string
	exists    bool
	relid     uint32
	ident     string // relreplident: d, f, i, n
	relkind   string
	pk        []string
	canSelect bool
	owned     bool // the role owns it (or is a member of its owner)
}

var identNames = map[string]string{"d": "default", "f": "full", "i": "index", "n": "nothing"}

// checkDatabase checks the source as capture's start-up does (pgrepl's
// Prepare), in a read-only transaction, and prints what capture would
// create.
func (r *report) checkDatabase(ctx context.Context, cfg *config.Config) *dbState {
	st := &dbState{}
	cc, err := capture.FromConfig(cfg)
	if err != nil {
		return st // reported by the summary
	}
	c := cc.Repl
	r.printf("\ndatabase (source %s)\n", cfg.Source.Name)
	cctx, cancel := context.WithTimeout(ctx, checkTimeout)
	defer cancel()
	conn, where, err := connectReadOnly(cctx, c)
	if err != nil {
		r.printf("  connect:      FAILED (see problems)\n")
		r.problem("source", fmt.Sprintf("cannot connect to %s (%s): %v", orDash(where), RedactDSN(c.DSN), err),
			"check source.dsn (host, port, database, user, sslmode), the password (PGS2_SOURCE_PASSWORD), the network and pg_hba.conf")
		return st
	}
	defer conn.Close(context.WithoutCancel(ctx))
	r.printf("  connect:      ok, %s (read-only)\n", where)
	tx, err := conn.BeginTx(cctx, pgx.TxOptions{AccessMode: pgx.ReadOnly})
	if err != nil {
		r.problem("source", fmt.Sprintf("cannot start a read-only transaction: %v", err), "check the server's state")
		return st
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
	st.connected = true
	if err := r.checkServer(cctx, tx, c, cfg, st); err != nil {
		r.problem("source", err.Error(), "check the server, then run the check again")
	}
	return st
}

func (r *report) checkServer(ctx context.Context, tx pgx.Tx, c pgrepl.Config, cfg *config.Config, st *dbState) error {
	var walLevel, user, db, version, walLSN string
	var canReplicate, super, standby, canCreate bool
	var versionNum, maxSlots, maxSenders, usedSlots, senders int
	err := tx.QueryRow(ctx, `SELECT current_setting('wal_level'), current_user, current_database(),
		COALESCE((SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user), false),
		COALESCE((SELECT rolsuper FROM pg_roles WHERE rolname = current_user), false),
		current_setting('server_version'), current_setting('server_version_num')::int,
		pg_is_in_recovery(),
		(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text,
		current_setting('max_replication_slots')::int, current_setting('max_wal_senders')::int,
		(SELECT count(*) FROM pg_replication_slots)::int,
		(SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender')::int,
		has_database_privilege(current_database(), 'CREATE')`).
		Scan(&walLevel, &user, &db, &canReplicate, &super, &version, &versionNum, &standby, &walLSN,
			&maxSlots, &maxSenders, &usedSlots, &senders, &canCreate)
	if err != nil {
		return fmt.Errorf("read server settings: %w", err)
	}
	st.walLSN = walLSN
	role := "role " + user
	if super {
		role += " (superuser)"
	}
	r.printf("  server:       PostgreSQL %s, database %s, %s", version, db, role)
	if standby {
		r.printf(", a standby (in recovery)")
	}
	r.printf("\n")
	if err := pgrepl.CheckVersion(version, versionNum); err != nil {
		var se *pgrepl.SetupError
		if errors.As(err, &se) {
			r.problem("server", se.Problem, se.Fix)
		} else {
			r.problem("server", err.Error(), "upgrade the server to PostgreSQL 14 or later")
		}
		r.printf("  version:      TOO OLD (pgs2 needs %d or later): the other checks are skipped\n", pgrepl.MinVersion/10000)
		return nil
	}
	r.printf("  version:      ok (pgs2 needs %d or later)\n", pgrepl.MinVersion/10000)
	if walLevel == "logical" {
		r.printf("  wal_level:    logical: ok\n")
	} else {
		r.printf("  wal_level:    %s: NOT logical\n", walLevel)
		r.problem("server", fmt.Sprintf("wal_level is %q but logical replication needs wal_level=logical", walLevel),
			"run `ALTER SYSTEM SET wal_level = logical;` as a superuser and restart PostgreSQL")
	}
	if canReplicate {
		r.printf("  replication:  role %s may replicate: ok\n", user)
	} else {
		r.printf("  replication:  role %s may NOT replicate\n", user)
		r.problem("role "+user, fmt.Sprintf("role %q may not use replication", user),
			fmt.Sprintf("`ALTER ROLE %s WITH REPLICATION;`", pgx.Identifier{user}.Sanitize()))
	}

	tables, err := r.checkTables(ctx, tx, c)
	if err != nil {
		return err
	}
	if err := r.checkPublication(ctx, tx, c, tables, super, canCreate, standby); err != nil {
		return err
	}
	slotActive, slotExists, err := r.checkSlot(ctx, tx, c, db, standby, versionNum)
	if err != nil {
		return err
	}

	// Room for what capture needs: a slot (when it creates one) and a
	// walsender for its replication session (unless the slot's own
	// walsender, a running capture's, is the one).
	slotNote := fmt.Sprintf("%d of %d in use", usedSlots, maxSlots)
	if !slotExists && usedSlots >= maxSlots {
		r.printf("  max_replication_slots: %s: NO ROOM for slot %s\n", slotNote, c.Slot)
		r.problem("server", fmt.Sprintf("max_replication_slots is %d and %d slots exist: capture cannot create slot %s", maxSlots, usedSlots, c.Slot),
			"raise max_replication_slots (`ALTER SYSTEM SET max_replication_slots = ...;` and restart PostgreSQL) or drop an unused slot (`SELECT pg_drop_replication_slot('name');`)")
	} else {
		r.printf("  max_replication_slots: %s: ok\n", slotNote)
	}
	need := 1
	if slotActive {
		need = 0
	}
	senderNote := fmt.Sprintf("%d of %d in use", senders, maxSenders)
	if senders+need > maxSenders {
		r.printf("  max_wal_senders: %s: NO ROOM for capture's replication connection\n", senderNote)
		r.problem("server", fmt.Sprintf("max_wal_senders is %d and %d walsenders run: capture's replication connection would be refused", maxSenders, senders),
			"raise max_wal_senders (`ALTER SYSTEM SET max_wal_senders = ...;` and restart PostgreSQL), or stop an unused replication client")
	} else {
		r.printf("  max_wal_senders: %s: ok\n", senderNote)
	}
	return nil
}

// checkTables mirrors pgrepl's checks of the source's tables (the ones
// Prepare refuses a source for), plus whether the role can read them.
func (r *report) checkTables(ctx context.Context, tx pgx.Tx, c pgrepl.Config) ([]tableInfo, error) {
	var out []tableInfo
	for _, t := range c.Tables {
		schema, table := config.SplitTable(t)
		ti := tableInfo{name: t}
		err := tx.QueryRow(ctx, `SELECT c.oid, c.relreplident::text, c.relkind::text,
			COALESCE((SELECT array_agg(a.attname::text ORDER BY array_position(i.indkey::int2[], a.attnum))
			  FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
			  WHERE i.indrelid = c.oid AND i.indisprimary), '{}'),
			has_schema_privilege(n.oid, 'USAGE') AND has_table_privilege(c.oid, 'SELECT'),
			pg_has_role(c.relowner, 'USAGE')
			FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
			WHERE n.nspname = $1 AND c.relname = $2`, schema, table).
			Scan(&ti.relid, &ti.ident, &ti.relkind, &ti.pk, &ti.canSelect, &ti.owned)
		what := "table " + t
		if errors.Is(err, pgx.ErrNoRows) {
			r.printf("  table %s: DOES NOT EXIST\n", t)
			r.problem(what, fmt.Sprintf("table %s does not exist", t), "create it, or remove it from source.tables")
			out = append(out, ti)
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("look up table %s: %w", t, err)
		}
		ti.exists = true
		out = append(out, ti)
		if ti.relkind != "r" && ti.relkind != "p" {
			r.printf("  table %s: NOT A TABLE (relkind %s)\n", t, ti.relkind)
			r.problem(what, fmt.Sprintf("%s is not a table (relkind %q)", t, ti.relkind), "list only ordinary or partitioned tables in source.tables")
			continue
		}
		n := len(r.problems)
		q := quoteTable(t)
		if ti.relkind == "p" && ti.ident == "f" {
			rows, err := tx.Query(ctx, `SELECT c.oid::regclass::text FROM pg_partition_tree($1) p JOIN pg_class c ON c.oid = p.relid
				WHERE p.isleaf AND c.relreplident <> 'f' ORDER BY 1`, ti.relid)
			if err != nil {
				return nil, fmt.Errorf("partitions of %s: %w", t, err)
			}
			parts, err := pgx.CollectRows(rows, pgx.RowTo[string])
			if err != nil {
				return nil, fmt.Errorf("partitions of %s: %w", t, err)
			}
			for _, part := range parts {
				r.problem(what, fmt.Sprintf("partition %s of %s (REPLICA IDENTITY FULL) does not have REPLICA IDENTITY FULL: its updates and deletes would not carry the whole old row", part, t),
					fmt.Sprintf("`ALTER TABLE %s REPLICA IDENTITY FULL;`", part))
			}
		}
		groups := c.GroupColumns[t]
		switch {
		case ti.ident == "n":
			r.problem(what, fmt.Sprintf("table %s has REPLICA IDENTITY NOTHING: its updates and deletes cannot be captured", t),
				fmt.Sprintf("`ALTER TABLE %s REPLICA IDENTITY DEFAULT;` (with a primary key) or `ALTER TABLE %s REPLICA IDENTITY FULL;`", q, q))
		case ti.ident == "d" && len(ti.pk) == 0:
			fix := fmt.Sprintf("`ALTER TABLE %s ADD PRIMARY KEY (...);` or `ALTER TABLE %s REPLICA IDENTITY FULL;`", q, q)
			if len(groups) == 0 {
				fix += fmt.Sprintf(" (without a primary key, also set group_columns for %s in a sink)", t)
			}
			r.problem(what, fmt.Sprintf("table %s has no primary key and REPLICA IDENTITY DEFAULT: its updates and deletes cannot be captured", t), fix)
		case len(ti.pk) == 0 && len(groups) == 0:
			r.problem(what, fmt.Sprintf("table %s has no primary key, so its changes have no group to keep in order", t),
				fmt.Sprintf("add a primary key (`ALTER TABLE %s ADD PRIMARY KEY (...);`) or set group_columns for %s in a sink", q, t))
		}
		if len(groups) > 0 {
			rows, err := tx.Query(ctx, `SELECT attname::text FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped`, ti.relid)
			if err != nil {
				return nil, fmt.Errorf("columns of %s: %w", t, err)
			}
			have, err := pgx.CollectRows(rows, pgx.RowTo[string])
			if err != nil {
				return nil, fmt.Errorf("columns of %s: %w", t, err)
			}
			for _, col := range groups {
				if !slices.Contains(have, col) {
					r.problem(what, fmt.Sprintf("group column %q does not exist in table %s", col, t), "fix group_columns in the sink config")
				} else if ti.ident != "f" && !slices.Contains(ti.pk, col) {
					r.problem(what, fmt.Sprintf("group column %q of table %s is not part of its primary key, so deletes would not carry it", col, t),
						fmt.Sprintf("`ALTER TABLE %s REPLICA IDENTITY FULL;`", q))
				}
			}
		}
		if !ti.canSelect {
			r.problem(what, fmt.Sprintf("the role may not read table %s (backfills and catalog reads SELECT from it)", t),
				fmt.Sprintf("`GRANT USAGE ON SCHEMA %s TO <role>; GRANT SELECT ON %s TO <role>;`", pgx.Identifier{schema}.Sanitize(), q))
		}
		key := "no primary key"
		if len(ti.pk) > 0 {
			key = "primary key (" + strings.Join(ti.pk, ", ") + ")"
		}
		if len(groups) > 0 {
			key += ", group_columns (" + strings.Join(groups, ", ") + ")"
		}
		kind := ""
		if ti.relkind == "p" {
			kind = "partitioned, "
		}
		verdict := "ok"
		if len(r.problems) > n {
			verdict = "PROBLEM (see problems)"
		}
		r.printf("  table %s: %s: %s%s, replica identity %s\n", t, verdict, kind, key, identNames[ti.ident])
	}
	return out, nil
}

func quoteTable(t string) string {
	schema, table := config.SplitTable(t)
	return pgx.Identifier{schema, table}.Sanitize()
}

// checkPublication reports the publication and what capture would do to
// it: create it, add the tables it lacks, publish via the partition root.
func (r *report) checkPublication(ctx context.Context, tx pgx.Tx, c pgrepl.Config, tables []tableInfo, super, canCreate, standby bool) error {
	pub := pgx.Identifier{c.Publication}.Sanitize()
	what := "publication " + c.Publication
	quoted := make([]string, len(c.Tables))
	for i, t := range c.Tables {
		quoted[i] = quoteTable(t)
	}
	var all, viaRoot, ins, upd, del, owner bool
	err := tx.QueryRow(ctx, `SELECT puballtables, pubviaroot, pubinsert, pubupdate, pubdelete, pg_has_role(pubowner, 'USAGE')
		FROM pg_publication WHERE pubname = $1`, c.Publication).Scan(&all, &viaRoot, &ins, &upd, &del, &owner)
	if errors.Is(err, pgx.ErrNoRows) {
		sql := "CREATE PUBLICATION " + pub + " FOR TABLE " + strings.Join(quoted, ", ") + " WITH (publish_via_partition_root = true)"
		r.printf("  publication %s: does not exist: capture would create it: %s\n", c.Publication, sql)
		var notOwned []string
		for _, ti := range tables {
			if ti.exists && !ti.owned {
				notOwned = append(notOwned, ti.name)
			}
		}
		switch {
		case standby:
			r.problem(what, "does not exist, and capture cannot create it on a standby (read-only)",
				fmt.Sprintf("create it on the primary: `%s;`", sql))
		case !super && (!canCreate || len(notOwned) > 0):
			why := "the role lacks CREATE on the database"
			if len(notOwned) > 0 {
				why = "the role does not own " + strings.Join(notOwned, ", ")
				if !canCreate {
					why += " and lacks CREATE on the database"
				}
			}
			r.problem(what, "does not exist, and capture could not create it: "+why,
				fmt.Sprintf("have a superuser or the tables' owner run `%s;`", sql))
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("look up publication %s: %w", c.Publication, err)
	}
	var publishes []string
	for _, p := range []struct {
		on   bool
		name string
	}{{ins, "insert"}, {upd, "update"}, {del, "delete"}} {
		if p.on {
			publishes = append(publishes, p.name)
		}
	}
	canAlter := super || owner
	if !viaRoot {
		var partitioned []string
		for _, ti := range tables {
			if ti.relkind == "p" {
				partitioned = append(partitioned, ti.name)
			}
		}
		if len(partitioned) > 0 {
			sql := "ALTER PUBLICATION " + pub + " SET (publish_via_partition_root = true)"
			r.printf("  publication %s: capture would run: %s (partitioned: %s)\n", c.Publication, sql, strings.Join(partitioned, ", "))
			if !canAlter {
				r.problem(what, fmt.Sprintf("publication %s must publish partitioned tables as themselves (publish_via_partition_root), and this role may not change it", c.Publication),
					fmt.Sprintf("have the publication's owner run `%s;`", sql))
			}
		}
	}
	if len(publishes) < 3 {
		r.warn(what, fmt.Sprintf("publishes only %s: the other changes of its tables are not captured", strings.Join(publishes, ", ")),
			fmt.Sprintf("`ALTER PUBLICATION %s SET (publish = 'insert, update, delete, truncate');`", pub))
	}
	if all {
		r.printf("  publication %s: exists, FOR ALL TABLES (publishes %s): covers every table\n", c.Publication, strings.Join(publishes, ", "))
		return nil
	}
	// What it publishes (leaf partitions, without publish_via_partition_root)
	// and its explicit members (a partitioned table itself), each with
	// its partition root.
	rows, err := tx.Query(ctx, `SELECT t.schemaname || '.' || t.tablename,
			COALESCE((SELECT n.nspname || '.' || r.relname FROM pg_class r JOIN pg_namespace n ON n.oid = r.relnamespace
			  WHERE r.oid = pg_partition_root(format('%I.%I', t.schemaname, t.tablename)::regclass)), '')
		FROM pg_publication_tables t WHERE t.pubname = $1
		UNION
		SELECT n.nspname || '.' || c.relname, '' FROM pg_publication_rel pr
		JOIN pg_publication p ON p.oid = pr.prpubid JOIN pg_class c ON c.oid = pr.prrelid JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE p.pubname = $1`, c.Publication)
	if err != nil {
		return fmt.Errorf("tables of publication %s: %w", c.Publication, err)
	}
	type published struct{ Table, Root string }
	pubs, err := pgx.CollectRows(rows, pgx.RowToStructByPos[published])
	if err != nil {
		return fmt.Errorf("tables of publication %s: %w", c.Publication, err)
	}
	var have []string
	for _, p := range pubs {
		if !slices.Contains(have, p.Table) && (p.Root == "" || p.Root == p.Table || !slices.Contains(c.Tables, p.Root)) {
			have = append(have, p.Table) // not a partition of a configured table
		}
	}
	var covered, missing, missingQ []string
	for i, t := range c.Tables {
		if slices.Contains(have, t) {
			covered = append(covered, t)
		} else {
			missing = append(missing, t)
			missingQ = append(missingQ, quoted[i])
		}
	}
	r.printf("  publication %s: exists (publishes %s); covers %d of %d tables: %s\n", c.Publication, strings.Join(publishes, ", "),
		len(covered), len(c.Tables), orDash(strings.Join(covered, ", ")))
	if len(missing) > 0 {
		sql := "ALTER PUBLICATION " + pub + " ADD TABLE " + strings.Join(missingQ, ", ")
		r.printf("  publication %s: lacks %s: capture would run: %s\n", c.Publication, strings.Join(missing, ", "), sql)
		var notOwned []string
		for _, ti := range tables {
			if ti.exists && !ti.owned && slices.Contains(missing, ti.name) {
				notOwned = append(notOwned, ti.name)
			}
		}
		if !super && (!owner || len(notOwned) > 0) {
			why := "the role does not own the publication"
			if owner {
				why = "the role does not own " + strings.Join(notOwned, ", ")
			}
			r.problem(what, fmt.Sprintf("lacks %s, and capture could not add them: %s", strings.Join(missing, ", "), why),
				fmt.Sprintf("have the publication's owner (or a superuser) run `%s;`", sql))
		}
	}
	if len(have) > len(covered) {
		var extra []string
		for _, t := range have {
			if !slices.Contains(c.Tables, t) {
				extra = append(extra, t)
			}
		}
		r.printf("  publication %s: also publishes %s (not in source.tables: capture ignores their changes)\n", c.Publication, strings.Join(extra, ", "))
	}
	return nil
}

// checkSlot reports the replication slot, or that capture would create it.
func (r *report) checkSlot(ctx context.Context, tx pgx.Tx, c pgrepl.Config, db string, standby bool, versionNum int) (active, exists bool, err error) {
	what := "slot " + c.Slot
	var plugin, slotDB, slotType, walStatus string
	var pid int
	var flush, restart *string
	var retained int64
	err = tx.QueryRow(ctx, `SELECT COALESCE(plugin, ''), slot_type, COALESCE(database, ''), active, COALESCE(active_pid, 0),
		confirmed_flush_lsn::text, restart_lsn::text, COALESCE(wal_status, ''),
		COALESCE(pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END, restart_lsn), 0)::bigint
		FROM pg_replication_slots WHERE slot_name = $1`, c.Slot).
		Scan(&plugin, &slotType, &slotDB, &active, &pid, &flush, &restart, &walStatus, &retained)
	if errors.Is(err, pgx.ErrNoRows) {
		r.printf("  slot %s: does not exist: capture would create slot %s (pgoutput): SELECT pg_create_logical_replication_slot('%s', 'pgoutput')\n",
			c.Slot, c.Slot, c.Slot)
		if standby && versionNum < 160000 {
			r.problem(what, fmt.Sprintf("does not exist, and PostgreSQL %d cannot create a logical slot on a standby (16 and later can)", versionNum/10000),
				"point source.dsn at the primary, or upgrade the standby to PostgreSQL 16 or later")
		}
		return false, false, nil
	}
	if err != nil {
		return false, false, fmt.Errorf("look up replication slot %s: %w", c.Slot, err)
	}
	state := "inactive"
	if active {
		state = fmt.Sprintf("active (pid %d: a running capture?)", pid)
	}
	r.printf("  slot %s: exists: %s slot, plugin %s, database %s, %s, confirmed_flush_lsn %s, restart_lsn %s, WAL retained %s",
		c.Slot, slotType, orDash(plugin), orDash(slotDB), state, deref(flush), deref(restart), units.Bytes(retained))
	if walStatus != "" {
		r.printf(", wal_status %s", walStatus)
	}
	r.printf("\n")
	if plugin != "pgoutput" || slotDB != db {
		r.problem(what, fmt.Sprintf("replication slot %q exists for plugin %q in database %q, not pgoutput in %q", c.Slot, plugin, slotDB, db),
			fmt.Sprintf("choose another source.slot, or drop it: `SELECT pg_drop_replication_slot('%s');`", c.Slot))
	}
	if versionNum >= 160000 {
		var conflicting bool
		if err := tx.QueryRow(ctx, `SELECT COALESCE(conflicting, false) FROM pg_replication_slots WHERE slot_name = $1`, c.Slot).Scan(&conflicting); err == nil && conflicting {
			r.problem(what, fmt.Sprintf("replication slot %s was invalidated by a recovery conflict (conflicting): it cannot stream", c.Slot),
				fmt.Sprintf("drop it (`SELECT pg_drop_replication_slot('%s');`) so capture creates it again, then backfill the sinks (pgs2ctl backfill start --sink …)", c.Slot))
		}
	}
	switch walStatus {
	case "lost":
		r.problem(what, fmt.Sprintf("replication slot %s has lost WAL it needs (wal_status lost, max_slot_wal_keep_size): it cannot stream", c.Slot),
			fmt.Sprintf("drop it (`SELECT pg_drop_replication_slot('%s');`) so capture creates it again, then backfill the sinks (pgs2ctl backfill start --sink …)", c.Slot))
	case "unreserved":
		r.warn(what, fmt.Sprintf("replication slot %s is about to lose WAL it needs (wal_status unreserved)", c.Slot),
			"start capture now, or raise max_slot_wal_keep_size")
	}
	return active, true, nil
}

func deref(s *string) string {
	if s == nil {
		return "-"
	}
	return *s
}
