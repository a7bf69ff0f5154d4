package fn

import (
	"encoding/json"
	"math"
	"testing"

	"github.com/google/cel-go/common/types"

	"github.com/pgs2/pgs2/pkg/seed"
)

// TestWriteJSONMatchesEncodingJSON: seeded random values are written as
// encoding/json wrote their native form (keys sorted, escapes, floats).
func TestWriteJSONMatchesEncodingJSON(t *testing.T) {
	r, _ := seed.Rand(t)
	strs := []string{"", "plain", `q"uote\back`, "<a&b>", "tab\tnl\n\r\b\f", "\x01\x1f", "é中😀", "\u2028\u2029", "bad\xffutf8", "\xc3"}
	floats := []float64{0, -0.5, 1.5, 1e-7, 1e-6, 123456789.125, 1e20, 1e21, 1.5e300, -2.5e-10, math.MaxFloat64, math.SmallestNonzeroFloat64,
		math.NaN(), math.Inf(1)}
	var value func(depth int) any
	value = func(depth int) any {
		switch k := r.IntN(9); {
		case depth < 3 && k == 0:
			m := map[string]any{}
			for range r.IntN(5) {
				m[strs[r.IntN(len(strs))]+string(rune('a'+r.IntN(26)))] = value(depth + 1)
			}
			return m
		case depth < 3 && k == 1:
			l := make([]any, r.IntN(4))
			for i := range l {
				l[i] = value(depth + 1)
			}
			return l
		case k == 2:
			return strs[r.IntN(len(strs))]
		case k == 3:
			return floats[r.IntN(len(floats))]
		case k == 4:
			return r.Float64() * math.Pow(10, float64(r.IntN(40)-20))
		case k == 5:
			return r.Int64() - math.MaxInt64/2
		case k == 6:
			return r.IntN(2) == 0
		case k == 7:
			return uint64(r.Uint64())
		}
		return nil
	}
	for range 2000 {
		v := types.DefaultTypeAdapter.NativeToValue(value(0))
		got, err := writeJSON(nil, v)
		n, nerr := toNative(v)
		if err != nil || nerr != nil {
			if (err == nil) != (nerr == nil) {
				t.Fatalf("%v: writeJSON error %v, toNative error %v", v, err, nerr)
			}
			continue
		}
		want, err := json.Marshal(n)
		if err != nil {
			t.Fatal(err)
		}
		if string(got) != string(want) {
			t.Fatalf("writeJSON(%v) = %s, encoding/json %s", n, got, want)
		}
	}
}
