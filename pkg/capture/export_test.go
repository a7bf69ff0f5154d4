package capture

// WithCrashAfter ends the capture's first sessions, one after another,
// after each published n[i] messages, as a crash in the middle of a round
// would.
func WithCrashAfter(n ...int) Option { return func(c *Capture) { c.crashAfter = n } }
