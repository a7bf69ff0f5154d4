package s2local

import "fmt"

// S2's name rules (common/src/caps.rs, basin.rs, stream.rs).
const (
	minBasinNameLen  = 8
	maxBasinNameLen  = 48
	maxStreamNameLen = 512
)

// validBasinName checks a basin name: 8–48 of [a-z0-9-], starting and
// ending with a letter or digit.
func validBasinName(name string) error {
	if len(name) < minBasinNameLen || len(name) > maxBasinNameLen {
		return fmt.Errorf("basin name must be %d to %d bytes long, got %d", minBasinNameLen, maxBasinNameLen, len(name))
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		alnum := (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9')
		if !alnum && c != '-' {
			return fmt.Errorf("basin name %q may only contain lowercase letters, digits and hyphens", name)
		}
		if !alnum && (i == 0 || i == len(name)-1) {
			return fmt.Errorf("basin name %q must start and end with a lowercase letter or digit", name)
		}
	}
	return nil
}

// validStreamName checks a stream name: 1–512 bytes, not "." or "..".
func validStreamName(name string) error {
	if len(name) == 0 {
		return fmt.Errorf("stream name must not be empty")
	}
	if len(name) > maxStreamNameLen {
		return fmt.Errorf("stream name must not exceed %d bytes, got %d", maxStreamNameLen, len(name))
	}
	if name == "." || name == ".." {
		return fmt.Errorf("stream name must not be %q", name)
	}
	return nil
}
