// Package seed gives seeded randomized tests their seed: PGS2_SEED when
// set (to replay a failure), else the clock, logged with the command that
// replays it.
package seed

import (
	"math/rand/v2"
	"os"
	"strconv"
	"testing"
	"time"
)

// For returns the test's seed and logs it.
func For(t testing.TB) uint64 {
	t.Helper()
	s := uint64(time.Now().UnixNano())
	if v := os.Getenv("PGS2_SEED"); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatalf("PGS2_SEED=%q is not a seed: %v", v, err)
		}
		s = n
	}
	t.Logf("seed %d (replay with PGS2_SEED=%d go test -run '^%s$')", s, s, t.Name())
	return s
}

// Rand returns a generator seeded with For's seed.
func Rand(t testing.TB) (*rand.Rand, uint64) {
	t.Helper()
	s := For(t)
	return rand.New(rand.NewPCG(s, s^0x9e3779b97f4a7c15)), s
}
