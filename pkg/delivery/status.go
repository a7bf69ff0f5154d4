package delivery

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/change"
	"github.com/pgs2/pgs2/pkg/sinkstate"
	adminv1 "github.com/pgs2/pgs2/proto/pgs2/admin/v1"
)

// The status half of the admin API: GET /v1/status asks every capture,
// router and delivery process over NATS (request/reply on pgs2.status.>)
// and joins their answers with what JetStream holds (stream sizes, parks,
// blocked streams, dead letters, sink states). No process keeps the
// pipeline's status: each one answers for what only it knows.

// How long a status request waits for the processes' answers: at most
// statusWait, and statusStall after the last answer for the next one.
const (
	statusWait  = 500 * time.Millisecond
	statusStall = 50 * time.Millisecond
)

// gather asks every process answering on subject and decodes the answers
// (an answer that does not decode is left out).
func gather[T any](ctx context.Context, a *Admin, subject string) []T {
	raw, _ := bus.GatherStatus(ctx, a.js.Conn(), subject, statusWait, statusStall)
	out := make([]T, 0, len(raw))
	for _, b := range raw {
		var v T
		if json.Unmarshal(b, &v) == nil {
			out = append(out, v)
		}
	}
	return out
}

// answers is what the processes said.
type answers struct {
	captures   []bus.CaptureStatus
	routers    []bus.RouterStatus
	deliveries []bus.DeliveryStatus
}

func (a *Admin) ask(ctx context.Context) answers {
	var ans answers
	var wg sync.WaitGroup
	wg.Go(func() { ans.captures = gather[bus.CaptureStatus](ctx, a, bus.StatusSubject("capture")) })
	wg.Go(func() { ans.routers = gather[bus.RouterStatus](ctx, a, bus.StatusSubject("router")) })
	wg.Go(func() { ans.deliveries = gather[bus.DeliveryStatus](ctx, a, bus.StatusSubject("delivery")) })
	wg.Wait()
	return ans
}

// lsnText writes an LSN as Postgres does (0/16B3748); "" for none.
func lsnText(lsn uint64) string {
	if lsn == 0 {
		return ""
	}
	return pglogrepl.LSN(lsn).String()
}

func msTime(ms int64) *timestamppb.Timestamp {
	if ms <= 1 {
		return nil
	}
	return timestamppb.New(time.UnixMilli(ms))
}

// sources joins the captures' and routers' answers per source.
func sources(ans answers) []*adminv1.SourceStatus {
	by := map[string]*adminv1.SourceStatus{}
	get := func(name string) *adminv1.SourceStatus {
		if by[name] == nil {
			by[name] = &adminv1.SourceStatus{Source: name, CaptureState: "down", RouterState: "down"}
		}
		return by[name]
	}
	for _, c := range ans.captures {
		s := get(c.Source)
		if c.Role != "active" {
			s.CaptureStandbys = append(s.CaptureStandbys, c.Host)
			if s.CaptureState == "down" {
				s.CaptureState, s.Slot = "standby", c.Slot
			}
			continue
		}
		s.CaptureState, s.CaptureHost, s.CapturePid, s.Slot = "active", c.Host, uint32(c.PID), c.Slot
		s.ConfirmedLsn, s.WalEndLsn = lsnText(c.ConfirmedLSN), lsnText(c.WALEndLSN)
		s.WalRetainedBytes, s.ReplicationLagBytes, s.ReplicationLagSeconds = c.WALRetainedBytes, c.LagBytes, c.LagSeconds
		s.SlotError, s.LastCommitTime = c.SlotError, msTime(c.LastCommitTimeMs)
		if !c.SampleTime.IsZero() {
			s.SampleTime = timestamppb.New(c.SampleTime)
		}
	}
	for _, r := range ans.routers {
		s := get(r.Source)
		if r.Role == "active" {
			s.RouterState, s.RouterHost, s.DisabledSinks = "active", r.Host, r.Disabled
		} else if s.RouterState == "down" {
			s.RouterState = "standby"
		}
	}
	out := make([]*adminv1.SourceStatus, 0, len(by))
	for _, s := range by {
		slices.Sort(s.CaptureStandbys)
		out = append(out, s)
	}
	slices.SortFunc(out, func(x, y *adminv1.SourceStatus) int { return strings.Compare(x.Source, y.Source) })
	return out
}

