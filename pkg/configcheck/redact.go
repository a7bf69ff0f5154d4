package configcheck

import (
	"net/url"
	"os"
	"regexp"
	"sort"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgs2/pgs2/pkg/config"
)

// redacted stands in for a secret (as url.URL.Redacted writes it).
const redacted = "xxxxx"

// kvPassword is a password in a key=value DSN: password=secret or
// password='a secret with \' quotes'.
var kvPassword = regexp.MustCompile(`(?i)(\b(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s]+)`)

// RedactDSN returns a PostgreSQL DSN (a postgres:// URL or key=value
// string) with its password (in the user info or a password parameter)
// and sslpassword replaced by xxxxx.
func RedactDSN(dsn string) string {
	if strings.Contains(dsn, "://") {
		u, err := url.Parse(dsn)
		if err != nil {
			return "(unparsable DSN)"
		}
		if u.User != nil {
			if _, has := u.User.Password(); has {
				u.User = url.UserPassword(u.User.Username(), redacted)
			}
		}
		if q := u.Query(); q.Has("password") || q.Has("sslpassword") {
			for _, k := range []string{"password", "sslpassword"} {
				if q.Has(k) {
					q.Set(k, redacted)
				}
			}
			u.RawQuery = q.Encode()
		}
		return u.String()
	}
	return kvPassword.ReplaceAllString(dsn, "${1}"+redacted)
}

// secretsOf are the secrets the output must not hold: the source's
// password (from the DSN, PGS2_SOURCE_PASSWORD or a passfile), NATS's
// password and token, passwords in nats.url and the sinks' S2 tokens.
func secretsOf(c *config.Config) []string {
	var s []string
	add := func(v string) {
		// Very short values would scrub ordinary words; the redaction of
		// DSNs and URLs covers those.
		if len(v) >= 4 {
			s = append(s, v)
		}
	}
	add(os.Getenv("PGS2_SOURCE_PASSWORD"))
	for _, name := range []string{"PGS2_NATS_PASSWORD", "PGS2_NATS_TOKEN"} {
		if v, err := config.Secret(name); err == nil {
			add(v)
		}
	}
	if c == nil {
		return s
	}
	add(c.Source.Password)
	if pc, err := pgconn.ParseConfig(c.Source.DSN); err == nil {
		add(pc.Password)
	}
	if u, err := url.Parse(c.Source.DSN); err == nil && u.User != nil {
		if pw, ok := u.User.Password(); ok {
			add(pw)
			if raw := strings.TrimPrefix(u.User.String(), u.User.Username()+":"); raw != pw {
				add(raw) // as written, percent-encoded
			}
		}
	}
	for _, m := range kvPassword.FindAllStringSubmatch(c.Source.DSN, -1) {
		add(strings.Trim(m[2], "'"))
	}
	if u, err := url.Parse(c.Source.DSN); err == nil {
		add(u.Query().Get("password"))
		add(u.Query().Get("sslpassword"))
	}
	add(c.NATS.Password)
	add(c.NATS.Token)
	for _, p := range strings.Split(c.NATS.URL, ",") {
		if u, err := url.Parse(strings.TrimSpace(p)); err == nil && u.User != nil {
			if pw, ok := u.User.Password(); ok {
				add(pw)
			} else {
				add(u.User.Username()) // nats://TOKEN@host
			}
		}
	}
	for _, sk := range c.Sinks {
		add(os.Getenv(sk.AccessTokenEnv))
	}
	return s
}

// scrub replaces every secret in s, longest first.
func scrub(s string, secrets []string) string {
	sort.Slice(secrets, func(i, j int) bool { return len(secrets[i]) > len(secrets[j]) })
	for _, sec := range secrets {
		s = strings.ReplaceAll(s, sec, redacted)
	}
	return s
}
