package pgrepl

import (
	"errors"
	"strings"
	"testing"
)

// TestCheckVersion: 14 and later are captured; an older server is refused
// with a setup error naming the version and the fix (before, START_REPLICATION
// failed on pgoutput's unknown option "messages").
func TestCheckVersion(t *testing.T) {
	for _, ok := range []struct {
		v   string
		num int
	}{{"14.0", 140000}, {"15.18 (Debian 15.18-0+deb12u1)", 150018}, {"17.2", 170002}} {
		if err := CheckVersion(ok.v, ok.num); err != nil {
			t.Errorf("%s: %v", ok.v, err)
		}
	}
	err := CheckVersion("13.16", 130016)
	var se *SetupError
	if !errors.As(err, &se) || !errors.Is(err, ErrSetup) || !strings.Contains(err.Error(), "13.16") || !strings.Contains(se.Fix, "14 or later") {
		t.Fatalf("13.16: %v, want a setup error naming the version and the fix", err)
	}
}
