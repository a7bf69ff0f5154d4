package devrun

import (
	"os/exec"
	"testing"
)

func TestShellQuote(t *testing.T) {
	for _, s := range []string{
		"psql",
		"/usr/lib/postgresql/15/bin/psql",
		"postgres://postgres@127.0.0.1:54329/app?sslmode=disable",
		SampleInsert,
		`it's "quoted" $HOME`,
		"",
	} {
		q := shellQuote(s)
		out, err := exec.Command("sh", "-c", `printf %s `+q).Output()
		if err != nil {
			t.Fatalf("sh -c printf %s: %v", q, err)
		}
		if string(out) != s {
			t.Errorf("shellQuote(%q) = %s; the shell reads it as %q", s, q, out)
		}
	}
	if q := shellQuote(SampleInsert); q[0] != '"' {
		t.Errorf("the sample insert should be double-quoted for readability: %s", q)
	}
}
