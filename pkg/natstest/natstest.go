// Package natstest runs embedded JetStream servers for tests.
package natstest

import (
	"crypto/tls"
	"crypto/x509"
	"net"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/pgs2/pgs2/pkg/tlstest"

	"github.com/pgs2/pgs2/pkg/bus"
)

// Server is an embedded JetStream server that a test can restart on the same
// port and store.
type Server struct {
	*server.Server
	storeDir string
	port     int
}

// New starts an embedded JetStream server with a temporary file store,
// shut down and removed at cleanup.
func New(t testing.TB) *Server {
	t.Helper()
	dir, err := os.MkdirTemp("", "pgs2-nats-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	s := &Server{storeDir: dir, port: -1}
	s.start(t)
	_, port, _ := net.SplitHostPort(s.Addr().String())
	s.port, _ = strconv.Atoi(port)
	t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() })
	return s
}

func (s *Server) start(t testing.TB) {
	t.Helper()
	srv, err := bus.StartEmbedded(bus.EmbeddedConfig{StoreDir: s.storeDir, Port: s.port})
	if err != nil {
		t.Fatal(err)
	}
	s.Server = srv
}

// URL is the client URL.
func (s *Server) URL() string { return "nats://127.0.0.1:" + strconv.Itoa(s.port) }

// Restart shuts the server down and starts it again on the same port and store.
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	s.Shutdown()
	s.WaitForShutdown()
	s.start(t)
}

// Connect connects to the server for the test (no reconnect buffer, so
// publishes fail while it is down; reconnecting for ever), closed at
// cleanup.
func (s *Server) Connect(t testing.TB) (*nats.Conn, jetstream.JetStream) {
	t.Helper()
	return connect(t, s.URL())
}

// connect connects to urls without a reconnect buffer, reconnecting for
// ever, closed at cleanup.
func connect(t testing.TB, urls string, opts ...nats.Option) (*nats.Conn, jetstream.JetStream) {
	t.Helper()
	nc, err := nats.Connect(urls, append([]nats.Option{nats.ReconnectBufSize(-1), nats.MaxReconnects(-1)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return nc, js
}

// NewSecured starts an embedded JetStream server with opts' security
// settings (users, TLS) on a free loopback port and a temporary store,
// shut down at cleanup.
func NewSecured(t testing.TB, opts server.Options) *server.Server {
	t.Helper()
	opts.Host, opts.Port, opts.JetStream, opts.StoreDir, opts.NoSigs, opts.NoLog = "127.0.0.1", -1, true, t.TempDir(), true, true
	ns, err := server.NewServer(&opts)
	if err != nil {
		t.Fatal(err)
	}
	go ns.Start()
	t.Cleanup(ns.Shutdown)
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server not ready")
	}
	return ns
}

// NewMutualTLS starts NewSecured with user and password, and TLS with a
// server certificate for serverName issued by ca, requiring client
// certificates that ca issued.
func NewMutualTLS(t testing.TB, ca *tlstest.Cert, serverName, user, password string) *server.Server {
	t.Helper()
	srv := ca.Issue(t, serverName)
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	return NewSecured(t, server.Options{Username: user, Password: password, TLS: true, TLSVerify: true,
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{srv.Cert.Raw}, PrivateKey: srv.Key}},
			ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS12}})
}
