// Package units writes quantities for people: byte counts in B, KiB,
// MiB, GiB, TiB, PiB.
package units

import "fmt"

// Bytes is n in B, KiB, MiB, GiB, TiB or PiB, one decimal above B.
func Bytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 4; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTP"[exp])
}
