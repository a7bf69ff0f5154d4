package bus

import (
	"strings"
	"testing"
)

func TestEscapeToken(t *testing.T) {
	for _, s := range []string{"users", "my.stream", "a*b>c d", "100%", "", "ünï", "UPPER_lower-09"} {
		e := EscapeToken(s)
		if strings.ContainsAny(e, ".*> \t") || e == "" {
			t.Errorf("EscapeToken(%q) = %q is not one subject token", s, e)
		}
		if back := UnescapeToken(e); back != s {
			t.Errorf("UnescapeToken(EscapeToken(%q)) = %q", s, back)
		}
	}
	if EscapeToken("a.b") == EscapeToken("a%2Eb") {
		t.Error("escaping is not injective")
	}
}

func TestChangeSubjects(t *testing.T) {
	s := NewChangeSubjects("app", 64)
	a := s.Subject("public", "users", []byte(`["7"]`))
	if !strings.HasPrefix(a, "pgs2.changes.app.public.users.") {
		t.Fatalf("subject %q", a)
	}
	if b := s.Subject("public", "users", []byte(`["7"]`)); a != b {
		t.Fatalf("same group, different subjects: %q %q", a, b)
	}
	seen := map[string]bool{}
	for i := 0; i < 1000; i++ {
		seen[s.Subject("public", "users", []byte{byte(i), byte(i >> 8)})] = true
	}
	if len(seen) != 64 {
		t.Fatalf("1000 groups spread over %d partitions, want 64", len(seen))
	}
}
