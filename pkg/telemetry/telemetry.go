// Package telemetry sets up OpenTelemetry tracing once per process: an OTLP
// exporter when an endpoint is configured, a no-op tracer otherwise, and the
// W3C trace-context propagator either way.
package telemetry

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"strings"
	"sync/atomic"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.26.0"
	"go.opentelemetry.io/otel/trace"
)

// Config configures tracing.
type Config struct {
	Service string
	// OTLPEndpoint is an OTLP/HTTP endpoint (host:port or URL); empty uses
	// OTEL_EXPORTER_OTLP_ENDPOINT, and tracing is off when both are empty.
	OTLPEndpoint string
}

// Setup installs the global tracer provider and propagator and returns a
// function that flushes and stops them.
func Setup(ctx context.Context, c Config) (func(context.Context) error, error) {
	otel.SetTextMapPropagator(propagation.TraceContext{})
	endpoint := c.OTLPEndpoint
	if endpoint == "" && os.Getenv("OTEL_EXPORTER_OTLP_ENDPOINT") == "" && os.Getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") == "" {
		return func(context.Context) error { return nil }, nil
	}
	var opts []otlptracehttp.Option
	if endpoint != "" {
		opts = append(opts, otlptracehttp.WithEndpointURL(endpointURL(endpoint)))
	}
	exp, err := otlptracehttp.New(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("telemetry.otlp_endpoint: %w", err)
	}
	enabled.Store(true)
	tp := sdktrace.NewTracerProvider(
		sdktrace.WithBatcher(exp),
		sdktrace.WithResource(resource.NewSchemaless(semconv.ServiceName("pgs2-"+c.Service))),
	)
	otel.SetTracerProvider(tp)
	return tp.Shutdown, nil
}

// endpointURL reads telemetry.otlp_endpoint: host:port or a URL without a
// path is a collector's base and gets the traces path /v1/traces (as
// OTEL_EXPORTER_OTLP_ENDPOINT does); a URL with a path is the traces URL
// itself (as OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is).
func endpointURL(e string) string {
	if !strings.HasPrefix(e, "http://") && !strings.HasPrefix(e, "https://") {
		e = "http://" + e
	}
	if u, err := url.Parse(e); err == nil && (u.Path == "" || u.Path == "/") {
		u.Path = "/v1/traces"
		return u.String()
	}
	return e
}

var enabled atomic.Bool

// Enabled reports whether Setup installed an exporter: services skip
// per-message span work when it did not.
func Enabled() bool { return enabled.Load() }

// SetEnabled forces Enabled (tests that install their own provider).
func SetEnabled(v bool) { enabled.Store(v) }

// ParseTraceParent reads a W3C traceparent header value.
func ParseTraceParent(v string) trace.SpanContext {
	if v == "" {
		return trace.SpanContext{}
	}
	ctx := propagation.TraceContext{}.Extract(context.Background(), propagation.MapCarrier{"traceparent": v})
	return trace.SpanContextFromContext(ctx)
}

// TraceParent formats a span context as a W3C traceparent header value, or
// "" when the span is not recording a valid trace.
func TraceParent(sc trace.SpanContext) string {
	if !sc.IsValid() {
		return ""
	}
	return fmt.Sprintf("00-%s-%s-%s", sc.TraceID(), sc.SpanID(), sc.TraceFlags())
}
