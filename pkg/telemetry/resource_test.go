package telemetry

import (
	"context"
	"os"
	"strconv"
	"testing"
)

// TestResource: a process is described beyond its service name, and
// OTEL_RESOURCE_ATTRIBUTES adds to it.
func TestResource(t *testing.T) {
	t.Setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=test,team=data")
	res, err := Resource(context.Background(), "router")
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, kv := range res.Attributes() {
		got[string(kv.Key)] = kv.Value.Emit()
	}
	host, _ := os.Hostname()
	for k, want := range map[string]string{"service.name": "pgs2-router", "service.namespace": "pgs2", "host.name": host,
		"process.pid": strconv.Itoa(os.Getpid()), "deployment.environment.name": "test", "team": "data", "telemetry.sdk.language": "go"} {
		if got[k] != want {
			t.Errorf("%s = %q, want %q", k, got[k], want)
		}
	}
	for _, k := range []string{"service.version", "service.instance.id"} {
		if got[k] == "" {
			t.Errorf("no %s in %v", k, got)
		}
	}
	other, _ := Resource(context.Background(), "router")
	for _, kv := range other.Attributes() {
		if kv.Key == "service.instance.id" && kv.Value.Emit() == got["service.instance.id"] {
			t.Errorf("two resources share service.instance.id %s", got["service.instance.id"])
		}
	}
	t.Setenv("OTEL_SERVICE_NAME", "my-router")
	res, _ = Resource(context.Background(), "router")
	for _, kv := range res.Attributes() {
		if kv.Key == "service.name" && kv.Value.Emit() != "my-router" {
			t.Errorf("OTEL_SERVICE_NAME: service.name %s", kv.Value.Emit())
		}
	}
}
