// Command run is `make run`: the whole pgs2 pipeline on one machine (see
// pkg/devrun and README.md). `make run` builds it as bin/pgs2-run.
package main

import (
	"os"

	"github.com/pgs2/pgs2/pkg/devrun"
)

func main() {
	os.Exit(devrun.Main(os.Args[1:], os.Stdout, os.Stderr))
}
