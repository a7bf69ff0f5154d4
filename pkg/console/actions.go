package console

import (
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"

	adminv1 "github.com/pgs2/pgs2/proto/pgs2/admin/v1"
)

// post wraps a form's handler: the body is bounded and the form must
// carry the caller's CSRF token (else 403, nothing done).
func (c *Console) post(h func(http.ResponseWriter, *http.Request, caller)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r.Body = http.MaxBytesReader(w, r.Body, maxForm)
		cl := c.caller(nil, r)
		if !cl.csrfOK(r) {
			c.log.Warn("console refused a form without its CSRF token", "path", r.URL.Path, "remote", r.RemoteAddr)
			http.Error(w, "refused: this form does not carry its CSRF token (reload the page and try again)", http.StatusForbidden)
			return
		}
		h(w, r, cl)
	})
}

// finish ends an action: after a 401 the login form, else the outcome as
// a flash on the next page (to on success, back on failure).
func (c *Console) finish(w http.ResponseWriter, r *http.Request, cl caller, err error, ok, to, back string) {
	if c.toLogin(w, r, cl, err, back) {
		return
	}
	if err != nil {
		setFlash(w, r, false, err.Error())
		http.Redirect(w, r, back, http.StatusSeeOther)
		return
	}
	setFlash(w, r, true, ok)
	http.Redirect(w, r, to, http.StatusSeeOther)
}

// sinkActions are the sink state changes a form may ask for.
var sinkActions = []string{"pause", "resume", "disable", "enable"}

func (c *Console) setSinkState(w http.ResponseWriter, r *http.Request, cl caller) {
	sink, action := r.PathValue("sink"), r.PostFormValue("action")
	if !slices.Contains(sinkActions, action) {
		c.finish(w, r, cl, fmt.Errorf("unknown sink action %q", action), "", "", "/console/")
		return
	}
	req := &adminv1.SinkStateRequest{Operator: cl.operator(r), Reason: strings.TrimSpace(r.PostFormValue("reason"))}
	var st adminv1.SinkState
	err := c.call(r.Context(), cl.token(), http.MethodPost, sinkPath(sink, action), req, &st)
	c.finish(w, r, cl, err, fmt.Sprintf("sink %s is %s now", sink, st.GetState()), "/console/", "/console/")
}

// withOperator adds who acts to a path, as pgs2ctl does for retries.
func withOperator(path, operator string) string {
	if operator == "" {
		return path
	}
	return path + "?operator=" + url.QueryEscape(operator)
}

func (c *Console) retrySink(w http.ResponseWriter, r *http.Request, cl caller) {
	sink := r.PathValue("sink")
	var resp adminv1.RetryResponse
	err := c.call(r.Context(), cl.token(), http.MethodPost, withOperator(sinkPath(sink, "messages", "retry"), cl.operator(r)), nil, &resp)
	list := messagesURL(sink)
	c.finish(w, r, cl, err, fmt.Sprintf("retrying every failed message of sink %s now (%d messages, %d groups)", sink, resp.Messages, resp.Groups), list, list)
}

func (c *Console) retryMessage(w http.ResponseWriter, r *http.Request, cl caller) {
	sink, id := r.PathValue("sink"), r.PathValue("id")
	err := c.call(r.Context(), cl.token(), http.MethodPost, withOperator(sinkPath(sink, "messages", id, "retry"), cl.operator(r)), nil, nil)
	c.finish(w, r, cl, err, fmt.Sprintf("retrying message %s now: it leaves this list once S2 takes it", id),
		messagesURL(sink), messageURL(sink, id))
}

func (c *Console) ackMessage(w http.ResponseWriter, r *http.Request, cl caller) {
	sink, id := r.PathValue("sink"), r.PathValue("id")
	reason := strings.TrimSpace(r.PostFormValue("reason"))
	if reason == "" {
		c.finish(w, r, cl, fmt.Errorf("acknowledging drops the message: give a reason"), "", "", messageURL(sink, id))
		return
	}
	req := &adminv1.AcknowledgeFailedMessageRequest{Reason: reason, Operator: cl.operator(r)}
	var rec adminv1.AuditRecord
	err := c.call(r.Context(), cl.token(), http.MethodPost, sinkPath(sink, "messages", id, "ack"), req, &rec)
	c.finish(w, r, cl, err, fmt.Sprintf("message %s acknowledged: dropped, not delivered; recorded in the audit (operator %s)", id, dash(rec.Operator)),
		messagesURL(sink), messageURL(sink, id))
}

func messagesURL(sink string) string {
	if sink == "" || sink == "-" {
		return "/console/messages"
	}
	return "/console/messages?sink=" + url.QueryEscape(sink)
}

func messageURL(sink, id string) string {
	if sink == "" {
		sink = "-"
	}
	return "/console/messages/" + url.PathEscape(sink) + "/" + url.PathEscape(id)
}

// safeNext is where to go after login: a console page, else the overview.
func safeNext(next string) string {
	if strings.HasPrefix(next, "/console/") && !strings.ContainsAny(next, "\\\r\n") {
		return next
	}
	return "/console/"
}

// loginData is the login form's.
type loginData struct{ Next string }

func (c *Console) loginPage(w http.ResponseWriter, r *http.Request) {
	cl := c.caller(w, r)
	c.render(w, r, cl, http.StatusOK, "login", &view{Title: "Log in", Data: loginData{Next: safeNext(r.URL.Query().Get("next"))}})
}

// login checks the token with GET /v1/status and starts a session.
func (c *Console) login(w http.ResponseWriter, r *http.Request, cl caller) {
	token, operator := r.PostFormValue("token"), strings.TrimSpace(r.PostFormValue("operator"))
	next := safeNext(r.PostFormValue("next"))
	refuse := func(status int, msg string) {
		c.render(w, r, cl, status, "login", &view{Title: "Log in", Err: msg, Data: loginData{Next: next}})
	}
	if token == "" {
		refuse(http.StatusBadRequest, "give the admin token (PGS2_ADMIN_TOKEN, or yours from PGS2_ADMIN_TOKENS_FILE)")
		return
	}
	if err := c.call(r.Context(), token, http.MethodGet, "/v1/status", nil, nil); unauthorized(err) {
		c.log.Warn("console login refused: the admin API does not take the token", "remote", r.RemoteAddr)
		refuse(http.StatusUnauthorized, "the admin API does not take this token")
		return
	} // any other answer got past the API's token check
	if cl.sess != nil {
		c.sessions.delete(cl.id)
	}
	id, _ := c.sessions.create(token, operator)
	setCookie(w, r, sessionCookie, id, int(sessionTTL.Seconds()))
	c.log.Info("console login", "operator", operator, "remote", r.RemoteAddr)
	msg := "logged in"
	if operator != "" {
		msg += " as " + operator
	}
	setFlash(w, r, true, msg)
	http.Redirect(w, r, next, http.StatusSeeOther)
}

func (c *Console) logout(w http.ResponseWriter, r *http.Request, cl caller) {
	if cl.sess != nil {
		c.sessions.delete(cl.id)
	}
	setCookie(w, r, sessionCookie, "", -1)
	setFlash(w, r, true, "logged out")
	http.Redirect(w, r, "/console/login", http.StatusSeeOther)
}