// stages describes the JetStream streams between the stages: each source's
// changes stream (what its active router has not routed yet) and delivery
// stream (what the writers of its S2 streams have not read yet).
func (a *Admin) stages(ctx context.Context, ans answers) []*adminv1.StageStatus {
	var out []*adminv1.StageStatus
	seen := map[string]bool{}
	add := func(name, stage, source string, pending uint64) {
		if seen[name] {
			return
		}
		seen[name] = true
		st := &adminv1.StageStatus{Stream: name, Stage: stage, Source: source, Pending: pending}
		if s, err := a.js.Stream(ctx, name); err == nil {
			info := s.CachedInfo()
			st.Messages, st.Bytes = info.State.Msgs, info.State.Bytes
			if !info.State.FirstTime.IsZero() && info.State.Msgs > 0 {
				st.FirstTime, st.LastTime = timestamppb.New(info.State.FirstTime), timestamppb.New(info.State.LastTime)
			}
		}
		out = append(out, st)
	}
	pendingBy := map[string]uint64{}
	for _, d := range ans.deliveries {
		for _, u := range d.Units {
			for name, n := range u.PendingBy {
				pendingBy[name] += n
			}
		}
	}
	routers := slices.Clone(ans.routers)
	slices.SortFunc(routers, func(x, y bus.RouterStatus) int { return strings.Compare(x.Source, y.Source) })
	for _, r := range routers {
		if r.Role == "active" {
			add(r.ChangesStream, "changes", r.Source, r.Pending)
			add(r.DeliveryStream, "delivery", r.Source, pendingBy[r.DeliveryStream])
		}
	}
	for _, r := range routers { // sources whose router is down: the streams still hold what waits
		add(r.ChangesStream, "changes", r.Source, 0)
		add(r.DeliveryStream, "delivery", r.Source, pendingBy[r.DeliveryStream])
	}
	if names, err := bus.ListDeliveryStreams(ctx, a.js); err == nil {
		for _, n := range names {
			add(n, "delivery", "", pendingBy[n])
		}
	}
	return out
}

// deadLetters counts the dead letters per unit.
func (a *Admin) deadLetters(ctx context.Context) map[Unit]uint64 {
	out := map[Unit]uint64{}
	s, err := a.js.Stream(ctx, DeadStream)
	if err != nil {
		return out
	}
	info, err := s.Info(ctx, jetstream.WithSubjectFilter("pgs2.dead.>"))
	if err != nil {
		return out
	}
	for subj, n := range info.State.Subjects {
		t := strings.Split(subj, ".")
		if len(t) == 5 {
			out[Unit{bus.UnescapeToken(t[2]), bus.UnescapeToken(t[3]), bus.UnescapeToken(t[4])}] += n
		}
	}
	return out
}

