package backfill

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgs2/pgs2/pkg/bus"
)

// Bucket is the KV bucket of backfill jobs and their progress: the state
// lives in JetStream, so any process may start, pause or read a backfill
// and capture picks it up (and resumes it after a crash).
const Bucket = "PGS2_BACKFILLS"

// Job states (Job.State) and table states (Progress.State).
const (
	Running   = "running"
	Paused    = "paused"
	Cancelled = "cancelled"
	Done      = "done"
	Failed    = "failed"
)

// TableSpec is one table of a job, with an optional SQL filter.
type TableSpec struct {
	Table string `json:"table"`
	Where string `json:"where,omitempty"`
}

// Job is a backfill request: the rows of Tables (all of the sink's when
// empty) become `read` messages for Sink.
type Job struct {
	ID               string      `json:"id"`
	Sink             string      `json:"sink"`
	Source           string      `json:"source,omitempty"` // empty: every source with the tables
	Tables           []TableSpec `json:"tables,omitempty"`
	ChunkSize        int         `json:"chunk_size,omitempty"`
	MaxRowsPerSecond int         `json:"max_rows_per_second,omitempty"`
	State            string      `json:"state"`
	Created          time.Time   `json:"created"`
	By               string      `json:"by,omitempty"`
}

// Progress is where a job stands in one table of one source: written by
// that source's capture only.
type Progress struct {
	Job    string `json:"job"`
	Source string `json:"source"`
	Table  string `json:"table"`
	// Cursor is the last primary key read (text values); nil: none yet.
	Cursor []string `json:"cursor"`
	// Until is the largest primary key when the table's backfill started:
	// it reads up to it (nil: the table was empty).
	Until        []string  `json:"until"`
	Rows         int64     `json:"rows"`
	Estimate     int64     `json:"estimate"`
	ChunkStarted int64     `json:"chunk_started"`
	ChunkDone    int64     `json:"chunk_done"`
	State        string    `json:"state"`
	Error        string    `json:"error,omitempty"`
	Started      time.Time `json:"started"`
	Updated      time.Time `json:"updated"`
}

// Errors callers branch on.
var (
	ErrExists   = errors.New("backfill exists")
	ErrNotFound = errors.New("no such backfill")
	ErrBadID    = errors.New("invalid backfill id")
)

var idRE = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

// Store reads and writes jobs and progress.
type Store struct{ kv jetstream.KeyValue }

// Ensure creates or updates the bucket.
func Ensure(ctx context.Context, js jetstream.JetStream, replicas int) (*Store, error) {
	kv, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: Bucket, Replicas: replicas,
		Storage: jetstream.FileStorage, Description: "pgs2: backfill jobs and their progress per source and table"})
	if err != nil {
		return nil, fmt.Errorf("create or update KV bucket %s: %w", Bucket, err)
	}
	return &Store{kv: kv}, nil
}

func jobKey(id string) string { return "job." + id }

// ProgressKey names a table's progress: table names may hold any
// character, KV keys may not.
func ProgressKey(job, source, table string) string {
	h := sha256.Sum256([]byte(table))
	return "prog." + job + "." + source + "." + hex.EncodeToString(h[:8])
}

// Create stores a new job (ErrExists when its id is taken).
func (s *Store) Create(ctx context.Context, j Job) error {
	if !idRE.MatchString(j.ID) {
		return fmt.Errorf("%w %q: use 1-64 of [A-Za-z0-9_-]", ErrBadID, j.ID)
	}
	if j.State == "" {
		j.State = Running
	}
	b, err := json.Marshal(j)
	if err != nil {
		return err
	}
	if _, err := s.kv.Create(ctx, jobKey(j.ID), b); err != nil {
		if errors.Is(err, jetstream.ErrKeyExists) {
			return fmt.Errorf("%w: %s", ErrExists, j.ID)
		}
		return fmt.Errorf("store backfill %s: %w", j.ID, err)
	}
	return nil
}

// Job reads a job and its revision.
func (s *Store) Job(ctx context.Context, id string) (Job, uint64, error) {
	e, err := s.kv.Get(ctx, jobKey(id))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return Job{}, 0, fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	if err != nil {
		return Job{}, 0, fmt.Errorf("read backfill %s: %w", id, err)
	}
	var j Job
	if err := json.Unmarshal(e.Value(), &j); err != nil {
		return Job{}, 0, fmt.Errorf("backfill %s: %w", id, err)
	}
	return j, e.Revision(), nil
}

