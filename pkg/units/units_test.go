package units

import "testing"

func TestBytes(t *testing.T) {
	for n, want := range map[int64]string{0: "0 B", 1023: "1023 B", 1024: "1.0 KiB", 1536: "1.5 KiB", 26 << 10: "26.0 KiB",
		3 << 20: "3.0 MiB", 5 << 30: "5.0 GiB", 7 << 40: "7.0 TiB", 9 << 50: "9.0 PiB", 2048 << 50: "2048.0 PiB"} {
		if got := Bytes(n); got != want {
			t.Errorf("Bytes(%d) = %q, want %q", n, got, want)
		}
	}
}
