package console

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"net/http"
	"strings"
	"sync"
	"time"
)

// Cookies of the console, all HttpOnly, SameSite=Strict, Path=/console,
// and Secure on TLS. None holds the admin token.
const (
	sessionCookie = "pgs2_console_session" // a session's random id
	csrfCookie    = "pgs2_console_csrf"    // the double-submit CSRF token, without a session
	flashCookie   = "pgs2_console_flash"   // the message of the last action, shown once
	cookiePath    = "/console"
	sessionTTL    = 12 * time.Hour
)

// session is a logged-in browser: the admin token it gave, who it says
// it is (for the audit, when the token is a shared one), and the CSRF
// token its forms carry.
type session struct {
	token    string
	operator string
	csrf     string
	expires  time.Time
}

// sessions are kept in memory, by id.
type sessions struct {
	mu   sync.Mutex
	byID map[string]*session
	ttl  time.Duration
	now  func() time.Time
}

func newSessions(ttl time.Duration, now func() time.Time) *sessions {
	return &sessions{byID: map[string]*session{}, ttl: ttl, now: now}
}

// random is 32 random bytes, base64url.
func random() string {
	b := make([]byte, 32)
	_, _ = rand.Read(b) // never fails (crypto/rand)
	return base64.RawURLEncoding.EncodeToString(b)
}

// create starts a session (and forgets the expired ones).
func (s *sessions) create(token, operator string) (string, *session) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	for id, old := range s.byID {
		if !now.Before(old.expires) {
			delete(s.byID, id)
		}
	}
	id := random()
	sess := &session{token: token, operator: operator, csrf: random(), expires: now.Add(s.ttl)}
	s.byID[id] = sess
	return id, sess
}

// get is the live session of id (nil: none, or expired).
func (s *sessions) get(id string) *session {
	s.mu.Lock()
	defer s.mu.Unlock()
	sess := s.byID[id]
	if sess != nil && !s.now().Before(sess.expires) {
		delete(s.byID, id)
		return nil
	}
	return sess
}

func (s *sessions) delete(id string) {
	s.mu.Lock()
	delete(s.byID, id)
	s.mu.Unlock()
}

// caller is who sends a request: its session (nil: none) and the CSRF
// token its forms carry.
type caller struct {
	sess *session
	id   string
	csrf string
}

// token is the admin token to call the API with ("" without a session).
func (cl caller) token() string {
	if cl.sess == nil {
		return ""
	}
	return cl.sess.token
}

// operator is who acts, for the audit: the session's name, else the
// form's.
func (cl caller) operator(r *http.Request) string {
	if cl.sess != nil && cl.sess.operator != "" {
		return cl.sess.operator
	}
	return r.PostFormValue("operator")
}

// caller reads r's session. Without one, the CSRF token is the
// double-submit cookie's, set now when w is given and r has none.
func (c *Console) caller(w http.ResponseWriter, r *http.Request) caller {
	if ck, err := r.Cookie(sessionCookie); err == nil {
		if sess := c.sessions.get(ck.Value); sess != nil {
			return caller{sess: sess, id: ck.Value, csrf: sess.csrf}
		}
	}
	if ck, err := r.Cookie(csrfCookie); err == nil && len(ck.Value) >= 32 {
		return caller{csrf: ck.Value}
	}
	if w == nil {
		return caller{}
	}
	tok := random()
	setCookie(w, r, csrfCookie, tok, 0)
	return caller{csrf: tok}
}

// csrfOK checks the form's CSRF token against the caller's, in constant
// time.
func (cl caller) csrfOK(r *http.Request) bool {
	got := r.PostFormValue("csrf")
	return cl.csrf != "" && subtle.ConstantTimeCompare([]byte(got), []byte(cl.csrf)) == 1
}

// setCookie sets a console cookie; maxAge 0 lasts the browser session,
// < 0 deletes it.
func setCookie(w http.ResponseWriter, r *http.Request, name, value string, maxAge int) {
	http.SetCookie(w, &http.Cookie{Name: name, Value: value, Path: cookiePath, MaxAge: maxAge,
		HttpOnly: true, SameSite: http.SameSiteStrictMode, Secure: r.TLS != nil})
}

// flash is the outcome of the last action, shown on the page after the
// redirect.
type flash struct {
	OK   bool
	Text string
}

// setFlash keeps the outcome for the next page (at most 1000 bytes of it).
func setFlash(w http.ResponseWriter, r *http.Request, ok bool, text string) {
	if len(text) > 1000 {
		text = strings.ToValidUTF8(text[:1000], "") + "…"
	}
	kind := "e"
	if ok {
		kind = "o"
	}
	setCookie(w, r, flashCookie, base64.RawURLEncoding.EncodeToString([]byte(kind+text)), 60)
}

// takeFlash returns the kept outcome, if any, and forgets it.
func takeFlash(w http.ResponseWriter, r *http.Request) *flash {
	ck, err := r.Cookie(flashCookie)
	if err != nil {
		return nil
	}
	setCookie(w, r, flashCookie, "", -1)
	b, err := base64.RawURLEncoding.DecodeString(ck.Value)
	if err != nil || len(b) < 2 {
		return nil
	}
	return &flash{OK: b[0] == 'o', Text: string(b[1:])}
}
