// Package console is pgs2's web console: server-rendered pages under
// /console/ on delivery's admin server (--http-addr) that show the
// pipeline's status, the failed messages and the audit, and carry out an
// operator's actions: pause, resume, disable or enable a sink, retry or
// acknowledge a failed message.
//
// The console is a client of the admin API (proto/pgs2/admin/v1), called
// in process through the same http.Handler that serves it, with the
// operator's bearer token: authentication, operator identity and the
// audit are exactly those of pgs2ctl.
//
// When the API answers 401, the console asks for the admin token, checks
// it with GET /v1/status and keeps it in a server-side session (memory
// only; lost on restart). The browser holds only the session's random id,
// in an HttpOnly, SameSite=Strict cookie; the token is never in a cookie,
// a URL, a page or a log. Every POST carries a CSRF token, the session's
// or, when the API needs no token (no login), a double-submit cookie's.
package console

import (
	"bytes"
	"embed"
	"html/template"
	"io/fs"
	"log/slog"
	"net/http"
	"strings"
	"time"
)

//go:embed templates/*.html static/*
var files embed.FS

// Limits of what a page shows.
const (
	maxItems   = 10000    // messages or audit records fetched, page after page
	maxRows    = 500      // rows a table shows
	maxPayload = 64 << 10 // payload bytes a message page shows
	maxHeader  = 2 << 10  // bytes of one header value shown
	maxForm    = 64 << 10 // bytes of a form
)

// Console serves the web console.
type Console struct {
	api      http.Handler
	log      *slog.Logger
	pages    map[string]*template.Template
	sessions *sessions
}

// New returns a console calling the admin API served by api (the mux the
// API and the console are registered on).
func New(api http.Handler, log *slog.Logger) *Console {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Console{api: api, log: log, pages: parsePages(), sessions: newSessions(sessionTTL, time.Now)}
}

func parsePages() map[string]*template.Template {
	pages := map[string]*template.Template{}
	for _, name := range []string{"login", "overview", "messages", "message", "audit"} {
		pages[name] = template.Must(template.New("layout.html").Funcs(funcs).
			ParseFS(files, "templates/layout.html", "templates/"+name+".html"))
	}
	return pages
}

// Register adds the console's routes (under /console/) to mux.
func (c *Console) Register(mux *http.ServeMux) {
	static, _ := fs.Sub(files, "static")
	routes := map[string]http.Handler{
		"GET /console":                             http.RedirectHandler("/console/", http.StatusFound),
		"GET /console/{$}":                         http.HandlerFunc(c.overview),
		"GET /console/messages":                    http.HandlerFunc(c.messages),
		"GET /console/messages/{sink}/{id}":        http.HandlerFunc(c.message),
		"GET /console/audit":                       http.HandlerFunc(c.audit),
		"GET /console/login":                       http.HandlerFunc(c.loginPage),
		"POST /console/login":                      c.post(c.login),
		"POST /console/logout":                     c.post(c.logout),
		"POST /console/sinks/{sink}/state":         c.post(c.setSinkState),
		"POST /console/sinks/{sink}/retry":         c.post(c.retrySink),
		"POST /console/messages/{sink}/{id}/retry": c.post(c.retryMessage),
		"POST /console/messages/{sink}/{id}/ack":   c.post(c.ackMessage),
		"GET /console/static/":                     http.StripPrefix("/console/static/", http.FileServerFS(static)),
	}
	for pattern, h := range routes {
		mux.Handle(pattern, secure(h))
	}
}

// secure sets the headers every console answer carries: no scripts, no
// framing, nothing cached, no referrer beyond the console.
func secure(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hd := w.Header()
		hd.Set("Content-Security-Policy", "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
		hd.Set("X-Content-Type-Options", "nosniff")
		hd.Set("X-Frame-Options", "DENY")
		hd.Set("Referrer-Policy", "same-origin")
		if !strings.HasPrefix(r.URL.Path, "/console/static/") {
			hd.Set("Cache-Control", "no-store")
		}
		h.ServeHTTP(w, r)
	})
}

// view is what every page template gets.
type view struct {
	Title    string
	Nav      string // the page's tab: overview, messages, audit
	CSRF     string // the token every form carries
	Flash    *flash
	LoggedIn bool   // a session: offer logout
	Operator string // the session's operator name
	AskName  bool   // no session: forms ask who acts, for the audit
	Err      string // the API's error, shown on the page
	Now      time.Time
	Data     any
}

// render writes page with v for cl (the flash of the last action
// included), or a plain 500 when the template fails.
func (c *Console) render(w http.ResponseWriter, r *http.Request, cl caller, status int, page string, v *view) {
	v.CSRF, v.LoggedIn, v.AskName = cl.csrf, cl.sess != nil, cl.sess == nil
	if cl.sess != nil {
		v.Operator = cl.sess.operator
	}
	if v.Now.IsZero() {
		v.Now = time.Now()
	}
	v.Flash = takeFlash(w, r)
	var b bytes.Buffer
	if err := c.pages[page].Execute(&b, v); err != nil {
		c.log.Error("console page", "page", page, "error", err)
		http.Error(w, "the console could not render this page (see delivery's log)", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(status)
	_, _ = w.Write(b.Bytes())
}
