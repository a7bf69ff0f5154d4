// Package deploy_test checks that docker-compose.yml is a valid Compose file
// whose services use a valid pgs2 config (no Docker engine needed).
package deploy_test

import (
	"context"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/compose-spec/compose-go/v2/cli"

	"github.com/pgs2/pgs2/pkg/config"
)

func TestComposeFile(t *testing.T) {
	opts, err := cli.NewProjectOptions([]string{"../docker-compose.yml"}, cli.WithWorkingDirectory(".."), cli.WithName("pgs2"))
	if err != nil {
		t.Fatal(err)
	}
	p, err := opts.LoadProject(context.Background())
	if err != nil {
		t.Fatalf("docker-compose.yml: %v", err)
	}
	for _, name := range []string{"postgres", "nats", "s2local", "capture", "router", "delivery"} {
		svc, err := p.GetService(name)
		if err != nil {
			t.Errorf("service %s: %v", name, err)
			continue
		}
		switch name {
		case "capture", "router", "delivery", "s2local":
			// One image: the entrypoint picks the binary.
			if len(svc.Entrypoint) != 1 || svc.Entrypoint[0] != "/usr/local/bin/"+name {
				t.Errorf("service %s: entrypoint %v, want /usr/local/bin/%s", name, svc.Entrypoint, name)
			}
		}
		if svc.Build != nil && (svc.HealthCheck == nil || len(svc.HealthCheck.Test) < 3 || svc.HealthCheck.Test[1] != "/usr/local/bin/"+name ||
			svc.HealthCheck.Test[2] != "--probe") {
			t.Errorf("service %s: health check %v, want its own binary's --probe (the image has no shell or curl)", name, svc.HealthCheck)
		}
		if name != "s2local" && svc.Build != nil && !slices.Contains(svc.Command, "/etc/pgs2/cdc.yaml") {
			t.Errorf("service %s: command %v does not use the config file", name, svc.Command)
		}
	}
	if d, _ := p.GetService("delivery"); d.Deploy == nil || d.Deploy.Replicas == nil || *d.Deploy.Replicas < 2 {
		t.Errorf("delivery should run as several workers")
	}
	df, err := os.ReadFile("Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	for _, bin := range []string{"capture", "router", "delivery", "s2local", "pgs2ctl"} {
		if !strings.Contains(string(df), bin) {
			t.Errorf("deploy/Dockerfile does not build %s", bin)
		}
	}
	b, err := os.ReadFile("cdc.compose.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := config.Parse(b); err != nil {
		t.Fatalf("deploy/cdc.compose.yaml: %v", err)
	}
}
