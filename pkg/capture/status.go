package capture

import (
	"context"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"

	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/pgrepl"
)

// slotInterval is how often the active capture reads its slot's state.
const slotInterval = 5 * time.Second

// slotQuery reads the slot: its confirmed position, the WAL it keeps, and
// its walsender's flush lag (Postgres's own measure of replication lag:
// NULL once caught up and idle).
const slotQuery = `SELECT s.confirmed_flush_lsn::text,
  (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text,
  COALESCE(pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END, s.restart_lsn), 0)::bigint,
  COALESCE(EXTRACT(EPOCH FROM r.flush_lag), 0)::float8
FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
WHERE s.slot_name = $1`

// slotSample is the slot as last read.
type slotSample struct {
	at                time.Time
	confirmed, walEnd uint64
	retained          int64
	lagSeconds        float64
	err               string
}

// sampleSlot reads the slot's state every slotInterval while ctx lasts,
// into c.slot and the metrics.
func (c *Capture) sampleSlot(ctx context.Context) {
	var conn *pgx.Conn
	defer func() {
		if conn != nil {
			_ = conn.Close(context.WithoutCancel(ctx))
		}
	}()
	t := time.NewTicker(slotInterval)
	defer t.Stop()
	for {
		s := &slotSample{at: time.Now()}
		err := func() error {
			if conn == nil {
				var err error
				if conn, err = pgrepl.Connect(ctx, c.cfg.Repl); err != nil {
					return err
				}
			}
			qctx, cancel := context.WithTimeout(ctx, slotInterval)
			defer cancel()
			var confirmed, end *string
			if err := conn.QueryRow(qctx, slotQuery, c.cfg.Repl.Slot).Scan(&confirmed, &end, &s.retained, &s.lagSeconds); err != nil {
				_ = conn.Close(context.WithoutCancel(ctx))
				conn = nil
				return err
			}
			if confirmed != nil {
				if l, err := pglogrepl.ParseLSN(*confirmed); err == nil {
					s.confirmed = uint64(l)
				}
			}
			if end != nil {
				if l, err := pglogrepl.ParseLSN(*end); err == nil {
					s.walEnd = uint64(l)
				}
			}
			return nil
		}()
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			s.err = err.Error()
		} else {
			c.metrics.WALRetained.Set(float64(s.retained))
			c.metrics.LagSeconds.Set(s.lagSeconds)
			if s.walEnd >= s.confirmed {
				c.metrics.LagBytes.Set(float64(s.walEnd - s.confirmed))
			}
		}
		c.slot.Store(s)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// statusNow is this process's answer to a status request.
func (c *Capture) statusNow() any {
	st := bus.CaptureStatus{Process: bus.ThisProcess(""), Source: c.cfg.Source, Role: "standby", Slot: c.cfg.Repl.Slot,
		ChangesStreamName: c.cfg.Stream.Name}
	if c.isActive.Load() {
		st.Role = "active"
		if s := c.slot.Load(); s != nil {
			st.SampleTime, st.ConfirmedLSN, st.WALEndLSN, st.WALRetainedBytes, st.LagSeconds, st.SlotError =
				s.at, s.confirmed, s.walEnd, s.retained, s.lagSeconds, s.err
			if s.walEnd >= s.confirmed {
				st.LagBytes = int64(s.walEnd - s.confirmed)
			}
		}
		st.LastCommitTimeMs = c.lastCommitMs.Load()
	}
	return st
}
