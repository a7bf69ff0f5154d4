package delivery

import (
	"context"
	"fmt"

	"github.com/pgs2/pgs2/pkg/config"
	"github.com/pgs2/pgs2/pkg/console"
	"github.com/pgs2/pgs2/pkg/service"
	"github.com/pgs2/pgs2/pkg/telemetry"
)

// Main is the delivery service.
func Main(ctx context.Context, env service.Env) error {
	stopTracing, err := telemetry.Setup(ctx, telemetry.Config{Service: "delivery", OTLPEndpoint: env.Config.Telemetry.OTLPEndpoint})
	if err != nil {
		return err
	}
	defer func() { _ = stopTracing(context.WithoutCancel(ctx)) }()
	tokens, err := service.AdminTokens()
	if err != nil {
		return fmt.Errorf("%w: %v", service.ErrUsage, err)
	}
	if len(tokens) == 0 && env.HTTPAddr != "" && !service.Loopback(env.HTTPAddr) {
		return fmt.Errorf("%w: --http-addr %s serves the admin API beyond this machine: set PGS2_ADMIN_TOKEN (or PGS2_ADMIN_TOKEN_FILE, or a token per operator in PGS2_ADMIN_TOKENS_FILE) to require a token, or listen on 127.0.0.1",
			service.ErrUsage, env.HTTPAddr)
	}
	nc, js, err := service.ConnectJetStream(ctx, env.Config.NATS.URL, env.Config.NATS, "pgs2-delivery", env.Log)
	if err != nil {
		return err
	}
	defer nc.Close()
	var admin *Admin
	if err := SetUp(ctx, env.Log, env.Health, func(ctx context.Context) (err error) {
		admin, err = NewAdmin(ctx, js, env.Config.NATS.Replicas)
		return err
	}); err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	admin.SetSinks(env.Config.Sinks)
	admin.RequireTokens(tokens)
	if env.Mux != nil {
		admin.Register(env.Mux)
		// The web console (/console/) calls the API on the same mux, in process.
		console.New(env.Mux, env.Log).Register(env.Mux)
	}
	d, err := New(Config{Sinks: env.Config.Sinks, Replicas: env.Config.NATS.Replicas},
		js, WithLogger(env.Log), WithHealth(env.Health), WithMetrics(env.Metrics))
	if err != nil {
		return err
	}
	service.OnReload(ctx, env, func(c *config.Config) error {
		admin.SetSinks(c.Sinks)
		restart, err := d.Reload(c.Sinks)
		if len(restart) > 0 {
			env.Log.Warn("sink settings other than functions apply after a restart of delivery", "sinks", restart)
		}
		return err
	})
	return d.Run(ctx)
}
