// Package pgrepl reads a PostgreSQL database's changes through a logical
// replication slot (pgoutput): it checks and prepares the source (wal_level,
// permissions, replica identity, publication, slot) and decodes the WAL
// stream into change messages.
package pgrepl

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgs2/pgs2/pkg/config"
)

// Config is what pgrepl needs from the source configuration.
type Config struct {
	DSN         string
	Password    string // overrides the DSN's password when set
	Slot        string
	Publication string
	// Tables as "schema.table".
	Tables []string
	// GroupColumns per table overrides the primary key as the group.
	GroupColumns map[string][]string
}

// ConnConfig parses the DSN for a normal (replication=false) or replication
// connection. Session settings make value output predictable: UTC
// timestamps, ISO dates, ISO 8601 intervals, round-trip floats.
func (c Config) ConnConfig(replication bool) (*pgconn.Config, error) {
	pc, err := pgconn.ParseConfig(c.DSN)
	if err != nil {
		return nil, fmt.Errorf("parse source.dsn: %w", redact(err, c))
	}
	if c.Password != "" {
		pc.Password = c.Password
	}
	pc.RuntimeParams["TimeZone"] = "UTC"
	pc.RuntimeParams["DateStyle"] = "ISO, YMD"
	pc.RuntimeParams["IntervalStyle"] = "iso_8601"
	pc.RuntimeParams["extra_float_digits"] = "3"
	pc.RuntimeParams["application_name"] = "pgs2-capture"
	if replication {
		pc.RuntimeParams["replication"] = "database"
	}
	return pc, nil
}

// redact removes the password from an error's text.
func redact(err error, c Config) error {
	if err == nil {
		return nil
	}
	s := err.Error()
	pw := c.Password
	if pc, perr := pgconn.ParseConfig(c.DSN); perr == nil && pc.Password != "" {
		pw = pc.Password
	}
	if pw == "" || !strings.Contains(s, pw) {
		return err
	}
	hide := func(s string) string { return strings.ReplaceAll(s, pw, "xxxxx") }
	r := &redacted{msg: hide(s)}
	// Keep what callers branch on: the server's error (its SQLSTATE),
	// redacted too, and a context's end.
	var pe *pgconn.PgError
	switch {
	case errors.As(err, &pe):
		c := *pe
		c.Message, c.Detail, c.Hint, c.Where = hide(c.Message), hide(c.Detail), hide(c.Hint), hide(c.Where)
		r.cause = &c
	case errors.Is(err, context.DeadlineExceeded):
		r.cause = context.DeadlineExceeded
	case errors.Is(err, context.Canceled):
		r.cause = context.Canceled
	}
	return r
}

// redacted is an error whose text had the password; it wraps only what
// holds none.
type redacted struct {
	msg   string
	cause error
}

func (e *redacted) Error() string { return e.msg }
func (e *redacted) Unwrap() error { return e.cause }

// Connect opens a normal connection to the source.
func Connect(ctx context.Context, c Config) (*pgx.Conn, error) {
	pc, err := c.ConnConfig(false)
	if err != nil {
		return nil, err
	}
	cc, err := pgx.ParseConfig("")
	if err != nil {
		return nil, err
	}
	cc.Config = *pc
	conn, err := pgx.ConnectConfig(ctx, cc)
	if err != nil {
		return nil, fmt.Errorf("connect to source %s: %w", describe(pc), redact(err, c))
	}
	return conn, nil
}

// ConnectReplication opens a replication connection.
func ConnectReplication(ctx context.Context, c Config) (*pgconn.PgConn, error) {
	pc, err := c.ConnConfig(true)
	if err != nil {
		return nil, err
	}
	conn, err := pgconn.ConnectConfig(ctx, pc)
	if err != nil {
		return nil, fmt.Errorf("replication connection to source %s: %w", describe(pc), redact(err, c))
	}
	return conn, nil
}

