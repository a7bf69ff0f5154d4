// Package telemetry sets up OpenTelemetry tracing once per process: an OTLP
// exporter when an endpoint is configured, a no-op tracer otherwise, and the
// W3C trace-context propagator either way.
package telemetry

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/url"
	"os"
	"strings"
	"sync/atomic"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/pgs2/pgs2/pkg/version"
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
	res, err := Resource(ctx, c.Service)
	if err != nil {
		return nil, err
	}
	enabled.Store(true)
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp), sdktrace.WithResource(res))
	otel.SetTracerProvider(tp)
	return tp.Shutdown, nil
}

// Resource describes the process to the tracing backend: service.name
// (pgs2-<service>), service.namespace, service.version, a
// service.instance.id unique to this process, host.name, process.pid,
// the SDK, and what OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME add or
// override.
func Resource(ctx context.Context, service string) (*resource.Resource, error) {
	v := version.Get()
	host, _ := os.Hostname()
	res, err := resource.New(ctx,
		resource.WithSchemaURL(semconv.SchemaURL),
		resource.WithAttributes(
			semconv.ServiceName("pgs2-"+service),
			semconv.ServiceNamespace("pgs2"),
			semconv.ServiceVersion(v.Version+"+"+v.Revision),
			semconv.ServiceInstanceID(instanceID(host)),
		),
		resource.WithHost(),
		resource.WithProcessPID(),
		resource.WithTelemetrySDK(),
		resource.WithFromEnv(), // last: OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME win
	)
	if err != nil {
		return nil, fmt.Errorf("telemetry resource (check OTEL_RESOURCE_ATTRIBUTES): %w", err)
	}
	return res, nil
}

// instanceID is host-pid-random: unique per process, readable.
func instanceID(host string) string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return fmt.Sprintf("%s-%d-%s", host, os.Getpid(), hex.EncodeToString(b[:]))
}

// Messaging systems, as messaging.system names them.
const (
	SystemNATS = "nats"
	SystemS2   = "s2"
)

// Messaging operations: the span name is "<operation> <destination>".
const (
	OpPublish = "publish" // capture → the changes stream
	OpProcess = "process" // router, per change read from the changes stream
	OpSend    = "send"    // delivery → an S2 stream
)

// Messaging is the attributes of a messaging span per the OpenTelemetry
// messaging conventions: system, destination, operation, and (for
// batches) the message count.
func Messaging(system, op, destination string, batch int) []attribute.KeyValue {
	typ := semconv.MessagingOperationTypeSend
	if op == OpProcess {
		typ = semconv.MessagingOperationTypeProcess
	}
	kv := []attribute.KeyValue{
		semconv.MessagingSystemKey.String(system),
		semconv.MessagingOperationName(op),
		typ,
		semconv.MessagingDestinationName(destination),
	}
	if batch > 0 {
		kv = append(kv, BatchCount(batch))
	}
	return kv
}

// BatchCount is messaging.batch.message_count.
func BatchCount(n int) attribute.KeyValue { return semconv.MessagingBatchMessageCount(n) }

// Fail marks span failed: status Error with the message, error.type the
// class of failure (low cardinality: "function", "412", "timeout").
func Fail(span trace.Span, errType, msg string) {
	span.SetAttributes(semconv.ErrorTypeKey.String(errType))
	span.SetStatus(codes.Error, msg)
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
