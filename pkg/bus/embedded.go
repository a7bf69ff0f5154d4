package bus

import (
	"fmt"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// EmbeddedConfig configures an in-process JetStream server.
type EmbeddedConfig struct {
	// StoreDir holds JetStream's file store. Required.
	StoreDir string
	// Host and Port to listen on; Port -1 picks a free port, 0 means 4222.
	Host string
	Port int
	// SyncInterval is how often the file store fsyncs; 0 = the server's default (2 min).
	// See the README: a PubAck is not an fsync.
	SyncInterval time.Duration
}

// StartEmbedded starts a JetStream-enabled NATS server in this process and
// waits until it accepts connections.
func StartEmbedded(cfg EmbeddedConfig) (*server.Server, error) {
	if cfg.StoreDir == "" {
		return nil, fmt.Errorf("embedded nats: store_dir is required")
	}
	host := cfg.Host
	if host == "" {
		host = "127.0.0.1"
	}
	opts := &server.Options{
		ServerName:   "pgs2-embedded",
		Host:         host,
		Port:         cfg.Port,
		JetStream:    true,
		StoreDir:     cfg.StoreDir,
		SyncInterval: cfg.SyncInterval,
		NoSigs:       true,
		NoLog:        true,
		MaxPayload:   8 << 20,
	}
	s, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("embedded nats: %w", err)
	}
	go s.Start()
	if !s.ReadyForConnections(30 * time.Second) {
		s.Shutdown()
		return nil, fmt.Errorf("embedded nats: not ready after 30s on %s:%d", host, cfg.Port)
	}
	return s, nil
}
