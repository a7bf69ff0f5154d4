package console

import (
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	adminv1 "github.com/pgs2/pgs2/proto/pgs2/admin/v1"
)

// toLogin sends the browser to the login form when err is the API's 401
// (no token, or one it no longer takes) and reports whether it did.
func (c *Console) toLogin(w http.ResponseWriter, r *http.Request, cl caller, err error, back string) bool {
	if !unauthorized(err) {
		return false
	}
	if cl.sess != nil { // the token was taken at login: revoked since
		c.sessions.delete(cl.id)
		setCookie(w, r, sessionCookie, "", -1)
		setFlash(w, r, false, "the admin API no longer takes this session's token: log in again")
	}
	http.Redirect(w, r, "/console/login?next="+url.QueryEscape(back), http.StatusSeeOther)
	return true
}

// errText is err for the page ("" for none).
func errText(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func (c *Console) overview(w http.ResponseWriter, r *http.Request) {
	cl := c.caller(w, r)
	var st adminv1.GetStatusResponse
	err := c.call(r.Context(), cl.token(), http.MethodGet, "/v1/status", nil, &st)
	if c.toLogin(w, r, cl, err, r.URL.RequestURI()) {
		return
	}
	v := &view{Title: "Overview", Nav: "overview", Err: errText(err), Data: &st}
	if st.Time != nil {
		v.Now = st.Time.AsTime()
	}
	c.render(w, r, cl, http.StatusOK, "overview", v)
}

// msgFilter is the messages page's filter: sink, stream and table go to
// the API; HTTP status, code and age are applied here.
type msgFilter struct {
	Sink, Stream, Table, Code string
	Status, OlderThan         string // as typed: a number, minutes
	status                    int
	olderThan                 time.Duration
}

func readFilter(q url.Values) (msgFilter, error) {
	f := msgFilter{Sink: strings.TrimSpace(q.Get("sink")), Stream: strings.TrimSpace(q.Get("stream")),
		Table: strings.TrimSpace(q.Get("table")), Code: strings.TrimSpace(q.Get("code")),
		Status: strings.TrimSpace(q.Get("http_status")), OlderThan: strings.TrimSpace(q.Get("older_than"))}
	var err error
	if f.Status != "" {
		if f.status, err = strconv.Atoi(f.Status); err != nil {
			return f, fmt.Errorf("HTTP status %q: give a number, e.g. 404", f.Status)
		}
	}
	if f.OlderThan != "" {
		m, err := strconv.ParseFloat(f.OlderThan, 64)
		if err != nil || m < 0 {
			return f, fmt.Errorf("older than %q: give minutes, e.g. 30", f.OlderThan)
		}
		f.olderThan = time.Duration(m * float64(time.Minute))
	}
	return f, nil
}

// apiQuery is what the API filters on itself.
func (f msgFilter) apiQuery() url.Values {
	q := url.Values{}
	if f.Stream != "" {
		q.Set("stream", f.Stream)
	}
	if f.Table != "" {
		q.Set("table", f.Table)
	}
	return q
}

// keep applies what the API does not filter on.
func (f msgFilter) keep(m *adminv1.FailedMessage, now time.Time) bool {
	e := m.GetLastError()
	if f.status != 0 && int(e.GetHttpStatus()) != f.status {
		return false
	}
	if f.Code != "" && e.GetCode() != f.Code {
		return false
	}
	if f.olderThan > 0 {
		t := m.GetFirstFailureTime()
		return t != nil && now.Sub(t.AsTime()) >= f.olderThan
	}
	return true
}

// messagesData is the messages page: blocked streams and parked messages
// that pass the filter, at most maxRows of each.
type messagesData struct {
	Filter                    msgFilter
	Blocked, Parked           []*adminv1.FailedMessage
	BlockedTotal, ParkedTotal int
	Truncated                 bool // more than maxItems failed messages: the first are shown
	MaxItems                  int
}

func (c *Console) messages(w http.ResponseWriter, r *http.Request) {
	cl := c.caller(w, r)
	v := &view{Title: "Failed messages", Nav: "messages", Now: time.Now()}
	f, err := readFilter(r.URL.Query())
	d := &messagesData{Filter: f, MaxItems: maxItems}
	v.Data = d
	if err != nil {
		v.Err = err.Error()
		c.render(w, r, cl, http.StatusBadRequest, "messages", v)
		return
	}
	all, truncated, err := c.failedMessages(r.Context(), cl.token(), f.Sink, f.apiQuery())
	if c.toLogin(w, r, cl, err, r.URL.RequestURI()) {
		return
	}
	v.Err, d.Truncated = errText(err), truncated
	for _, m := range all {
		if !f.keep(m, v.Now) {
			continue
		}
		if m.GetBlockedBy() == "stream" {
			d.BlockedTotal++
			if len(d.Blocked) < maxRows {
				d.Blocked = append(d.Blocked, m)
			}
			continue
		}
		d.ParkedTotal++
		if len(d.Parked) < maxRows {
			d.Parked = append(d.Parked, m)
		}
	}
	c.render(w, r, cl, http.StatusOK, "messages", v)
}

// messageData is one failed message's page.
type messageData struct {
	M       *adminv1.FailedMessage
	Sink    string // as in the page's path
	Blocked bool   // a blocked stream's head: not parked, so retried, never acknowledged
	Payload payloadView
	Headers []*adminv1.Header
}

func (c *Console) message(w http.ResponseWriter, r *http.Request) {
	cl := c.caller(w, r)
	sink, id := r.PathValue("sink"), r.PathValue("id")
	var m adminv1.FailedMessage
	err := c.call(r.Context(), cl.token(), http.MethodGet, sinkPath(sink, "messages", id), nil, &m)
	if c.toLogin(w, r, cl, err, r.URL.RequestURI()) {
		return
	}
	v := &view{Title: "Message " + id, Nav: "messages"}
	if err != nil {
		v.Err = err.Error()
		status := http.StatusBadGateway
		if e := (*apiError)(nil); errors.As(err, &e) {
			status = e.status
		}
		c.render(w, r, cl, status, "message", v)
		return
	}
	d := &messageData{M: &m, Sink: sink, Blocked: m.GetBlockedBy() == "stream", Payload: viewPayload(m.Payload)}
	for _, h := range m.Headers {
		d.Headers = append(d.Headers, &adminv1.Header{Name: h.Name, Value: clip(h.Value, maxHeader)})
	}
	slices.SortStableFunc(d.Headers, func(a, b *adminv1.Header) int { return strings.Compare(a.Name, b.Name) })
	v.Data = d
	c.render(w, r, cl, http.StatusOK, "message", v)
}

// auditData is the audit page: the last maxRows records, newest first.
type auditData struct {
	Sink    string
	Records []*adminv1.AuditRecord
	Total   int
}

func (c *Console) audit(w http.ResponseWriter, r *http.Request) {
	cl := c.caller(w, r)
	sink := strings.TrimSpace(r.URL.Query().Get("sink"))
	recs, total, err := c.auditRecords(r.Context(), cl.token(), sink, maxRows)
	if c.toLogin(w, r, cl, err, r.URL.RequestURI()) {
		return
	}
	slices.Reverse(recs)
	c.render(w, r, cl, http.StatusOK, "audit", &view{Title: "Audit", Nav: "audit", Err: errText(err),
		Data: &auditData{Sink: sink, Records: recs, Total: total}})
}
