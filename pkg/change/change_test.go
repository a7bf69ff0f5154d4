package change

import "testing"

func TestKeyMatchesSequin(t *testing.T) {
	p := Position{LSN: 24023128, Idx: 0}
	if got, want := p.Key(), "MjQwMjMxMjg6MA=="; got != want {
		t.Fatalf("Key() = %q, want %q (the design's example)", got, want)
	}
	if got := string(p.AppendKey([]byte("x"))); got != "x"+p.Key() {
		t.Fatalf("AppendKey = %q", got)
	}
	back, err := ParseKey(p.Key())
	if err != nil || back != p {
		t.Fatalf("ParseKey = %v, %v", back, err)
	}
}

func TestParseKeyErrors(t *testing.T) {
	for _, k := range []string{"!!", "MTIz", "YTpi"} { // not base64, "123", "a:b"
		if _, err := ParseKey(k); err == nil {
			t.Errorf("ParseKey(%q) succeeded", k)
		}
	}
}

func TestPositionOrder(t *testing.T) {
	a, b, c := Position{10, 5}, Position{10, 6}, Position{11, 0}
	if !a.Less(b) || !b.Less(c) || c.Less(a) || a.Less(a) {
		t.Fatal("order broken")
	}
}
