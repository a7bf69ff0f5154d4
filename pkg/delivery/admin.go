package delivery

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/pgs2/pgs2/pkg/backfill"
	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/s2sink"
	"github.com/pgs2/pgs2/pkg/sinkstate"
	adminv1 "github.com/pgs2/pgs2/proto/pgs2/admin/v1"
)

// AuditStream records operators' acknowledgements (dropped messages).
const AuditStream = "PGS2_AUDIT"

// Admin serves the admin API (proto/pgs2/admin/v1) over HTTP with JSON
// bodies: failed (parked) messages, listed, shown, retried and
// acknowledged. Any delivery process can answer: the state lives in
// JetStream.
type Admin struct {
	js        jetstream.JetStream
	failures  jetstream.KeyValue
	sinks     jetstream.KeyValue // sinkstate
	backfills *backfill.Store

	mu         sync.Mutex
	sinkTables map[string][]string       // nil: not told (SetSinks)
	s2         map[string]*s2sink.Client // per sink, to read resume points (SetSinks)
	tokens     []adminToken              // bearer tokens, one of which every call needs (none: open)
	named      bool                      // some token proves an operator
}

// RequireTokens makes every call of the API need the header
// `Authorization: Bearer <token>` with one of tokens (token → the operator
// it proves; "" for a shared token, whose callers name themselves). No
// tokens: none needed.
func (a *Admin) RequireTokens(tokens map[string]string) {
	a.mu.Lock()
	a.tokens, a.named = nil, false
	for tok, name := range tokens {
		a.tokens = append(a.tokens, adminToken{sha256.Sum256([]byte(tok)), name})
		a.named = a.named || name != ""
	}
	a.mu.Unlock()
}

type adminToken struct {
	digest   [32]byte // compared, not the token: equal lengths, so the time tells nothing
	operator string
}

type operatorKey struct{}

// operator is who made request r: the operator its token proves, else the
// one it declares (a shared token, or none) — marked as declared when
// operators have tokens of their own, so a shared token cannot pass for one.
func (a *Admin) operator(r *http.Request, declared string) string {
	if name, _ := r.Context().Value(operatorKey{}).(string); name != "" {
		return name
	}
	a.mu.Lock()
	named := a.named
	a.mu.Unlock()
	if named {
		if declared == "" {
			return "(shared token)"
		}
		return declared + " (declared, shared token)"
	}
	return declared
}

// authorized wraps h: without one of the tokens, 401 (the answer names no
// token); with an operator's token, the request carries the operator.
func (a *Admin) authorized(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		a.mu.Lock()
		tokens := a.tokens
		a.mu.Unlock()
		if len(tokens) > 0 {
			got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
			match, d := -1, sha256.Sum256([]byte(got))
			for i, t := range tokens { // every one compared: the time tells nothing
				if subtle.ConstantTimeCompare(d[:], t.digest[:]) == 1 {
					match = i
				}
			}
			if !ok || match < 0 {
				w.Header().Set("WWW-Authenticate", `Bearer realm="pgs2 admin"`)
				writeErr(w, http.StatusUnauthorized, "the admin API needs its token: send Authorization: Bearer <token> (pgs2ctl reads PGS2_ADMIN_TOKEN or PGS2_ADMIN_TOKEN_FILE)")
				return
			}
			if name := tokens[match].operator; name != "" {
				r = r.WithContext(context.WithValue(r.Context(), operatorKey{}, name))
			}
		}
		h(w, r)
	}
}

// NewAdmin returns the admin API, creating the audit stream if needed.
func NewAdmin(ctx context.Context, js jetstream.JetStream, replicas int) (*Admin, error) {
	_, err := js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
		Name: AuditStream, Description: "pgs2 operator actions on failed messages",
		Subjects: []string{"pgs2.audit.>"}, Storage: jetstream.FileStorage, Replicas: replicas,
	})
	if err != nil {
		return nil, fmt.Errorf("create or update stream %s: %w", AuditStream, err)
	}
	kv, err := EnsureFailures(ctx, js, replicas)
	if err != nil {
		return nil, err
	}
	store, err := backfill.Ensure(ctx, js, replicas)
	if err != nil {
		return nil, err
	}
	sinks, err := sinkstate.Ensure(ctx, js, replicas)
	if err != nil {
		return nil, err
	}
	return &Admin{js: js, failures: kv, sinks: sinks, backfills: store}, nil
}

