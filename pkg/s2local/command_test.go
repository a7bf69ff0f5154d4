package s2local_test

import (
	"context"
	"net"
	"net/http"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/s2-streamstore/s2-sdk-go/s2"
)

// TestCommand: bin/s2local's exit codes, the token from S2LOCAL_TOKEN, and
// a prompt clean exit on SIGTERM with sessions open.
func TestCommand(t *testing.T) {
	out, err := exec.Command(s2localBin, "--no-such-flag").CombinedOutput()
	if code := exitCode(err); code != 2 {
		t.Fatalf("bad flag: exit %d\n%s", code, out)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	out, err = exec.Command(s2localBin, "--addr", ln.Addr().String()).CombinedOutput()
	if code := exitCode(err); code != 1 || !strings.Contains(string(out), "listen") {
		t.Fatalf("address in use: exit %d\n%s", code, out)
	}

	ctx := context.Background()
	t.Setenv("S2LOCAL_TOKEN", "from-env")
	p := startProc(t, "--data-dir", t.TempDir())
	if strings.Contains(p.log.String(), "from-env") {
		t.Fatalf("the token was logged:\n%s", p.log)
	}
	_, err = newSDK(p.base, "wrong").Basins.List(ctx, nil)
	wantS2Error(t, err, http.StatusUnauthorized, "authn")
	c := newSDK(p.base, "from-env")
	if _, err := c.Basins.Create(ctx, s2.CreateBasinArgs{Basin: testBasin}); err != nil {
		t.Fatal(err)
	}
	s := mustCreateStream(t, c.Basin(testBasin), "s")
	rs, err := s.ReadSession(ctx, &s2.ReadOptions{SeqNum: s2.Uint64(0)})
	if err != nil {
		t.Fatal(err)
	}
	defer rs.Close()
	req, _ := http.NewRequest("GET", p.base+"/v1/streams/s/records?seq_num=0&wait=600", nil)
	req.Header.Set("Authorization", "Bearer from-env")
	req.Header.Set("s2-basin", testBasin)
	req.Header.Set("Accept", "application/json")
	polled := make(chan error, 1)
	go func() {
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			resp.Body.Close()
		}
		polled <- err
	}()
	time.Sleep(200 * time.Millisecond) // both are waiting now
	start := time.Now()
	if code := p.stop(t); code != 0 {
		t.Fatalf("exit %d\n%s", code, p.log)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("shutdown took %v", d)
	}
	<-polled
	if !strings.Contains(p.log.String(), "stopped cleanly") {
		t.Fatalf("log:\n%s", p.log)
	}
}

func exitCode(err error) int {
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	if err != nil {
		return -1
	}
	return 0
}

// TestCreateBasinFlag: --create-basin makes basins at start, keeps them on
// the next start (persistent data dir), and refuses an invalid name.
func TestCreateBasinFlag(t *testing.T) {
	out, err := exec.Command(s2localBin, "--create-basin", "Not_A_Basin").CombinedOutput()
	if code := exitCode(err); code != 1 || !strings.Contains(string(out), "Not_A_Basin") {
		t.Fatalf("invalid basin name: exit %d\n%s", code, out)
	}
	dir := t.TempDir()
	for run := 0; run < 2; run++ {
		p := startProc(t, "--data-dir", dir, "--create-basin", "compose-basin", "--create-basin", "other-basin")
		list, err := newSDK(p.base, "any").Basins.List(context.Background(), nil)
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, b := range list.Basins {
			names = append(names, string(b.Name))
		}
		if strings.Join(names, ",") != "compose-basin,other-basin" {
			t.Fatalf("run %d: basins %v", run, names)
		}
		p.stop(t)
	}
}
