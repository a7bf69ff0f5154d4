package console

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/url"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
)

const goodToken = "console-unit-token-0123456789abcdef"

// fakeAPI answers like the admin API: every call needs token ("" = none),
// and it remembers the calls that change something.
type fakeAPI struct {
	token string
	mu    sync.Mutex
	calls []string // method path authorization body
}

func (f *fakeAPI) handler() http.Handler {
	mux := http.NewServeMux()
	auth := func(h http.HandlerFunc) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			if f.token != "" && r.Header.Get("Authorization") != "Bearer "+f.token {
				w.WriteHeader(http.StatusUnauthorized)
				_, _ = io.WriteString(w, `{"error":"the admin API needs its token"}`)
				return
			}
			h(w, r)
		}
	}
	mux.HandleFunc("GET /v1/status", auth(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, `{"sinks":[{"sink":"docs","state":{"sink":"docs","state":"active"},"parked_messages":"1",
			"streams":[{"basin":"b","stream":"docs","state":"idle","owner":"d1","owner_host":"host-1"}]}],"time":"2026-01-02T03:04:05Z"}`)
	}))
	mux.HandleFunc("GET /v1/sinks/{sink}/messages", auth(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, `{"messages":[{"id":"7","sink":"docs","basin":"b","stream":"docs","table":"public.docs","group":"[\"1\"]",
			"last_error":{"message":"record <b>too</b> large"},"first_failure_time":"2026-01-02T03:00:00Z"}]}`)
	}))
	mux.HandleFunc("GET /v1/sinks/{sink}/messages/{id}", auth(func(w http.ResponseWriter, r *http.Request) {
		big := strings.Repeat("x", 2*maxPayload)
		_, _ = io.WriteString(w, `{"id":"7","sink":"docs","payload":"`+b64(`{"body":"<script>alert(1)</script>`+big+`"}`)+`"}`)
	}))
	mux.HandleFunc("POST /v1/sinks/{sink}/pause", auth(func(w http.ResponseWriter, r *http.Request) {
		raw, _ := io.ReadAll(r.Body)
		var b bytes.Buffer
		_ = json.Compact(&b, raw) // protojson's spacing varies
		f.mu.Lock()
		f.calls = append(f.calls, r.Method+" "+r.URL.Path+" "+r.Header.Get("Authorization")+" "+b.String())
		f.mu.Unlock()
		_, _ = io.WriteString(w, `{"sink":"docs","state":"paused"}`)
	}))
	return mux
}

func (f *fakeAPI) changes() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.calls...)
}

