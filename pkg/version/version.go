// Package version tells which pgs2 a binary is: its module version (or
// "dev"), the commit it was built from and the Go that built it, read
// from the build information Go embeds.
package version

import (
	"fmt"
	"runtime/debug"
)

// Info is a binary's build.
type Info struct {
	Version  string // the module's version, "dev" for a build from a checkout
	Revision string // the commit (12 hex digits, "+dirty" when modified), or "unknown"
	Go       string
}

// Get reads the binary's build information.
func Get() Info {
	in := Info{Version: "dev", Revision: "unknown", Go: "unknown"}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return in
	}
	in.Go = bi.GoVersion
	if v := bi.Main.Version; v != "" && v != "(devel)" {
		in.Version = v
	}
	var dirty bool
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			in.Revision = s.Value
			if len(in.Revision) > 12 {
				in.Revision = in.Revision[:12]
			}
		case "vcs.modified":
			dirty = s.Value == "true"
		}
	}
	if dirty && in.Revision != "unknown" {
		in.Revision += "+dirty"
	}
	return in
}

// String is what --version prints: `capture pgs2 dev (commit 1a2b3c4d5e6f, go1.26.8)`.
func String(binary string) string {
	in := Get()
	return fmt.Sprintf("%s pgs2 %s (commit %s, %s)", binary, in.Version, in.Revision, in.Go)
}