// status answers GET /v1/status: sources, stages, and per sink and S2
// stream what was delivered last, how far behind it is, what is parked,
// blocked or dead-lettered, and who writes it.
func (a *Admin) status(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	want := r.URL.Query().Get("sink")
	now := time.Now()
	ans := a.ask(ctx)
	subjects, err := a.parkedSubjects(ctx, "-")
	if err != nil {
		writeErr(w, http.StatusServiceUnavailable, err.Error())
		return
	}
	blocked, err := ListBlocked(ctx, a.failures)
	if err != nil {
		writeErr(w, http.StatusServiceUnavailable, err.Error())
		return
	}
	bySink := map[string]*adminv1.SinkStatus{}
	streams := map[Unit]*adminv1.StreamStatus{}
	sink := func(name string) *adminv1.SinkStatus {
		if bySink[name] == nil {
			bySink[name] = &adminv1.SinkStatus{Sink: name, State: a.sinkState(ctx, name)}
		}
		return bySink[name]
	}
	stream := func(u Unit) *adminv1.StreamStatus {
		if streams[u] == nil {
			sk := sink(u.Sink)
			streams[u] = &adminv1.StreamStatus{Basin: u.Basin, Stream: u.Stream, State: "unowned"}
			if st := sk.State.GetState(); st != string(sinkstate.Active) {
				streams[u].State = st
			}
			sk.Streams = append(sk.Streams, streams[u])
		}
		return streams[u]
	}
	for _, name := range a.configuredSinks() {
		sink(name)
	}
	for _, u := range a.knownUnits(ctx) { // the streams routed to, owned or not
		stream(u)
	}
	for _, d := range ans.deliveries {
		for _, us := range d.Units {
			u := Unit{us.Sink, us.Basin, us.Stream}
			st := stream(u)
			st.State, st.Owner, st.OwnerHost, st.Pending = us.State, d.ID, d.Host, us.Pending
			if us.OldestWaitingMs > 1 {
				st.LagSeconds = max(0, now.Sub(time.UnixMilli(us.OldestWaitingMs)).Seconds())
			} else if us.Pending > 0 && us.LastCommitMs > 0 {
				// Read nothing yet of what waits: it was committed after the
				// last change appended, so this bounds the lag from above.
				st.LagSeconds = max(0, now.Sub(time.UnixMilli(us.LastCommitMs)).Seconds())
			}
			st.LastCommitTime = msTime(us.LastCommitMs)
			if p, err := change.ParseKey(us.LastKey); err == nil && us.LastKey != "" {
				st.LastCommitLsn = lsnText(p.LSN)
			}
			if !us.LastAppend.IsZero() {
				st.LastAppendTime = timestamppb.New(us.LastAppend)
			}
			st.LastError = us.LastError
		}
	}
	a.fillWaiting(ctx, now, streams, want)
	for subj, n := range subjects {
		if u, _, ok := parseParkSubject(subj); ok {
			sk, st := sink(u.Sink), stream(u)
			sk.ParkedGroups++
			sk.ParkedMessages += n
			st.ParkedGroups++
			st.ParkedMessages += n
		}
	}
	for _, b := range blocked {
		u := Unit{b.Sink, b.Basin, b.Stream}
		sk, st := sink(b.Sink), stream(u)
		if sk.OldestFailureTime == nil || b.FirstFailure.Before(sk.OldestFailureTime.AsTime()) {
			sk.OldestFailureTime = timestamppb.New(b.FirstFailure)
		}
		sk.BlockedStreams++
		st.State, st.FailingSince = "blocked", timestamppb.New(b.FirstFailure)
		st.LastError = fmt.Sprintf("%d %s: %s", b.Status, b.Code, b.Message)
	}
	for u, n := range a.deadLetters(ctx) {
		sink(u.Sink).DeadLetters += n
		stream(u).DeadLetters = n
	}
	resp := &adminv1.GetStatusResponse{Time: timestamppb.New(now), Sources: sources(ans), Stages: a.stages(ctx, ans)}
	for name, sk := range bySink {
		if want != "" && want != name {
			continue
		}
		slices.SortFunc(sk.Streams, func(x, y *adminv1.StreamStatus) int {
			return strings.Compare(x.Basin+"/"+x.Stream, y.Basin+"/"+y.Stream)
		})
		unknown := false
		for _, st := range sk.Streams {
			sk.Lag += st.Pending + st.ParkedMessages
			sk.LagSeconds = max(sk.LagSeconds, st.LagSeconds)
			unknown = unknown || st.LagSeconds < 0
			if st.LastCommitTime != nil && (sk.LastCommitTime == nil || st.LastCommitTime.AsTime().After(sk.LastCommitTime.AsTime())) {
				sk.LastCommitTime = st.LastCommitTime
			}
		}
		if unknown {
			sk.LagSeconds = -1 // not every stream measured
		}
		resp.Sinks = append(resp.Sinks, sk)
	}
	slices.SortFunc(resp.Sinks, func(x, y *adminv1.SinkStatus) int { return strings.Compare(x.Sink, y.Sink) })
	if want != "" && len(resp.Sinks) == 0 {
		writeErr(w, http.StatusNotFound, fmt.Sprintf("no sink %q: the sinks are %s", want, a.sinkNames()))
		return
	}
	writeProto(w, http.StatusOK, resp)
}