// serve runs the console on the mux of a fake API needing token.
func serve(t *testing.T, token string) (*Console, *fakeAPI, *client) {
	t.Helper()
	api := &fakeAPI{token: token}
	mux := http.NewServeMux()
	mux.Handle("/v1/", api.handler())
	c := New(mux, nil)
	c.Register(mux)
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	jar, _ := cookiejar.New(nil)
	hc := &http.Client{Jar: jar, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	return c, api, &client{t: t, hc: hc, base: srv.URL}
}

// client is a browser without JavaScript: cookies, no redirects followed.
type client struct {
	t    *testing.T
	hc   *http.Client
	base string
}

func (c *client) do(method, path string, form url.Values) (*http.Response, string) {
	c.t.Helper()
	req, _ := http.NewRequest(method, c.base+path, strings.NewReader(form.Encode()))
	if form != nil {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		c.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

func (c *client) get(path string) (*http.Response, string) { return c.do(http.MethodGet, path, nil) }

func (c *client) post(path string, form url.Values) (*http.Response, string) {
	return c.do(http.MethodPost, path, form)
}

func (c *client) cookies() []*http.Cookie {
	u, _ := url.Parse(c.base + "/console/")
	return c.hc.Jar.Cookies(u)
}

var csrfField = regexp.MustCompile(`name="csrf" value="([^"]+)"`)

// csrf is the CSRF token of the page's forms.
func csrf(t *testing.T, page string) string {
	t.Helper()
	m := csrfField.FindStringSubmatch(page)
	if m == nil {
		t.Fatalf("no CSRF field in the page:\n%s", page)
	}
	return m[1]
}

// login logs in through the form and returns the session's CSRF token.
func (c *client) login(token string) (*http.Response, string) {
	c.t.Helper()
	_, page := c.get("/console/login")
	return c.post("/console/login", url.Values{"csrf": {csrf(c.t, page)}, "token": {token}, "operator": {"ada"}, "next": {"/console/messages"}})
}

func TestLoginAndCSRF(t *testing.T) {
	_, api, b := serve(t, goodToken)
	if resp, _ := b.get("/console/"); resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/console/login?next=%2Fconsole%2F" {
		t.Fatalf("overview without a session: %d %s, want the login form", resp.StatusCode, resp.Header.Get("Location"))
	}
	_, page := b.get("/console/login")
	tok := csrf(t, page)
	if resp, _ := b.post("/console/login", url.Values{"token": {goodToken}}); resp.StatusCode != http.StatusForbidden {
		t.Errorf("login without the CSRF token: %d, want 403", resp.StatusCode)
	}
	if resp, body := b.post("/console/login", url.Values{"csrf": {tok}, "token": {"wrong-token"}}); resp.StatusCode != http.StatusUnauthorized ||
		!strings.Contains(body, "does not take this token") || strings.Contains(body, "wrong-token") {
		t.Errorf("login with a wrong token: %d %s", resp.StatusCode, body)
	}
	for _, ck := range b.cookies() {
		if ck.Name == sessionCookie {
			t.Fatalf("a wrong token got a session")
		}
	}

	resp, _ := b.login(goodToken)
	if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/console/messages" {
		t.Fatalf("login: %d %s", resp.StatusCode, resp.Header.Get("Location"))
	}
	set := strings.Join(resp.Header.Values("Set-Cookie"), "\n")
	if !regexp.MustCompile(sessionCookie + `=[A-Za-z0-9_-]{43}; Path=/console; Max-Age=43200; HttpOnly; SameSite=Strict`).MatchString(set) {
		t.Errorf("session cookie: %s", set)
	}
	pages := ""
	for _, p := range []string{"/console/", "/console/messages", "/console/messages/docs/7", "/console/audit", "/console/login"} {
		resp, body := b.get(p)
		if p != "/console/audit" && resp.StatusCode != http.StatusOK { // the fake has no audit: its error is shown
			t.Errorf("GET %s: %d", p, resp.StatusCode)
		}
		if p == "/console/audit" && !strings.Contains(body, "GET /v1/sinks/-/audit: 404 Not Found") {
			t.Errorf("the API's error is not on the audit page:\n%s", body)
		}
		pages += body
		set += strings.Join(resp.Header.Values("Set-Cookie"), "\n")
	}
	if strings.Contains(pages, goodToken) || strings.Contains(set, goodToken) {
		t.Fatal("the token is in a page or a cookie")
	}
	for _, ck := range b.cookies() {
		if strings.Contains(ck.Value, goodToken) || strings.Contains(ck.Value, goodToken[:12]) {
			t.Fatalf("cookie %s holds the token", ck.Name)
		}
	}
	if !strings.Contains(pages, "record &lt;b&gt;too&lt;/b&gt; large") || !strings.Contains(pages, "&lt;script&gt;") || strings.Contains(pages, "<script>") {
		t.Error("the API's text is not escaped")
	}
	if !strings.Contains(pages, "showing the first 64.0 KiB") || len(pages) > 4*maxPayload {
		t.Errorf("the large payload is not cut (%d bytes of pages)", len(pages))
	}

	// Actions need the session's CSRF token: none, or another, is refused.
	_, page = b.get("/console/")
	sessCSRF := csrf(t, page)
	for _, bad := range []url.Values{{"action": {"pause"}}, {"action": {"pause"}, "csrf": {tok}}, {"action": {"pause"}, "csrf": {sessCSRF[:20]}}} {
		if resp, _ := b.post("/console/sinks/docs/state", bad); resp.StatusCode != http.StatusForbidden {
			t.Errorf("pause with csrf %q: %d, want 403", bad.Get("csrf"), resp.StatusCode)
		}
	}
	if n := len(api.changes()); n != 0 {
		t.Fatalf("refused forms reached the API: %v", api.changes())
	}
	resp, _ = b.post("/console/sinks/docs/state", url.Values{"action": {"pause"}, "csrf": {sessCSRF}, "reason": {"maintenance"}})
	if resp.StatusCode != http.StatusSeeOther || len(api.changes()) != 1 ||
		api.changes()[0] != `POST /v1/sinks/docs/pause Bearer `+goodToken+` {"operator":"ada","reason":"maintenance"}` {
		t.Fatalf("pause: %d, API calls %q", resp.StatusCode, api.changes())
	}
	if _, body := b.get(resp.Header.Get("Location")); !strings.Contains(body, "sink docs is paused now") {
		t.Errorf("no flash after the pause:\n%s", body)
	}

	// Logout ends the session.
	if resp, _ := b.post("/console/logout", url.Values{"csrf": {sessCSRF}}); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("logout: %d", resp.StatusCode)
	}
	if resp, _ := b.get("/console/"); resp.StatusCode != http.StatusSeeOther {
		t.Errorf("overview after logout: %d, want the login form", resp.StatusCode)
	}
}

