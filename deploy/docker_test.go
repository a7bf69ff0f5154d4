package deploy_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/compose-spec/compose-go/v2/types"
	"github.com/s2-streamstore/s2-sdk-go/s2"

	"github.com/pgs2/pgs2/pkg/natstest"
	"github.com/pgs2/pgs2/pkg/pgtest"
	"github.com/pgs2/pgs2/pkg/telemetry/otlptest"
)

// TestContainers runs the compose file's pgs2 services for real: the image
// built by scripts/build-image.sh (static binaries on a scratch base: no
// image can be pulled here), s2local with its named volume on /data as
// the image's user, capture, router and delivery (scaled to 3, as
// `--scale delivery=3`), each with the compose file's entrypoint, command,
// environment and config mount, started in the compose file's order once
// the services they depend on pass their compose health check (run with
// docker exec, as Docker does). The cluster profile's pipeline runs the
// same against three nats-server nodes. PostgreSQL (with deploy/init.sql),
// the nats-servers and an OTLP receiver standing in for Jaeger run on this
// machine; the containers share its network, so the addresses of the
// compose network (postgres:5432, nats:4222, s2local:8089, jaeger:4318,
// 0.0.0.0:910x) are replaced by loopback ports, and nothing else. An
// insert into users must reach S2, and every service's traces the
// receiver.
func TestContainers(t *testing.T) {
	if testing.Short() {
		t.Skip("containers test: a Docker engine, PostgreSQL and NATS")
	}
	if out, err := exec.Command("docker", "info", "--format", "{{.ServerVersion}}").CombinedOutput(); err != nil {
		t.Skipf("no Docker engine to run the containers test (docker info: %v: %s); on Debian, as root: "+
			"apt-get install docker.io && dockerd & — the compose file is still checked by TestComposeFile", err, bytes.TrimSpace(out))
	}
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	id := "pgs2test-" + hex.EncodeToString(b)
	tag := id + ":test"
	if out, err := exec.Command("../scripts/build-image.sh", tag).CombinedOutput(); err != nil {
		t.Fatalf("scripts/build-image.sh: %v\n%s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("docker", "rmi", "-f", tag).Run() })
	p := loadProject(t, "cluster")
	t.Run("single", func(t *testing.T) {
		ns := natstest.New(t)
		runCompose(t, p, tag, id+"-s", "", map[string]string{"nats://nats:4222": ns.URL()}, "users")
	})
	t.Run("cluster", func(t *testing.T) {
		c := natstest.NewCluster(t, 3)
		runCompose(t, p, tag, id+"-c", "-cluster",
			map[string]string{"nats://nats-1:4222,nats://nats-2:4222,nats://nats-3:4222": c.URLs()}, "users-cluster")
	})
}

// runCompose runs s2local and the pgs2 services named capture, router
// and delivery plus suffix, inserts a user and waits for it in the S2
// stream and for every service's spans.
func runCompose(t *testing.T, p *types.Project, tag, id, suffix string, nats map[string]string, stream string) {
	pg := pgtest.New(t)
	pg.MustExec(t, "postgres", "CREATE DATABASE app")
	initSQL, err := os.ReadFile("init.sql")
	if err != nil {
		t.Fatal(err)
	}
	pg.MustExec(t, "app", string(initSQL))
	traces := otlptest.New(t)
	// The compose network's addresses, as this machine's loopback ports.
	s2Port := freePort(t)
	addrs := map[string]string{
		"postgres:5432":  "127.0.0.1:" + strconv.Itoa(pg.Port),
		"s2local:8089":   "127.0.0.1:" + s2Port,
		"0.0.0.0:8089":   "127.0.0.1:" + s2Port,
		"127.0.0.1:8089": "127.0.0.1:" + s2Port,
		"jaeger:4318":    "http://" + traces.Addr,
	}
	for k, v := range nats {
		addrs[k] = v
	}
	replace := func(s string) string {
		for from, to := range addrs {
			s = strings.ReplaceAll(s, from, to)
		}
		return s
	}
	// Bind mounts: the compose file's sources with the addresses replaced,
	// readable by the image's user.
	mounts := t.TempDir()
	if err := os.Chmod(mounts, 0o755); err != nil {
		t.Fatal(err)
	}
	var started []string
	t.Cleanup(func() {
		for _, c := range started {
			if t.Failed() {
				out, _ := exec.Command("docker", "logs", c).CombinedOutput()
				t.Logf("container %s:\n%s", c, out)
			}
			_ = exec.Command("docker", "rm", "-f", c).Run()
		}
	})
	var volumes []string
	t.Cleanup(func() {
		for _, v := range volumes {
			_ = exec.Command("docker", "volume", "rm", "-f", v).Run()
		}
	})

	scale := map[string]int{"delivery" + suffix: 3}
	for _, name := range []string{"s2local", "capture" + suffix, "router" + suffix, "delivery" + suffix} {
		svc, err := p.GetService(name)
		if err != nil {
			t.Fatal(err)
		}
		replicas := 1
		if svc.Deploy != nil && svc.Deploy.Replicas != nil {
			replicas = *svc.Deploy.Replicas
		}
		if n, ok := scale[name]; ok {
			replicas = n
		}
		for i := 1; i <= replicas; i++ {
			// Each container its own health address on this machine's network.
			cmd := append([]string(nil), svc.Command...)
			health := append([]string(nil), svc.HealthCheck.Test[1:]...)
			for _, port := range []string{"9101", "9102", "9103"} {
				if slices.Contains(cmd, "0.0.0.0:"+port) {
					own := "127.0.0.1:" + freePort(t)
					cmd = replaceAll(cmd, "0.0.0.0:"+port, own)
					health = replaceAll(health, "127.0.0.1:"+port, own)
				}
			}
			container := fmt.Sprintf("%s-%s-%d", id, name, i)
			args := []string{"run", "-d", "--name", container, "--network", "host", "--entrypoint", svc.Entrypoint[0]}
			for k, v := range svc.Environment {
				if v != nil {
					args = append(args, "-e", k+"="+*v)
				}
			}
			for _, v := range svc.Volumes {
				args = append(args, "-v", mount(t, v, id, mounts, replace, &volumes))
			}
			args = append(args, tag)
			for _, a := range cmd {
				args = append(args, replace(a))
			}
			if out, err := exec.Command("docker", args...).CombinedOutput(); err != nil {
				t.Fatalf("docker %s: %v\n%s", strings.Join(args, " "), err, out)
			}
			started = append(started, container)
			waitHealthy(t, container, replaceEach(health, replace))
		}
	}

	pg.MustExec(t, "app", "INSERT INTO users (name, email) VALUES ('ada', 'ada@example.com')")
	base := "http://127.0.0.1:" + s2Port + "/v1"
	sdk := s2.New("local", &s2.ClientOptions{BaseURL: base, MakeBasinBaseURL: func(string) string { return base }, RequestTimeout: 5 * time.Second})
	deadline := time.Now().Add(60 * time.Second)
	for delivered := false; !delivered; {
		zero, count, clamp := uint64(0), uint64(10), true
		batch, err := sdk.Basin("local-basin").Stream(s2.StreamName(stream)).Read(context.Background(),
			&s2.ReadOptions{SeqNum: &zero, Count: &count, Clamp: &clamp})
		if err == nil {
			for _, r := range batch.Records {
				delivered = delivered || bytes.Contains(r.Body, []byte(`"ada@example.com"`))
			}
		}
		if !delivered && time.Now().After(deadline) {
			t.Fatalf("the insert did not reach S2 stream local-basin/%s in 60 s (last read: %v)", stream, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	// Traces: the batch exporters send within their 5 s schedule.
	for {
		got := traces.Services()
		if got["pgs2-capture"] > 0 && got["pgs2-router"] > 0 && got["pgs2-delivery"] > 0 {
			break
		}
		if time.Now().After(deadline.Add(30 * time.Second)) {
			t.Fatalf("spans received per service: %v, want pgs2-capture, pgs2-router and pgs2-delivery", got)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// mount turns a compose volume into a docker run -v argument: a named
// volume gets a name of this run's, a bind mount a copy of its source with
// the compose network's addresses replaced.
func mount(t *testing.T, v types.ServiceVolumeConfig, id, dir string, replace func(string) string, volumes *[]string) string {
	t.Helper()
	ro := ""
	if v.ReadOnly {
		ro = ":ro"
	}
	switch v.Type {
	case types.VolumeTypeVolume:
		name := id + "-" + v.Source
		if !slices.Contains(*volumes, name) {
			if out, err := exec.Command("docker", "volume", "create", name).CombinedOutput(); err != nil {
				t.Fatalf("docker volume create: %v\n%s", err, out)
			}
			*volumes = append(*volumes, name)
		}
		return name + ":" + v.Target + ro
	case types.VolumeTypeBind:
		b, err := os.ReadFile(v.Source)
		if err != nil {
			t.Fatal(err)
		}
		dst := filepath.Join(dir, filepath.Base(v.Source))
		if err := os.WriteFile(dst, []byte(replace(string(b))), 0o644); err != nil {
			t.Fatal(err)
		}
		return dst + ":" + v.Target + ro
	}
	t.Fatalf("volume %+v: type %s not handled by the test", v, v.Type)
	return ""
}

// waitHealthy runs the compose health check in the container until it
// passes (Docker runs it so too), for up to a minute.
func waitHealthy(t *testing.T, container string, check []string) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		out, err := exec.Command("docker", append([]string{"exec", container}, check...)...).CombinedOutput()
		if err == nil {
			return
		}
		state, _ := exec.Command("docker", "inspect", "--format", "{{.State.Status}}", container).Output()
		if st := strings.TrimSpace(string(state)); st != "running" && st != "created" {
			logs, _ := exec.Command("docker", "logs", container).CombinedOutput()
			t.Fatalf("%s is %s, not healthy:\n%s", container, st, logs)
		}
		if time.Now().After(deadline) {
			logs, _ := exec.Command("docker", "logs", container).CombinedOutput()
			t.Fatalf("%s not healthy after a minute: %v %s\n%s", container, err, out, logs)
		}
		time.Sleep(300 * time.Millisecond)
	}
}

func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	_, port, _ := net.SplitHostPort(l.Addr().String())
	return port
}

func replaceAll(s []string, from, to string) []string {
	for i := range s {
		if s[i] == from {
			s[i] = to
		}
	}
	return s
}

func replaceEach(s []string, f func(string) string) []string {
	out := make([]string, len(s))
	for i := range s {
		out[i] = f(s[i])
	}
	return out
}