// knownUnits lists the S2 streams routers have published to (the units
// bucket), whether a delivery process writes them now or not.
func (a *Admin) knownUnits(ctx context.Context) []Unit {
	kv, err := a.js.KeyValue(ctx, bus.UnitsBucket)
	if err != nil {
		return nil
	}
	l, err := kv.ListKeys(ctx)
	if err != nil {
		return nil
	}
	var out []Unit
	for k := range l.Keys() {
		e, err := kv.Get(ctx, k)
		if err != nil {
			continue
		}
		if r, err := bus.ParseUnitEntry(k, e.Value()); err == nil {
			out = append(out, Unit{r.Sink, r.Basin, r.Stream})
		}
	}
	return out
}

// configuredSinks names the sinks of the config (none: not told).
func (a *Admin) configuredSinks() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	names := make([]string, 0, len(a.sinkTables))
	for n := range a.sinkTables {
		names = append(names, n)
	}
	return names
}

// sinkState is a sink's state as the bucket holds it (active when none).
func (a *Admin) sinkState(ctx context.Context, sink string) *adminv1.SinkState {
	e, _, ok, err := sinkstate.Get(ctx, a.sinks, sink)
	if err != nil || !ok {
		return &adminv1.SinkState{Sink: sink, State: string(sinkstate.Active)}
	}
	return stateView(sink, e)
}

func stateView(sink string, e sinkstate.Entry) *adminv1.SinkState {
	st := &adminv1.SinkState{Sink: sink, State: string(e.State), ChangedBy: e.By, Reason: e.Reason}
	if st.State == "" {
		st.State = string(sinkstate.Active)
	}
	if !e.Time.IsZero() {
		st.ChangeTime = timestamppb.New(e.Time)
	}
	return st
}

// errTransition is a state change that needs another one first.
var errTransition = errors.New("sink state transition")

// setSinkState serves POST /v1/sinks/{sink}/pause (resume, disable,
// enable): from is the states the action applies to (the others are
// refused with the command that applies), and the action is audited.
func (a *Admin) setSinkState(action string, to sinkstate.State) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		ctx := r.Context()
		name := r.PathValue("sink")
		if _, ok := a.tablesOf(name); !ok {
			writeErr(w, http.StatusNotFound, fmt.Sprintf("no sink %q: the sinks are %s", name, a.sinkNames()))
			return
		}
		var req adminv1.SinkStateRequest
		if b, _ := io.ReadAll(io.LimitReader(r.Body, 1<<20)); len(b) > 0 {
			if err := protojson.Unmarshal(b, &req); err != nil {
				writeErr(w, http.StatusBadRequest, "body: "+err.Error())
				return
			}
		}
		cur := sinkstate.Active
		if e, _, ok, err := sinkstate.Get(ctx, a.sinks, name); err != nil {
			writeErr(w, http.StatusServiceUnavailable, err.Error())
			return
		} else if ok && e.State != "" {
			cur = e.State
		}
		if err := transition(name, action, cur); err != nil {
			writeErr(w, http.StatusConflict, err.Error())
			return
		}
		op := a.operator(r, req.Operator)
		e, err := sinkstate.Set(ctx, a.sinks, name, to, op, req.Reason)
		if err != nil {
			writeErr(w, http.StatusServiceUnavailable, err.Error())
			return
		}
		a.record(ctx, name, &adminv1.AuditRecord{Id: name, Operator: op, Action: "sink " + action, Reason: req.Reason})
		writeProto(w, http.StatusOK, stateView(name, e))
	}
}

// transition checks that action applies to a sink in state cur: resume
// does not undo a disable (enable does), and pause does not turn a
// disabled sink into a paused one (which would route again).
func transition(sink, action string, cur sinkstate.State) error {
	switch {
	case action == "resume" && cur == sinkstate.Disabled:
		return fmt.Errorf("%w: sink %s is disabled, not paused: enable it (pgs2ctl sink enable %s)", errTransition, sink, sink)
	case action == "pause" && cur == sinkstate.Disabled:
		return fmt.Errorf("%w: sink %s is disabled, which stops its delivery already; enable it first to pause it instead", errTransition, sink)
	}
	return nil
}
