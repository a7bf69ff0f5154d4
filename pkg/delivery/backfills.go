package delivery

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/pgs2/pgs2/pkg/backfill"
	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/config"
	"github.com/pgs2/pgs2/pkg/s2sink"
	adminv1 "github.com/pgs2/pgs2/proto/pgs2/admin/v1"
)

// The backfill half of the admin API: jobs are written to the backfill
// store, where every source's capture picks them up.

// SetSinks tells the admin API the configured sinks, so that a backfill
// of an unknown sink or of a table outside its sink is refused, and status
// can read the S2 streams of sinks no delivery process writes now.
func (a *Admin) SetSinks(sinks []config.Sink) {
	tables := make(map[string][]string, len(sinks))
	clients := make(map[string]*s2sink.Client, len(sinks))
	for _, s := range sinks {
		tables[s.Name] = s.Tables
		if c, err := s2sink.New(s2sink.FromSink(s)); err == nil {
			clients[s.Name] = c // status reads the resume point of streams no one writes
		}
	}
	a.mu.Lock()
	a.sinkTables, a.s2 = tables, clients
	a.mu.Unlock()
}

func (a *Admin) tablesOf(sink string) ([]string, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	t, ok := a.sinkTables[sink]
	return t, ok || a.sinkTables == nil
}

func (a *Admin) sinkNames() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	names := make([]string, 0, len(a.sinkTables))
	for n := range a.sinkTables {
		names = append(names, n)
	}
	slices.Sort(names)
	return strings.Join(names, ", ")
}

func (a *Admin) startBackfill(w http.ResponseWriter, r *http.Request) {
	var req adminv1.StartBackfillRequest
	b, _ := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err := protojson.Unmarshal(b, &req); err != nil {
		writeErr(w, http.StatusBadRequest, "body: "+err.Error())
		return
	}
	tables, ok := a.tablesOf(req.Sink)
	if req.Sink == "" || !ok {
		writeErr(w, http.StatusBadRequest, fmt.Sprintf("sink %q is not in the config; sinks: %s", req.Sink, a.sinkNames()))
		return
	}
	if req.ChunkSize > config.MaxBackfillChunkSize {
		writeErr(w, http.StatusBadRequest, fmt.Sprintf("chunk_size %d is above %d", req.ChunkSize, config.MaxBackfillChunkSize))
		return
	}
	j := backfill.Job{ID: req.Id, Sink: req.Sink, ChunkSize: int(req.ChunkSize), MaxRowsPerSecond: int(req.MaxRowsPerSecond),
		State: backfill.Running, Created: time.Now().UTC(), By: a.operator(r, req.Operator)}
	if j.ID == "" {
		var rnd [4]byte
		_, _ = rand.Read(rnd[:])
		j.ID = req.Sink + "-" + time.Now().UTC().Format("20060102-150405") + "-" + hex.EncodeToString(rnd[:])
		if len(j.ID) > 64 {
			j.ID = j.ID[len(j.ID)-64:]
		}
	}
	for _, t := range req.Tables {
		name, err := config.ParseTable(t.Table)
		if err != nil {
			writeErr(w, http.StatusBadRequest, "table "+err.Error())
			return
		}
		if tables != nil && !slices.Contains(tables, name) {
			writeErr(w, http.StatusBadRequest, fmt.Sprintf("table %s is not a table of sink %s (%s); add it to the sink's tables", name, req.Sink, strings.Join(tables, ", ")))
			return
		}
		if err := config.CheckWhere(t.Where); err != nil {
			writeErr(w, http.StatusBadRequest, err.Error()+": give one SQL condition")
			return
		}
		j.Tables = append(j.Tables, backfill.TableSpec{Table: name, Where: t.Where})
	}
	err := a.backfills.Create(r.Context(), j)
	switch {
	case errors.Is(err, backfill.ErrExists):
		writeErr(w, http.StatusConflict, fmt.Sprintf("a backfill %s exists; give another id", j.ID))
		return
	case errors.Is(err, backfill.ErrBadID):
		writeErr(w, http.StatusBadRequest, err.Error())
		return
	case err != nil:
		writeErr(w, http.StatusServiceUnavailable, err.Error())
		return
	}
	var listed []string
	for _, t := range j.Tables {
		listed = append(listed, t.Table)
	}
	what := "every table of the sink"
	if len(listed) > 0 {
		what = strings.Join(listed, ", ")
	}
	a.record(r.Context(), j.Sink, &adminv1.AuditRecord{Id: j.ID, Operator: a.operator(r, req.Operator), Action: "backfill start", Reason: what})
	writeProto(w, http.StatusCreated, a.view(j, nil))
}

// record appends rec to the audit stream (best effort: the action is done).
func (a *Admin) record(ctx context.Context, sink string, rec *adminv1.AuditRecord) {
	rec.Time = timestamppb.Now()
	b, _ := protojson.Marshal(rec)
	_, _ = a.js.Publish(ctx, "pgs2.audit."+bus.EscapeToken(sink), b)
}

