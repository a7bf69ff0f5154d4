package version_test

import (
	"errors"
	"os/exec"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/pgs2/pgs2/pkg/metrics"
	"github.com/pgs2/pgs2/pkg/proctest"
)

// TestEveryBinary: --version prints the binary, pgs2's version and commit
// and exits 0; -h and --help exit 0; an unknown flag is a usage error (2).
func TestEveryBinary(t *testing.T) {
	for _, name := range []string{"capture", "router", "delivery", "s2local", "pgs2ctl"} {
		bin := proctest.Build(t, "../../services/"+name)
		out, err := exec.Command(bin, "--version").Output()
		if err != nil || !strings.HasPrefix(string(out), name+" pgs2 ") || !strings.Contains(string(out), "(commit ") {
			t.Errorf("%s --version: %v %q", name, err, out)
		}
		for _, h := range []string{"-h", "--help"} {
			if out, err := exec.Command(bin, h).CombinedOutput(); err != nil || len(out) == 0 {
				t.Errorf("%s %s: %v, %d bytes of usage; want exit 0 with the usage", name, h, err, len(out))
			}
		}
		var ee *exec.ExitError
		if _, err := exec.Command(bin, "--no-such-flag").CombinedOutput(); !errors.As(err, &ee) || ee.ExitCode() != 2 {
			t.Errorf("%s --no-such-flag: %v, want exit 2", name, err)
		}
	}
}

// TestBuildInfo: every service's registry has pgs2_build_info = 1.
func TestBuildInfo(t *testing.T) {
	n, err := testutil.GatherAndCount(metrics.Registry(), "pgs2_build_info")
	if err != nil || n != 1 {
		t.Fatalf("pgs2_build_info: %d series, %v", n, err)
	}
}
