// Package deploy_test checks that docker-compose.yml is a valid Compose file
// whose services use a valid pgs2 config (no Docker engine needed).
package deploy_test

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/compose-spec/compose-go/v2/cli"
	"github.com/compose-spec/compose-go/v2/types"
	"go.yaml.in/yaml/v3"

	"github.com/pgs2/pgs2/pkg/config"
)

// loadProject reads docker-compose.yml as docker compose does, with the
// services of the given profiles too.
func loadProject(t *testing.T, profiles ...string) *types.Project {
	t.Helper()
	opts, err := cli.NewProjectOptions([]string{"../docker-compose.yml"}, cli.WithWorkingDirectory(".."), cli.WithName("pgs2"),
		cli.WithProfiles(profiles))
	if err != nil {
		t.Fatal(err)
	}
	p, err := opts.LoadProject(context.Background())
	if err != nil {
		t.Fatalf("docker-compose.yml: %v", err)
	}
	return p
}

func TestComposeFile(t *testing.T) {
	p := loadProject(t)
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
	for file, replicas := range map[string]int{"cdc.compose.yaml": 1, "cdc.cluster.yaml": 3} {
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		c, err := config.Parse(b)
		if err != nil {
			t.Fatalf("deploy/%s: %v", file, err)
		}
		if c.NATS.Replicas != replicas || c.Telemetry.OTLPEndpoint != "jaeger:4318" {
			t.Errorf("deploy/%s: replicas %d, traces to %q; want %d and jaeger:4318", file, c.NATS.Replicas, c.Telemetry.OTLPEndpoint, replicas)
		}
	}
}

// TestComposeExtras: Jaeger takes OTLP, Prometheus scrapes every pgs2
// service (every replica: by DNS) at its --http-addr port, and the cluster
// profile has three JetStream nodes routed to each other and a pipeline
// on them.
func TestComposeExtras(t *testing.T) {
	p := loadProject(t, "cluster")
	if j, err := p.GetService("jaeger"); err != nil || j.Environment["COLLECTOR_OTLP_ENABLED"] == nil {
		t.Errorf("jaeger: %v, want a service with OTLP enabled", err)
	}
	prom, err := os.ReadFile("prometheus.yml")
	if err != nil {
		t.Fatal(err)
	}
	var pc struct {
		ScrapeConfigs []struct {
			DNS []struct {
				Names []string
				Port  int
			} `yaml:"dns_sd_configs"`
		} `yaml:"scrape_configs"`
	}
	if err := yaml.Unmarshal(prom, &pc); err != nil {
		t.Fatal(err)
	}
	scraped := map[string]int{}
	for _, sc := range pc.ScrapeConfigs {
		for _, d := range sc.DNS {
			for _, n := range d.Names {
				scraped[n] = d.Port
			}
		}
	}
	for _, svc := range p.Services {
		if len(svc.Entrypoint) != 1 || svc.Entrypoint[0] == "/usr/local/bin/s2local" || !strings.HasPrefix(svc.Entrypoint[0], "/usr/local/bin/") {
			continue
		}
		i := slices.Index(svc.Command, "--http-addr")
		if i < 0 || i+1 >= len(svc.Command) {
			t.Errorf("service %s: no --http-addr", svc.Name)
			continue
		}
		if port := svc.Command[i+1][strings.LastIndex(svc.Command[i+1], ":")+1:]; fmt.Sprint(scraped[svc.Name]) != port {
			t.Errorf("service %s listens on port %s; prometheus.yml scrapes it on %d", svc.Name, port, scraped[svc.Name])
		}
	}
	for _, n := range []string{"nats-1", "nats-2", "nats-3"} {
		svc, err := p.GetService(n)
		if err != nil || !slices.Contains(svc.Profiles, "cluster") || !strings.Contains(strings.Join(svc.Command, " "),
			"nats://nats-1:6222,nats://nats-2:6222,nats://nats-3:6222") {
			t.Errorf("%s: %v %v, want a node of the cluster profile routed to all three", n, err, svc.Command)
		}
	}
	for _, n := range []string{"capture-cluster", "router-cluster", "delivery-cluster"} {
		svc, err := p.GetService(n)
		if err != nil || len(svc.Volumes) != 1 || !strings.HasSuffix(svc.Volumes[0].Source, "cdc.cluster.yaml") {
			t.Errorf("%s: %v, want the cluster profile's config", n, err)
		}
	}
}