// Register adds the API's routes to mux.
func (a *Admin) Register(mux *http.ServeMux) {
	for pattern, h := range map[string]http.HandlerFunc{
		"GET /v1/sinks/{sink}/messages":             a.list,
		"GET /v1/sinks/{sink}/messages/{id}":        a.show,
		"POST /v1/sinks/{sink}/messages/{id}/retry": a.retry,
		"POST /v1/sinks/{sink}/messages/{id}/ack":   a.ack,
		"POST /v1/sinks/{sink}/messages/retry":      a.retryAll,
		"GET /v1/sinks/{sink}/audit":                a.audit,
		"GET /v1/status":                            a.status,
		"POST /v1/sinks/{sink}/pause":               a.setSinkState("pause", sinkstate.Paused),
		"POST /v1/sinks/{sink}/resume":              a.setSinkState("resume", sinkstate.Active),
		"POST /v1/sinks/{sink}/disable":             a.setSinkState("disable", sinkstate.Disabled),
		"POST /v1/sinks/{sink}/enable":              a.setSinkState("enable", sinkstate.Active),
		"POST /v1/backfills":                        a.startBackfill,
		"GET /v1/backfills":                         a.listBackfills,
		"GET /v1/backfills/{id}":                    a.getBackfill,
		"POST /v1/backfills/{id}/pause":             a.setBackfillState(backfill.Paused),
		"POST /v1/backfills/{id}/resume":            a.setBackfillState(backfill.Running),
		"POST /v1/backfills/{id}/cancel":            a.setBackfillState(backfill.Cancelled),
	} {
		mux.HandleFunc(pattern, a.authorized(h))
	}
}

// parkedSubjects returns the parks of a sink ("-" = every sink) with their
// message counts.
func (a *Admin) parkedSubjects(ctx context.Context, sink string) (map[string]uint64, error) {
	ps, err := a.park(ctx)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		return nil, nil // nothing was ever parked
	}
	if err != nil {
		return nil, err
	}
	filter := ParkRoot + ".>"
	if sink != "-" {
		filter = ParkRoot + "." + bus.EscapeToken(sink) + ".>"
	}
	info, err := ps.Info(ctx, jetstream.WithSubjectFilter(filter))
	if err != nil {
		return nil, err
	}
	return info.State.Subjects, nil
}

// retryAll asks every worker with parked groups or a blocked stream of the
// sink to retry now.
func (a *Admin) retryAll(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	sink := r.PathValue("sink")
	subjects, err := a.parkedSubjects(ctx, sink)
	if err != nil {
		writeErr(w, http.StatusServiceUnavailable, err.Error())
		return
	}
	units := map[Unit]bool{}
	resp := &adminv1.RetryResponse{}
	for subj, n := range subjects {
		if u, _, ok := parseParkSubject(subj); ok {
			units[u] = true
			resp.Groups++
			resp.Messages += n
		}
	}
	blocked, err := ListBlocked(ctx, a.failures)
	if err != nil {
		writeErr(w, http.StatusServiceUnavailable, err.Error())
		return
	}
	for _, b := range blocked {
		if sink == "-" || b.Sink == sink {
			units[Unit{b.Sink, b.Basin, b.Stream}] = true
			resp.Messages += uint64(b.Records)
		}
	}
	for u := range units {
		if err := a.js.Conn().Publish(RetrySubject(u), nil); err != nil {
			writeErr(w, http.StatusServiceUnavailable, err.Error())
			return
		}
	}
	if len(units) > 0 {
		a.record(ctx, sink, &adminv1.AuditRecord{Id: sink, Operator: a.operator(r, r.URL.Query().Get("operator")), Action: "retry",
			Reason: fmt.Sprintf("retry every failed message of the sink now (%d groups, %d messages)", resp.Groups, resp.Messages)})
	}
	writeProto(w, http.StatusAccepted, resp)
}