func TestSessionExpires(t *testing.T) {
	c, _, b := serve(t, goodToken)
	now := time.Now()
	var mu sync.Mutex
	c.sessions.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	if resp, _ := b.login(goodToken); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("login: %d", resp.StatusCode)
	}
	mu.Lock()
	now = now.Add(sessionTTL - time.Minute)
	mu.Unlock()
	if resp, _ := b.get("/console/"); resp.StatusCode != http.StatusOK {
		t.Fatalf("overview before the session expires: %d", resp.StatusCode)
	}
	mu.Lock()
	now = now.Add(2 * time.Minute)
	mu.Unlock()
	if resp, _ := b.get("/console/"); resp.StatusCode != http.StatusSeeOther || !strings.HasPrefix(resp.Header.Get("Location"), "/console/login") {
		t.Fatalf("overview after the session expired: %d %s", resp.StatusCode, resp.Header.Get("Location"))
	}
	if n := len(c.sessions.byID); n != 0 {
		t.Errorf("%d sessions kept after expiry", n)
	}
}

// TestNoTokenNoLogin: an API without tokens needs no login; forms carry
// the double-submit cookie's CSRF token.
func TestNoTokenNoLogin(t *testing.T) {
	_, api, b := serve(t, "")
	resp, page := b.get("/console/")
	if resp.StatusCode != http.StatusOK || !strings.Contains(page, `data-sink-state="docs"`) || strings.Contains(page, "Log out") {
		t.Fatalf("overview: %d\n%s", resp.StatusCode, page)
	}
	tok := csrf(t, page)
	var cookie string
	for _, ck := range b.cookies() {
		if ck.Name == csrfCookie {
			cookie = ck.Value
		}
	}
	if cookie != tok {
		t.Fatalf("the form's CSRF token %q is not the cookie's %q", tok, cookie)
	}
	wrong := "x" + tok[1:] // (a token starting with x made this the right one: CI, once in 64 runs)
	if tok[0] == 'x' {
		wrong = "y" + tok[1:]
	}
	if resp, _ := b.post("/console/sinks/docs/state", url.Values{"action": {"pause"}, "csrf": {wrong}}); resp.StatusCode != http.StatusForbidden {
		t.Errorf("pause with a wrong CSRF token: %d", resp.StatusCode)
	}
	resp, _ = b.post("/console/sinks/docs/state", url.Values{"action": {"pause"}, "csrf": {tok}, "operator": {"bo"}})
	if resp.StatusCode != http.StatusSeeOther || len(api.changes()) != 1 || !strings.Contains(api.changes()[0], `"operator":"bo"`) {
		t.Fatalf("pause: %d %q", resp.StatusCode, api.changes())
	}
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }
