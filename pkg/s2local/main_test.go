package s2local

import (
	"bytes"
	"net"
	"strings"
	"testing"
)

// TestMainRefusesBadInput: bad flags exit 2 and an address in use exits
// 1, each naming the problem.
func TestMainRefusesBadInput(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--log-level", "loud"}, `--log-level "loud"`},
		{[]string{"--fault-error-rate", "0.5", "--fault-statuses", "503,x"}, "--fault-statuses"},
		{[]string{"extra"}, "unexpected arguments"},
	} {
		var out bytes.Buffer
		if code := Main(c.args, &out); code != 2 || !strings.Contains(out.String(), c.want) {
			t.Errorf("Main(%q) = %d, %q; want 2 and %q", c.args, code, out.String(), c.want)
		}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var out bytes.Buffer
	if code := Main([]string{"--addr", ln.Addr().String()}, &out); code != 1 || !strings.Contains(out.String(), "choose another --addr") {
		t.Errorf("Main on a used address = %d, %q; want 1 and a hint", code, out.String())
	}
}