// audit lists a sink's acknowledgements, oldest first.
func (a *Admin) audit(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	st, err := a.js.Stream(ctx, AuditStream)
	if err != nil {
		writeErr(w, http.StatusServiceUnavailable, err.Error())
		return
	}
	filter := "pgs2.audit.>"
	if sink := r.PathValue("sink"); sink != "-" {
		filter = "pgs2.audit." + bus.EscapeToken(sink)
	}
	limit, _ := strconv.Atoi(r.URL.Query().Get("page_size"))
	if limit <= 0 || limit > 1000 {
		limit = 100
	}
	seq, _ := strconv.ParseUint(r.URL.Query().Get("page_token"), 10, 64)
	seq = max(seq, 1)
	resp := &adminv1.ListAuditRecordsResponse{}
	for len(resp.Records) < limit {
		m, err := st.GetMsg(ctx, seq, jetstream.WithGetMsgSubject(filter))
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			break
		}
		if err != nil {
			writeErr(w, http.StatusServiceUnavailable, err.Error())
			return
		}
		seq = m.Sequence + 1
		var rec adminv1.AuditRecord
		if protojson.Unmarshal(m.Data, &rec) == nil {
			resp.Records = append(resp.Records, &rec)
		}
	}
	if len(resp.Records) == limit {
		resp.NextPageToken = strconv.FormatUint(seq, 10)
	}
	writeProto(w, http.StatusOK, resp)
}

func writeProto(w http.ResponseWriter, status int, m proto.Message) {
	b, err := protojson.MarshalOptions{UseProtoNames: true, EmitUnpopulated: false}.Marshal(m)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

func writeErr(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]string{"error": msg})
}

// failed turns a parked message into the API's view.
func failed(m *jetstream.RawStreamMsg, withPayload bool) (*adminv1.FailedMessage, error) {
	u, _, ok := parseParkSubject(m.Subject)
	if !ok {
		return nil, fmt.Errorf("%q is not a park subject", m.Subject)
	}
	h := m.Header
	dpos, _ := bus.ParseDeliveryPos(h.Get(HeaderDeliverySeq))
	dseq := dpos.Seq
	status, _ := strconv.Atoi(h.Get(HeaderS2Status))
	f := &adminv1.FailedMessage{
		Id: strconv.FormatUint(m.Sequence, 10), Sink: u.Sink, Basin: u.Basin, Stream: u.Stream,
		Table: h.Get(bus.HeaderTable), Group: h.Get(bus.HeaderGroup), Subject: h.Get(HeaderSubject), StreamSequence: dseq,
		IdempotencyKey: h.Get(bus.HeaderKey),
		LastError:      &adminv1.DeliveryError{HttpStatus: int32(status), Code: h.Get(HeaderS2Code), Message: h.Get(HeaderParkReason)},
	}
	if at, err := time.Parse(time.RFC3339Nano, h.Get(HeaderParkedAt)); err == nil {
		f.FirstFailureTime = timestamppb.New(at)
	}
	if parkKind(h.Get(HeaderParkKind)) == parkBehind {
		f.BlockedBy = "group"
	}
	if withPayload {
		f.Payload = m.Data
		for k, vs := range h {
			for _, v := range vs {
				f.Headers = append(f.Headers, &adminv1.Header{Name: k, Value: v})
			}
		}
	}
	return f, nil
}

func (a *Admin) park(ctx context.Context) (jetstream.Stream, error) {
	return a.js.Stream(ctx, ParkedStream)
}

