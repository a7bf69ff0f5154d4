package router

import (
	"context"

	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/config"
	"github.com/pgs2/pgs2/pkg/service"
	"github.com/pgs2/pgs2/pkg/telemetry"
)

// FromConfig derives a router's settings from the config file.
func FromConfig(c *config.Config) Config {
	return Config{
		Source:        c.Source.Name,
		ChangesStream: c.NATS.ChangesStream,
		Delivery: bus.DeliveryStreamConfig{Name: c.NATS.DeliveryStream, Source: c.Source.Name, Replicas: c.NATS.Replicas,
			DuplicateWindow: c.NATS.DuplicateWindow.D(), MaxAge: c.NATS.ChangesMaxAge.D()},
		Sinks: c.Sinks,
	}
}

// Main is the router service: route until ctx ends; SIGHUP reloads the
// sinks from the config file.
func Main(ctx context.Context, env service.Env) error {
	stopTracing, err := telemetry.Setup(ctx, telemetry.Config{Service: "router", OTLPEndpoint: env.Config.Telemetry.OTLPEndpoint})
	if err != nil {
		return err
	}
	defer func() { _ = stopTracing(context.WithoutCancel(ctx)) }()
	nc, js, err := service.ConnectJetStream(ctx, env.Config.NATS.URL, env.Config.NATS, "pgs2-router", env.Log)
	if err != nil {
		return err
	}
	defer nc.Close()
	r, err := New(FromConfig(env.Config), js, WithLogger(env.Log), WithHealth(env.Health), WithMetrics(env.Metrics, env.Config.Source.Name))
	if err != nil {
		return err
	}
	service.OnReload(ctx, env, func(c *config.Config) error { return r.Reload(c.Sinks) })
	return r.Run(ctx)
}
