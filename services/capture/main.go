// Command capture streams a PostgreSQL database's changes into JetStream.
package main

import (
	"os"

	"github.com/pgs2/pgs2/pkg/capture"
	"github.com/pgs2/pgs2/pkg/service"
)

func main() {
	os.Exit(service.Main("capture", "127.0.0.1:9101", os.Args[1:], os.Stderr, capture.Main))
}
