package health

import (
	"io"
	"net"
	"net/http/httptest"
	"testing"
)

// TestProbe: 0 when /readyz answers 200 (a wildcard address probes this
// machine), 1 when not ready or nothing listens.
func TestProbe(t *testing.T) {
	st := NewState()
	srv := httptest.NewServer(st.Handler())
	defer srv.Close()
	_, port, _ := net.SplitHostPort(srv.Listener.Addr().String())
	if code := Probe("0.0.0.0:"+port, io.Discard); code != 1 {
		t.Errorf("not ready: exit %d", code)
	}
	st.SetReady()
	for _, addr := range []string{"0.0.0.0:" + port, "127.0.0.1:" + port, ":" + port} {
		if code := Probe(addr, io.Discard); code != 0 {
			t.Errorf("ready at %s: exit %d", addr, code)
		}
	}
	srv.Close()
	if code := Probe("127.0.0.1:"+port, io.Discard); code != 1 {
		t.Errorf("nothing listening: exit %d", code)
	}
	if code := Probe("", io.Discard); code != 1 {
		t.Errorf("no address: exit %d", code)
	}
}