func describe(pc *pgconn.Config) string {
	return fmt.Sprintf("%s@%s:%d/%s", pc.User, pc.Host, pc.Port, pc.Database)
}

// Source describes the prepared source.
type Source struct {
	Database string
	// ConfirmedFlush is the slot's confirmed_flush_lsn: replication resumes
	// with the first transaction that commits after it.
	ConfirmedFlush pglogrepl.LSN
	// SlotCreated is true when Prepare created the slot.
	SlotCreated bool
}

// MinVersion is the oldest PostgreSQL pgs2 captures: pgoutput passes
// logical decoding messages (backfill watermarks, transaction annotations)
// from 14 on.
const MinVersion = 140000

// CheckVersion refuses a server older than MinVersion (server_version and
// server_version_num).
func CheckVersion(version string, num int) error {
	if num < MinVersion {
		return setupErr("upgrade the server to PostgreSQL 14 or later",
			"PostgreSQL %s is too old: pgs2 needs 14 or later (pgoutput's logical decoding messages, option messages, came in 14)", version)
	}
	return nil
}

// Prepare checks that the source can be captured correctly and creates the
// publication and slot when missing. A *SetupError names what to fix.
func Prepare(ctx context.Context, c Config) (*Source, error) {
	conn, err := Connect(ctx, c)
	if err != nil {
		return nil, err
	}
	defer conn.Close(context.WithoutCancel(ctx))

	var walLevel, user, db, version string
	var canReplicate bool
	var versionNum int
	err = conn.QueryRow(ctx, `SELECT current_setting('wal_level'), current_user, current_database(),
		(SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user),
		current_setting('server_version'), current_setting('server_version_num')::int`).
		Scan(&walLevel, &user, &db, &canReplicate, &version, &versionNum)
	if err != nil {
		return nil, fmt.Errorf("read server settings: %w", err)
	}
	if err := CheckVersion(version, versionNum); err != nil {
		return nil, err
	}
	if walLevel != "logical" {
		return nil, setupErr("run `ALTER SYSTEM SET wal_level = logical;` as a superuser and restart PostgreSQL",
			"wal_level is %q but logical replication needs wal_level=logical", walLevel)
	}
	if !canReplicate {
		return nil, setupErr(fmt.Sprintf("`ALTER ROLE %s WITH REPLICATION;`", pgx.Identifier{user}.Sanitize()),
			"role %q may not use replication", user)
	}
	if err := checkTables(ctx, conn, c); err != nil {
		return nil, err
	}
	if err := ensurePublication(ctx, conn, c); err != nil {
		return nil, err
	}
	src := &Source{Database: db}
	if err := ensureSlot(ctx, conn, c, db, src); err != nil {
		return nil, err
	}
	return src, nil
}

func quoteTable(t string) string {
	schema, table := config.SplitTable(t)
	return pgx.Identifier{schema, table}.Sanitize()
}

