package router

import "time"

// RoutersBucket holds one key per source whose router runs (value: the
// router's id). A source's delivery stream has one writer — its chain
// assumes it —, so a second router of the same source is a standby (a
// rolling deploy, a copy run for availability): it takes over when the
// first is gone (bus.Lease).
const RoutersBucket = "PGS2_ROUTERS"

// leaseTTL is how long a router that stopped renewing keeps its source
// (a SIGKILLed one is replaced at once: nobody answers its pings).
const leaseTTL = 10 * time.Second
