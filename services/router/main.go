// Command router applies each sink's functions to captured changes and
// republishes them for delivery.
package main

import (
	"os"

	"github.com/pgs2/pgs2/pkg/router"
	"github.com/pgs2/pgs2/pkg/service"
)

func main() {
	os.Exit(service.Main("router", "127.0.0.1:9102", os.Args[1:], os.Stderr, router.Main))
}
