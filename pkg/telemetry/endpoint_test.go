package telemetry

import "testing"

// TestEndpointURL: telemetry.otlp_endpoint is a base, as
// OTEL_EXPORTER_OTLP_ENDPOINT is: host:port or a URL without a path gets
// the traces path /v1/traces (before, spans went to "/" and a collector
// answered 404); a URL with a path is the traces URL itself.
func TestEndpointURL(t *testing.T) {
	for in, want := range map[string]string{
		"jaeger:4318":                        "http://jaeger:4318/v1/traces",
		"http://127.0.0.1:4318":              "http://127.0.0.1:4318/v1/traces",
		"http://127.0.0.1:4318/":             "http://127.0.0.1:4318/v1/traces",
		"https://otel.example.com":           "https://otel.example.com/v1/traces",
		"https://otel.example.com/v1/traces": "https://otel.example.com/v1/traces",
		"https://gw.example.com/otlp/traces": "https://gw.example.com/otlp/traces",
	} {
		if got := endpointURL(in); got != want {
			t.Errorf("endpointURL(%q) = %q, want %q", in, got, want)
		}
	}
}
