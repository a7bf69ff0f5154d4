package router

// WithCrashAfter ends the router's first session after it published n
// delivery messages, as a crash in the middle of a round would.
func WithCrashAfter(n int) Option { return func(r *Router) { r.crashAfter = n } }
