// Package deploy_test checks that docker-compose.yml is a valid Compose file
// whose services use a valid pgs2 config (no Docker engine needed).
package deploy_test

import (
	"context"
	"os"
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
	for _, name := range []string{"postgres", "nats", "capture"} {
		if _, err := p.GetService(name); err != nil {
			t.Errorf("service %s: %v", name, err)
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
