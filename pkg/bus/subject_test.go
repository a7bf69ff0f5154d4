package bus

import (
	"strconv"
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
	a := s.Subject([]byte(`["7"]`))
	if src, _, _, p, perTable, err := ParseChangeSubject(a); err != nil || src != "app" || perTable || p != strconv.Itoa(Partition([]byte(`["7"]`), 64)) {
		t.Fatalf("subject %q: source %q, partition %q, per table %v, err %v", a, src, p, perTable, err)
	}
	if b := s.Subject([]byte(`["7"]`)); a != b {
		t.Fatalf("same group, different subjects: %q %q", a, b)
	}
	seen := map[string]bool{}
	for i := 0; i < 1000; i++ {
		seen[s.Subject([]byte{byte(i), byte(i >> 8)})] = true
	}
	if len(seen) != 64 {
		t.Fatalf("1000 groups spread over %d partitions, want 64", len(seen))
	}
}

// TestParseChangeSubject reads both forms: a partition's, and the subject
// per table of captures before batch version 4.
func TestParseChangeSubject(t *testing.T) {
	src, schema, table, p, perTable, err := ParseChangeSubject("pgs2.changes.my%2Eapp." + EscapeToken("a.b") + "." + EscapeToken("c d") + ".3")
	if err != nil || src != "my.app" || schema != "a.b" || table != "c d" || p != "3" || !perTable {
		t.Fatalf("per table: %q %q %q %q %v %v", src, schema, table, p, perTable, err)
	}
	for _, bad := range []string{"pgs2.changes.app", "pgs2.changes.app.public.3", "pgs2.deliver.app.3", "x.changes.app.3"} {
		if _, _, _, _, _, err := ParseChangeSubject(bad); err == nil {
			t.Errorf("%q parsed as a change subject", bad)
		}
	}
}