func checkTables(ctx context.Context, conn *pgx.Conn, c Config) error {
	var errs []error
	for _, t := range c.Tables {
		schema, table := config.SplitTable(t)
		var relid uint32
		var ident, relkind string
		var pk []string
		err := conn.QueryRow(ctx, `SELECT c.oid, c.relreplident::text, c.relkind::text,
			COALESCE((SELECT array_agg(a.attname::text ORDER BY array_position(i.indkey::int2[], a.attnum))
			  FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
			  WHERE i.indrelid = c.oid AND i.indisprimary), '{}')
			FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
			WHERE n.nspname = $1 AND c.relname = $2`, schema, table).Scan(&relid, &ident, &relkind, &pk)
		if errors.Is(err, pgx.ErrNoRows) {
			errs = append(errs, setupErr("create it, or remove it from source.tables",
				"table %s does not exist", t))
			continue
		}
		if err != nil {
			return fmt.Errorf("look up table %s: %w", t, err)
		}
		if relkind != "r" && relkind != "p" {
			errs = append(errs, setupErr("list only ordinary or partitioned tables in source.tables",
				"%s is not a table (relkind %q)", t, relkind))
			continue
		}
		q := quoteTable(t)
		if relkind == "p" && ident == "f" {
			// With publish_via_partition_root the old row comes from each
			// partition's own replica identity, which FULL on the table
			// does not set.
			rows, err := conn.Query(ctx, `SELECT c.oid::regclass::text FROM pg_partition_tree($1) p JOIN pg_class c ON c.oid = p.relid
				WHERE p.isleaf AND c.relreplident <> 'f' ORDER BY 1`, relid)
			if err != nil {
				return fmt.Errorf("partitions of %s: %w", t, err)
			}
			parts, err := pgx.CollectRows(rows, pgx.RowTo[string])
			if err != nil {
				return fmt.Errorf("partitions of %s: %w", t, err)
			}
			for _, part := range parts {
				errs = append(errs, setupErr(fmt.Sprintf("`ALTER TABLE %s REPLICA IDENTITY FULL;`", part),
					"partition %s of %s (REPLICA IDENTITY FULL) does not have REPLICA IDENTITY FULL: its updates and deletes would not carry the whole old row", part, t))
			}
		}
		switch {
		case ident == "n":
			errs = append(errs, setupErr(fmt.Sprintf("`ALTER TABLE %s REPLICA IDENTITY DEFAULT;` (with a primary key) or `ALTER TABLE %s REPLICA IDENTITY FULL;`", q, q),
				"table %s has REPLICA IDENTITY NOTHING: its updates and deletes cannot be captured", t))
		case ident == "d" && len(pk) == 0:
			errs = append(errs, setupErr(fmt.Sprintf("`ALTER TABLE %s ADD PRIMARY KEY (...);` or `ALTER TABLE %s REPLICA IDENTITY FULL;`", q, q),
				"table %s has no primary key and REPLICA IDENTITY DEFAULT: its updates and deletes cannot be captured", t))
		case len(pk) == 0 && len(c.GroupColumns[t]) == 0:
			errs = append(errs, setupErr(fmt.Sprintf("add a primary key (`ALTER TABLE %s ADD PRIMARY KEY (...);`) or set group_columns for %s in a sink", q, t),
				"table %s has no primary key, so its changes have no group to keep in order", t))
		}
		if cols := c.GroupColumns[t]; len(cols) > 0 {
			rows, err := conn.Query(ctx, `SELECT attname::text FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped`, relid)
			if err != nil {
				return fmt.Errorf("columns of %s: %w", t, err)
			}
			have, err := pgx.CollectRows(rows, pgx.RowTo[string])
			if err != nil {
				return fmt.Errorf("columns of %s: %w", t, err)
			}
			for _, col := range cols {
				if !slices.Contains(have, col) {
					errs = append(errs, setupErr("fix group_columns in the sink config",
						"group column %q does not exist in table %s", col, t))
				} else if ident != "f" && !slices.Contains(pk, col) {
					// Without the old row, a delete (or an update that leaves a
					// TOASTed group column unchanged) would not carry the group.
					errs = append(errs, setupErr(fmt.Sprintf("`ALTER TABLE %s REPLICA IDENTITY FULL;`", q),
						"group column %q of table %s is not part of its primary key, so deletes would not carry it", col, t))
				}
			}
		}
	}
	return errors.Join(errs...)
}

