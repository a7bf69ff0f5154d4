// Command pgs2ctl is the operator's command line for pgs2.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/pgs2/pgs2/pkg/ctl"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	code := ctl.Run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
