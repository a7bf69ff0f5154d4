// Package s2local is a local server that speaks S2's REST API v1
// (https://s2.dev) the way the official Go SDK and S2's documentation speak
// it, for tests, benchmarks and running pgs2 without a cloud account.
//
// It serves basins and streams in "direct endpoint" mode, as s2-lite does:
// account-scoped requests go to /v1/basins, basin-scoped requests to
// /v1/streams and name their basin in the s2-basin header. Bodies are JSON
// (s2-format raw or base64) or protobuf (application/protobuf, the messages of
// S2's s2.proto), and the SDK's s2s/proto sessions (pipelined appends and
// streaming reads) work over h2c. Reads also stream as server-sent events.
//
// Data lives in memory or, with a data directory, in one append-only log per
// stream: every append batch is one checksummed frame written with a single
// write(2) before the append is acknowledged, so an acknowledged append
// survives a SIGKILL of the server (and a machine crash with Fsync). On start
// the logs are verified and a torn tail is truncated.
//
// Fault injection (latency, error statuses at a rate, per stream or global,
// optionally after the append took effect) is configured at start-up and at
// run time through /admin/faults.
package s2local
