package capture

import "testing"

// TestNextChunkSize: chunks double while they read little, up to the
// configured size, and halve when they read much.
func TestNextChunkSize(t *testing.T) {
	for _, c := range []struct{ size, max, bytes, want int }{
		{100, 5000, 10 << 10, 200},    // small rows: grow
		{4000, 5000, 100 << 10, 5000}, // up to the most
		{5000, 5000, 100 << 10, 5000}, // and stay
		{100, 5000, 50 << 20, 50},     // wide rows: shrink
		{1, 5000, 50 << 20, 1},        // never below one row
		{400, 5000, 4 << 20, 400},     // in between: keep
		{8000, 5000, 4 << 20, 5000},   // a lowered maximum (a reload) applies
		{100, 50, 0, 50},              // an empty chunk: up to the most
	} {
		if got := nextChunkSize(c.size, c.max, c.bytes); got != c.want {
			t.Errorf("nextChunkSize(%d, %d, %d) = %d, want %d", c.size, c.max, c.bytes, got, c.want)
		}
	}
}