// SetState moves a job to state (paused, running, cancelled), retrying
// when another writer changed it meanwhile. A cancelled job stays so.
func (s *Store) SetState(ctx context.Context, id, state string) (Job, error) {
	for {
		j, rev, err := s.Job(ctx, id)
		if err != nil {
			return Job{}, err
		}
		if j.State == Cancelled && state != Cancelled {
			return j, fmt.Errorf("backfill %s is cancelled; start a new one", id)
		}
		j.State = state
		b, err := json.Marshal(j)
		if err != nil {
			return Job{}, err
		}
		_, err = s.kv.Update(ctx, jobKey(id), b, rev)
		if err == nil {
			return j, nil
		}
		if !bus.LostRace(err) {
			return Job{}, fmt.Errorf("update backfill %s: %w", id, err)
		}
	}
}

// Progress reads one table's progress and its revision (0 when none).
func (s *Store) Progress(ctx context.Context, job, source, table string) (Progress, uint64, error) {
	e, err := s.kv.Get(ctx, ProgressKey(job, source, table))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return Progress{}, 0, nil
	}
	if err != nil {
		return Progress{}, 0, fmt.Errorf("read the progress of backfill %s: %w", job, err)
	}
	var p Progress
	if err := json.Unmarshal(e.Value(), &p); err != nil {
		return Progress{}, 0, fmt.Errorf("progress of backfill %s: %w", job, err)
	}
	return p, e.Revision(), nil
}

// PutProgress writes p if its revision is still rev (0: not yet written)
// and returns the new revision: one capture per source writes it, and a
// stale one (a process that lost its session) fails here.
func (s *Store) PutProgress(ctx context.Context, p Progress, rev uint64) (uint64, error) {
	p.Updated = time.Now().UTC()
	b, err := json.Marshal(p)
	if err != nil {
		return 0, err
	}
	key := ProgressKey(p.Job, p.Source, p.Table)
	if rev == 0 {
		rev, err = s.kv.Create(ctx, key, b)
	} else {
		rev, err = s.kv.Update(ctx, key, b, rev)
	}
	if err != nil {
		return 0, fmt.Errorf("write the progress of backfill %s in %s: %w", p.Job, p.Table, err)
	}
	return rev, nil
}

// WatchJobs calls fn with every job, then with every change of one, until
// ctx ends or the watch fails.
func (s *Store) WatchJobs(ctx context.Context, fn func(Job)) error {
	w, err := s.kv.Watch(ctx, "job.*")
	if err != nil {
		return fmt.Errorf("watch backfills: %w", err)
	}
	defer w.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case e, ok := <-w.Updates():
			if !ok {
				return fmt.Errorf("watch backfills: the watch ended")
			}
			if e == nil || e.Operation() != jetstream.KeyValuePut {
				continue
			}
			var j Job
			if err := json.Unmarshal(e.Value(), &j); err != nil {
				continue // not a job this build reads
			}
			fn(j)
		}
	}
}

// Jobs lists every job.
func (s *Store) Jobs(ctx context.Context) ([]Job, error) {
	keys, err := s.kv.ListKeysFiltered(ctx, "job.*")
	if err != nil {
		return nil, fmt.Errorf("list backfills: %w", err)
	}
	var out []Job
	for k := range keys.Keys() {
		j, _, err := s.Job(ctx, k[len("job."):])
		if errors.Is(err, ErrNotFound) {
			continue
		}
		if err != nil {
			return nil, err
		}
		out = append(out, j)
	}
	return out, nil
}

// Progresses lists the progress of job in every source and table.
func (s *Store) Progresses(ctx context.Context, job string) ([]Progress, error) {
	keys, err := s.kv.ListKeysFiltered(ctx, "prog."+job+".>")
	if err != nil {
		return nil, fmt.Errorf("list the progress of backfill %s: %w", job, err)
	}
	var out []Progress
	for k := range keys.Keys() {
		e, err := s.kv.Get(ctx, k)
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("read the progress of backfill %s: %w", job, err)
		}
		var p Progress
		if err := json.Unmarshal(e.Value(), &p); err == nil {
			out = append(out, p)
		}
	}
	return out, nil
}