func (a *Admin) listBackfills(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	jobs, err := a.backfills.Jobs(ctx)
	if err != nil {
		writeErr(w, http.StatusServiceUnavailable, err.Error())
		return
	}
	slices.SortFunc(jobs, func(x, y backfill.Job) int { return cmp.Or(y.Created.Compare(x.Created), strings.Compare(x.ID, y.ID)) })
	resp := &adminv1.ListBackfillsResponse{}
	sink := r.URL.Query().Get("sink")
	for _, j := range jobs {
		if sink != "" && j.Sink != sink {
			continue
		}
		ps, err := a.backfills.Progresses(ctx, j.ID)
		if err != nil {
			writeErr(w, http.StatusServiceUnavailable, err.Error())
			return
		}
		resp.Backfills = append(resp.Backfills, a.view(j, ps))
	}
	writeProto(w, http.StatusOK, resp)
}

func (a *Admin) getBackfill(w http.ResponseWriter, r *http.Request) {
	j, ps, ok := a.backfill(w, r)
	if ok {
		writeProto(w, http.StatusOK, a.view(j, ps))
	}
}

// backfill reads the job of the request's {id} with its progress, or
// answers with the error.
func (a *Admin) backfill(w http.ResponseWriter, r *http.Request) (backfill.Job, []backfill.Progress, bool) {
	ctx := r.Context()
	j, _, err := a.backfills.Job(ctx, r.PathValue("id"))
	if errors.Is(err, backfill.ErrNotFound) {
		writeErr(w, http.StatusNotFound, fmt.Sprintf("no backfill %s (see pgs2ctl backfill status)", r.PathValue("id")))
		return j, nil, false
	}
	if err != nil {
		writeErr(w, http.StatusServiceUnavailable, err.Error())
		return j, nil, false
	}
	ps, err := a.backfills.Progresses(ctx, j.ID)
	if err != nil {
		writeErr(w, http.StatusServiceUnavailable, err.Error())
		return j, nil, false
	}
	return j, ps, true
}

// setBackfillState serves pause, resume and cancel.
func (a *Admin) setBackfillState(state string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		j, ps, ok := a.backfill(w, r)
		if !ok {
			return
		}
		var req adminv1.BackfillActionRequest
		if b, _ := io.ReadAll(io.LimitReader(r.Body, 1<<20)); len(b) > 0 {
			if err := protojson.Unmarshal(b, &req); err != nil {
				writeErr(w, http.StatusBadRequest, "body: "+err.Error())
				return
			}
		}
		if v := a.view(j, ps); v.State == backfill.Done || v.State == backfill.Cancelled {
			writeErr(w, http.StatusConflict, fmt.Sprintf("backfill %s is %s already; start a new one", j.ID, v.State))
			return
		}
		j, err := a.backfills.SetState(r.Context(), j.ID, state)
		if errors.Is(err, backfill.ErrNotFound) {
			writeErr(w, http.StatusNotFound, err.Error())
			return
		}
		if err != nil {
			writeErr(w, http.StatusConflict, err.Error())
			return
		}
		verb := map[string]string{backfill.Paused: "pause", backfill.Running: "resume", backfill.Cancelled: "cancel"}[state]
		a.record(r.Context(), j.Sink, &adminv1.AuditRecord{Id: j.ID, Operator: a.operator(r, req.Operator), Action: "backfill " + verb})
		writeProto(w, http.StatusOK, a.view(j, ps))
	}
}

// view is a job as the API shows it: its state follows from its own
// (paused, cancelled) and its tables' (failed when one failed, done when
// every one is).
func (a *Admin) view(j backfill.Job, ps []backfill.Progress) *adminv1.Backfill {
	v := &adminv1.Backfill{Id: j.ID, Sink: j.Sink, State: j.State, CreateTime: timestamppb.New(j.Created), CreatedBy: j.By,
		ChunkSize: uint32(j.ChunkSize), MaxRowsPerSecond: uint32(j.MaxRowsPerSecond)}
	for _, t := range j.Tables {
		v.Tables = append(v.Tables, &adminv1.BackfillTable{Table: t.Table, Where: t.Where})
	}
	slices.SortFunc(ps, func(x, y backfill.Progress) int {
		return cmp.Or(strings.Compare(x.Source, y.Source), strings.Compare(x.Table, y.Table))
	})
	done, failed := 0, false
	for _, p := range ps {
		// The planner's estimate, raised to the rows read when they are more.
		bp := &adminv1.BackfillProgress{Source: p.Source, Table: p.Table, State: p.State, Rows: p.Rows, EstimatedRows: max(p.Estimate, p.Rows),
			Error: p.Error, StartTime: timestamppb.New(p.Started), UpdateTime: timestamppb.New(p.Updated)}
		if secs := p.Updated.Sub(p.Started).Seconds(); secs > 0 && p.Rows > 0 {
			bp.RowsPerSecond = float64(p.Rows) / secs
			if p.State == backfill.Running && bp.EstimatedRows > p.Rows {
				bp.EtaSeconds = float64(bp.EstimatedRows-p.Rows) / bp.RowsPerSecond
			}
		}
		switch p.State {
		case backfill.Done:
			done++
		case backfill.Failed:
			failed = true
		}
		v.Progress = append(v.Progress, bp)
	}
	want := len(j.Tables)
	if want == 0 {
		tables, _ := a.tablesOf(j.Sink)
		want = len(tables)
	}
	if j.State == backfill.Running {
		switch {
		case failed:
			v.State = backfill.Failed
		case done > 0 && done >= want:
			v.State = backfill.Done
		}
	}
	return v
}
