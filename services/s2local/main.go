// Command s2local is a local S2-compatible server (see pkg/s2local): the S2
// REST API v1 with JSON and protobuf bodies and the SDK's s2s sessions, in
// memory or persistent on disk, with optional fault injection.
//
//	s2local [--addr 127.0.0.1:8089] [--data-dir DIR] [--token T] [--fsync] [fault flags]
//
// The token may also come from S2LOCAL_TOKEN. Exit status: 0 after a clean
// shutdown (SIGINT or SIGTERM), 1 on a runtime error, 2 on bad flags.
package main

import (
	"os"

	"github.com/pgs2/pgs2/pkg/s2local"
)

func main() {
	os.Exit(s2local.Main(os.Args[1:], os.Stderr))
}