func (a *Admin) list(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	sink := r.PathValue("sink")
	q := r.URL.Query()
	limit, _ := strconv.Atoi(q.Get("page_size"))
	if limit <= 0 || limit > 1000 {
		limit = 100
	}
	ps, err := a.park(ctx)
	if err != nil {
		writeErr(w, http.StatusServiceUnavailable, err.Error())
		return
	}
	filter := ParkRoot + ".>"
	if sink != "-" {
		filter = ParkRoot + "." + bus.EscapeToken(sink) + ".>"
	}
	resp := &adminv1.ListFailedMessagesResponse{}
	if q.Get("page_token") == "" { // blocked streams first, on the first page
		blocked, err := ListBlocked(ctx, a.failures)
		if err != nil {
			writeErr(w, http.StatusServiceUnavailable, err.Error())
			return
		}
		for _, b := range blocked {
			if sink != "-" && b.Sink != sink {
				continue
			}
			resp.Messages = append(resp.Messages, blockedView(b))
		}
	}
	start, _ := strconv.ParseUint(q.Get("page_token"), 10, 64)
	seq := max(start, 1)
	for len(resp.Messages) < limit {
		m, err := ps.GetMsg(ctx, seq, jetstream.WithGetMsgSubject(filter))
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			break
		}
		if err != nil {
			writeErr(w, http.StatusServiceUnavailable, err.Error())
			return
		}
		seq = m.Sequence + 1
		f, err := failed(m, false)
		if err != nil {
			continue
		}
		if (q.Get("basin") != "" && f.Basin != q.Get("basin")) || (q.Get("stream") != "" && f.Stream != q.Get("stream")) ||
			(q.Get("table") != "" && f.Table != q.Get("table")) || (q.Get("group") != "" && f.Group != q.Get("group")) {
			continue
		}
		resp.Messages = append(resp.Messages, f)
	}
	if len(resp.Messages) == limit {
		resp.NextPageToken = strconv.FormatUint(seq, 10)
	}
	writeProto(w, http.StatusOK, resp)
}

func (a *Admin) get(w http.ResponseWriter, r *http.Request) (*jetstream.RawStreamMsg, *adminv1.FailedMessage, bool) {
	id, err := strconv.ParseUint(r.PathValue("id"), 10, 64)
	if err != nil {
		writeErr(w, http.StatusBadRequest, "message id must be a number (see messages list)")
		return nil, nil, false
	}
	ps, err := a.park(r.Context())
	if err != nil {
		writeErr(w, http.StatusServiceUnavailable, err.Error())
		return nil, nil, false
	}
	m, err := ps.GetMsg(r.Context(), id)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		writeErr(w, http.StatusNotFound, fmt.Sprintf("no failed message %d (delivered or acknowledged already?)", id))
		return nil, nil, false
	}
	if err != nil {
		writeErr(w, http.StatusServiceUnavailable, err.Error())
		return nil, nil, false
	}
	f, err := failed(m, true)
	if err != nil || (r.PathValue("sink") != "-" && f.Sink != r.PathValue("sink")) {
		writeErr(w, http.StatusNotFound, fmt.Sprintf("message %d is not a failed message of sink %q", id, r.PathValue("sink")))
		return nil, nil, false
	}
	return m, f, true
}

// blockedView is a blocked stream as the API lists it: its head message.
func blockedView(b Blocked) *adminv1.FailedMessage {
	return &adminv1.FailedMessage{
		Id: "blocked-" + unitKey(Unit{b.Sink, b.Basin, b.Stream}), Sink: b.Sink, Basin: b.Basin, Stream: b.Stream,
		StreamSequence: b.HeadSeq, Attempts: uint32(b.Attempts), BlockedBy: "stream",
		LastError:        &adminv1.DeliveryError{HttpStatus: int32(b.Status), Code: b.Code, Message: b.Message},
		FirstFailureTime: timestamppb.New(b.FirstFailure), LastFailureTime: timestamppb.New(b.LastFailure),
		NextAttemptTime: timestamppb.New(b.NextAttempt),
	}
}

// blockedUnit reads a blocked stream's id ("blocked-…"); ok=false: not one.
func blockedUnit(w http.ResponseWriter, id string) (u Unit, isBlocked, ok bool) {
	key, isBlocked := strings.CutPrefix(id, "blocked-")
	if !isBlocked {
		return u, false, true
	}
	raw, err := base64.RawURLEncoding.DecodeString(key)
	parts := strings.Split(string(raw), "\x00")
	if err != nil || len(parts) != 3 {
		writeErr(w, http.StatusBadRequest, "unknown blocked stream id")
		return u, true, false
	}
	return Unit{parts[0], parts[1], parts[2]}, true, true
}

func (a *Admin) show(w http.ResponseWriter, r *http.Request) {
	u, isBlocked, ok := blockedUnit(w, r.PathValue("id"))
	if !ok {
		return
	}
	if isBlocked {
		blocked, err := ListBlocked(r.Context(), a.failures)
		if err != nil {
			writeErr(w, http.StatusServiceUnavailable, err.Error())
			return
		}
		for _, b := range blocked {
			if (Unit{b.Sink, b.Basin, b.Stream}) == u && (r.PathValue("sink") == "-" || r.PathValue("sink") == b.Sink) {
				writeProto(w, http.StatusOK, blockedView(b))
				return
			}
		}
		writeErr(w, http.StatusNotFound, fmt.Sprintf("stream %s/%s of sink %s is not blocked (any more)", u.Basin, u.Stream, u.Sink))
		return
	}
	if _, f, ok := a.get(w, r); ok {
		writeProto(w, http.StatusOK, f)
	}
}

