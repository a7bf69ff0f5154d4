// Command delivery appends routed changes to S2 streams.
package main

import (
	"os"

	"github.com/pgs2/pgs2/pkg/delivery"
	"github.com/pgs2/pgs2/pkg/service"
)

func main() {
	os.Exit(service.Main("delivery", "127.0.0.1:9103", os.Args[1:], os.Stderr, delivery.Main))
}
