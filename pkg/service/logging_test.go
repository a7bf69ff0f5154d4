package service_test

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"

	"github.com/pgs2/pgs2/pkg/service"
)

// TestLogFormats: JSON logs are one object a line; inside a span both
// formats carry its trace and span ids; an unknown format is refused.
func TestLogFormats(t *testing.T) {
	tp := sdktrace.NewTracerProvider()
	ctx, span := tp.Tracer("test").Start(context.Background(), "op")
	defer span.End()
	sc := span.SpanContext()

	var buf bytes.Buffer
	log, err := service.NewLogger(&buf, "json", 0)
	if err != nil {
		t.Fatal(err)
	}
	log = log.With("service", "delivery")
	log.InfoContext(ctx, "append failed; retrying", "attempt", 2)
	log.Info("no span here")
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 2 {
		t.Fatalf("want 2 lines, got %q", buf.String())
	}
	var in, out map[string]any
	if err := json.Unmarshal([]byte(lines[0]), &in); err != nil {
		t.Fatalf("not JSON: %q: %v", lines[0], err)
	}
	if in["trace_id"] != sc.TraceID().String() || in["span_id"] != sc.SpanID().String() || in["msg"] != "append failed; retrying" ||
		in["service"] != "delivery" || in["attempt"] != float64(2) || in["level"] != "INFO" {
		t.Errorf("line in a span: %v", in)
	}
	if err := json.Unmarshal([]byte(lines[1]), &out); err != nil || out["trace_id"] != nil {
		t.Errorf("line outside a span: %v (%v)", out, err)
	}

	buf.Reset()
	text, err := service.NewLogger(&buf, "text", 0)
	if err != nil {
		t.Fatal(err)
	}
	text.WithGroup("g").InfoContext(ctx, "hello")
	if !strings.Contains(buf.String(), "trace_id="+sc.TraceID().String()) {
		t.Errorf("text line lacks the trace id: %q", buf.String())
	}
	if _, err := service.NewLogger(&buf, "yaml", 0); err == nil || !strings.Contains(err.Error(), "text or json") {
		t.Errorf("--log-format yaml: %v", err)
	}
}
