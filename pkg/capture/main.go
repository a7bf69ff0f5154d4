package capture

import (
	"context"
	"errors"

	"github.com/pgs2/pgs2/pkg/backfill"
	"github.com/pgs2/pgs2/pkg/bus"
	"github.com/pgs2/pgs2/pkg/config"
	"github.com/pgs2/pgs2/pkg/pgrepl"
	"github.com/pgs2/pgs2/pkg/service"
	"github.com/pgs2/pgs2/pkg/telemetry"
)

// FromConfig derives a capture's settings from the config file.
func FromConfig(c *config.Config) (Config, error) {
	groups, err := c.GroupColumns()
	if err != nil {
		return Config{}, err
	}
	return Config{
		Source: c.Source.Name,
		Repl: pgrepl.Config{
			DSN: c.Source.DSN, Password: c.Source.Password, Slot: c.Source.Slot,
			Publication: c.Source.Publication, Tables: c.Source.Tables, GroupColumns: groups,
		},
		Stream: bus.ChangesStreamConfig{
			Name: c.NATS.ChangesStream, Source: c.Source.Name, Replicas: c.NATS.Replicas,
			DuplicateWindow: c.NATS.DuplicateWindow.D(), MaxAge: c.NATS.ChangesMaxAge.D(),
		},
		Partitions: c.NATS.Partitions,
		Backfill:   backfillConfig(c),
	}, nil
}

// backfillConfig derives the backfill defaults, each sink's tables and the
// sinks' initial backfills.
func backfillConfig(c *config.Config) BackfillConfig {
	b := BackfillConfig{
		ChunkSize: c.Source.Backfill.ChunkSize, StatementTimeout: c.Source.Backfill.StatementTimeout.D(),
		MaxRowsPerSecond: c.Source.Backfill.MaxRowsPerSecond, SinkTables: map[string][]string{},
	}
	for _, sk := range c.Sinks {
		b.SinkTables[sk.Name] = sk.Tables
		ib := sk.InitialBackfill
		if ib == nil || !ib.All && len(ib.Tables) == 0 {
			continue
		}
		j := backfill.Job{ID: InitialBackfillID(sk.Name), Sink: sk.Name, By: "config: initial_backfill"}
		for _, t := range ib.Tables {
			j.Tables = append(j.Tables, backfill.TableSpec{Table: t.Table, Where: t.Where})
		}
		b.Initial = append(b.Initial, j)
	}
	return b
}

// InitialBackfillID names the job of a sink's initial_backfill.
func InitialBackfillID(sink string) string { return "initial-" + sink }

// Main is the capture service: connect to JetStream (or host it embedded)
// and run until ctx ends.
func Main(ctx context.Context, env service.Env) error {
	cfg, err := FromConfig(env.Config)
	if err != nil {
		return err
	}
	stopTracing, err := telemetry.Setup(ctx, telemetry.Config{Service: "capture", OTLPEndpoint: env.Config.Telemetry.OTLPEndpoint})
	if err != nil {
		return err
	}
	defer func() { _ = stopTracing(context.WithoutCancel(ctx)) }()
	url := env.Config.NATS.URL
	if env.Config.NATS.Embedded {
		srv, err := bus.StartEmbedded(bus.EmbeddedConfig{StoreDir: env.Config.NATS.StoreDir, Port: embeddedPort(url),
			SyncInterval: env.Config.NATS.SyncInterval.D()})
		if err != nil {
			return err
		}
		defer func() { srv.Shutdown(); srv.WaitForShutdown() }()
		url = srv.ClientURL()
		env.Log.Info("embedded JetStream started", "url", url)
	}
	nc, js, err := service.ConnectJetStream(ctx, url, env.Config.NATS, "pgs2-capture", env.Log)
	if err != nil {
		return err
	}
	defer nc.Close()
	c := New(cfg, js, WithLogger(env.Log), WithHealth(env.Health), WithMetrics(env.Metrics))
	service.OnReload(ctx, env, func(conf *config.Config) error {
		cfg, err := FromConfig(conf)
		if err != nil {
			return service.Refuse(err)
		}
		err = c.Reload(ctx, cfg)
		if errors.Is(err, pgrepl.ErrSetup) {
			return service.Refuse(err) // a table that cannot be captured
		}
		return err // the database unavailable: retried
	})
	return c.Run(ctx)
}