func (a *Admin) retry(w http.ResponseWriter, r *http.Request) {
	u, isBlocked, ok := blockedUnit(w, r.PathValue("id"))
	if !ok {
		return
	}
	if isBlocked {
		if err := a.js.Conn().Publish(RetrySubject(u), nil); err != nil {
			writeErr(w, http.StatusServiceUnavailable, err.Error())
			return
		}
		a.record(r.Context(), u.Sink, &adminv1.AuditRecord{Id: r.PathValue("id"), Operator: a.operator(r, r.URL.Query().Get("operator")),
			Action: "retry", Reason: "retry the blocked stream " + u.Basin + "/" + u.Stream + " now"})
		writeProto(w, http.StatusAccepted, &adminv1.RetryResponse{Groups: 0, Messages: 1})
		return
	}
	_, f, ok := a.get(w, r)
	if !ok {
		return
	}
	if err := a.js.Conn().Publish(RetrySubject(Unit{f.Sink, f.Basin, f.Stream}), nil); err != nil {
		writeErr(w, http.StatusServiceUnavailable, err.Error())
		return
	}
	a.record(r.Context(), f.Sink, &adminv1.AuditRecord{Id: f.Id, Operator: a.operator(r, r.URL.Query().Get("operator")),
		Action: "retry", Reason: "retry message " + f.Id + " (group " + f.Group + ") now"})
	writeProto(w, http.StatusAccepted, &adminv1.RetryResponse{Groups: 1, Messages: 1})
}

func (a *Admin) ack(w http.ResponseWriter, r *http.Request) {
	if _, isBlocked, ok := blockedUnit(w, r.PathValue("id")); !ok {
		return
	} else if isBlocked {
		writeErr(w, http.StatusConflict, "a blocked stream's head message is not parked, so it cannot be acknowledged (dropped): "+
			"fix what S2 refuses (its last error is in `pgs2ctl messages show`) and retry; with retry.max_attempts set, it goes to the dead letters")
		return
	}
	m, f, ok := a.get(w, r)
	if !ok {
		return
	}
	var req adminv1.AcknowledgeFailedMessageRequest
	if b, _ := io.ReadAll(io.LimitReader(r.Body, 1<<20)); len(b) > 0 {
		if err := protojson.Unmarshal(b, &req); err != nil {
			writeErr(w, http.StatusBadRequest, "body: "+err.Error())
			return
		}
	}
	if strings.TrimSpace(req.Reason) == "" {
		writeErr(w, http.StatusBadRequest, `acknowledging drops the message: give a "reason"`)
		return
	}
	rec := &adminv1.AuditRecord{Id: f.Id, Operator: a.operator(r, req.Operator), Time: timestamppb.Now(), Reason: req.Reason, Message: f, Action: "ack"}
	b, _ := protojson.Marshal(rec)
	ctx := r.Context()
	if _, err := a.js.PublishMsg(ctx, &nats.Msg{Subject: "pgs2.audit." + bus.EscapeToken(f.Sink), Data: b,
		Header: nats.Header{bus.HeaderMsgID: []string{"ack:" + f.Id}}}); err != nil {
		writeErr(w, http.StatusServiceUnavailable, "record the acknowledgement: "+err.Error())
		return
	}
	ps, err := a.park(ctx)
	if err != nil {
		writeErr(w, http.StatusServiceUnavailable, "drop the message: "+err.Error())
		return
	}
	if err := ps.DeleteMsg(ctx, m.Sequence); err != nil {
		writeErr(w, http.StatusServiceUnavailable, "drop the message: "+err.Error())
		return
	}
	_ = a.js.Conn().Publish(RetrySubject(Unit{f.Sink, f.Basin, f.Stream}), nil)
	writeProto(w, http.StatusOK, rec)
}