func ensurePublication(ctx context.Context, conn *pgx.Conn, c Config) error {
	pub := pgx.Identifier{c.Publication}.Sanitize()
	var exists bool
	if err := conn.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)`, c.Publication).Scan(&exists); err != nil {
		return fmt.Errorf("look up publication: %w", err)
	}
	quoted := make([]string, len(c.Tables))
	for i, t := range c.Tables {
		quoted[i] = quoteTable(t)
	}
	// A partitioned table's changes are published as the table's own
	// (not its partitions'), so a partition added later needs nothing.
	if !exists {
		if _, err := conn.Exec(ctx, "CREATE PUBLICATION "+pub+" FOR TABLE "+strings.Join(quoted, ", ")+" WITH (publish_via_partition_root = true)"); err != nil {
			return fmt.Errorf("create publication %s: %w", c.Publication, err)
		}
		return nil
	}
	var all, viaRoot bool
	if err := conn.QueryRow(ctx, `SELECT puballtables, pubviaroot FROM pg_publication WHERE pubname = $1`, c.Publication).Scan(&all, &viaRoot); err != nil {
		return fmt.Errorf("look up publication: %w", err)
	}
	if !viaRoot {
		var partitioned bool
		if err := conn.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
			WHERE c.relkind = 'p' AND n.nspname || '.' || c.relname = ANY($1))`, c.Tables).Scan(&partitioned); err != nil {
			return fmt.Errorf("look up partitioned tables: %w", err)
		}
		if partitioned {
			if _, err := conn.Exec(ctx, "ALTER PUBLICATION "+pub+" SET (publish_via_partition_root = true)"); err != nil {
				var pe *pgconn.PgError
				if errors.As(err, &pe) && pe.Code == "42501" {
					return setupErr(fmt.Sprintf("have the publication's owner run `ALTER PUBLICATION %s SET (publish_via_partition_root = true);`", pub),
						"publication %s must publish partitioned tables as themselves (publish_via_partition_root), and this role may not change it", c.Publication)
				}
				return fmt.Errorf("set publish_via_partition_root on publication %s: %w", c.Publication, err)
			}
		}
	}
	if all {
		return nil
	}
	rows, err := conn.Query(ctx, `SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1`, c.Publication)
	if err != nil {
		return fmt.Errorf("tables of publication %s: %w", c.Publication, err)
	}
	have, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return fmt.Errorf("tables of publication %s: %w", c.Publication, err)
	}
	var missing []string
	for i, t := range c.Tables {
		if !slices.Contains(have, t) {
			missing = append(missing, quoted[i])
		}
	}
	if len(missing) > 0 {
		if _, err := conn.Exec(ctx, "ALTER PUBLICATION "+pub+" ADD TABLE "+strings.Join(missing, ", ")); err != nil {
			return fmt.Errorf("add %s to publication %s: %w", strings.Join(missing, ", "), c.Publication, err)
		}
	}
	return nil
}

func ensureSlot(ctx context.Context, conn *pgx.Conn, c Config, db string, src *Source) error {
	var plugin, slotDB string
	var flush *string
	err := conn.QueryRow(ctx, `SELECT COALESCE(plugin, ''), COALESCE(database, ''), confirmed_flush_lsn::text
		FROM pg_replication_slots WHERE slot_name = $1`, c.Slot).Scan(&plugin, &slotDB, &flush)
	if errors.Is(err, pgx.ErrNoRows) {
		if _, err := conn.Exec(ctx, `SELECT pg_create_logical_replication_slot($1, 'pgoutput')`, c.Slot); err != nil {
			return fmt.Errorf("create replication slot %s: %w", c.Slot, err)
		}
		if err := ensureSlot(ctx, conn, c, db, src); err != nil {
			return err
		}
		src.SlotCreated = true
		return nil
	}
	if err != nil {
		return fmt.Errorf("look up replication slot %s: %w", c.Slot, err)
	}
	if plugin != "pgoutput" || slotDB != db {
		return setupErr(fmt.Sprintf("choose another source.slot, or drop it: `SELECT pg_drop_replication_slot('%s');`", c.Slot),
			"replication slot %q exists for plugin %q in database %q, not pgoutput in %q", c.Slot, plugin, slotDB, db)
	}
	if flush != nil {
		lsn, err := pglogrepl.ParseLSN(*flush)
		if err != nil {
			return fmt.Errorf("slot %s confirmed_flush_lsn %q: %w", c.Slot, *flush, err)
		}
		src.ConfirmedFlush = lsn
	}
	return nil
}
