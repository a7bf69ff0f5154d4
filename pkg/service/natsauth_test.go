package service

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/pgs2/pgs2/pkg/config"
)

// TestSecuredNATS: against a nats-server that requires TLS with client
// certificates and a password (certificates made here), a service
// connects with the config's TLS settings and PGS2_NATS_PASSWORD, and uses
// JetStream; a wrong password, a missing client certificate or an unknown
// CA are refused, and no error or log line holds the password.
func TestSecuredNATS(t *testing.T) {
	dir := t.TempDir()
	ca, caKey := newCert(t, nil, nil, "pgs2 test CA", true)
	srv, srvKey := newCert(t, ca, caKey, "nats.test", false)
	cli, cliKey := newCert(t, ca, caKey, "pgs2-client", false)
	other, _ := newCert(t, nil, nil, "another CA", true)
	write := func(name string, blocks ...*pem.Block) string {
		var b bytes.Buffer
		for _, bl := range blocks {
			_ = pem.Encode(&b, bl)
		}
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b.Bytes(), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	caFile := write("ca.pem", certBlock(ca))
	otherCA := write("other.pem", certBlock(other))
	cliCert, cliKeyFile := write("client.pem", certBlock(cli)), write("client.key", keyBlock(t, cliKey))

	pool := x509.NewCertPool()
	pool.AddCert(ca)
	const password = "n4ts-s3cret-pw"
	opts := &server.Options{Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: t.TempDir(), NoSigs: true, NoLog: true,
		Username: "pgs2", Password: password, TLS: true, TLSVerify: true,
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{srv.Raw}, PrivateKey: srvKey}},
			ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS12}}
	ns, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	go ns.Start()
	defer ns.Shutdown()
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server not ready")
	}
	url := "tls://" + ns.Addr().String()
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	good := config.NATS{User: "pgs2", Password: password, TLS: config.NATSTLS{CAFile: caFile, CertFile: cliCert, KeyFile: cliKeyFile, ServerName: "nats.test"}}
	ctx := context.Background()
	nc, js, err := ConnectJetStream(ctx, url, good, "test", log)
	if err != nil {
		t.Fatalf("secured connect: %v", err)
	}
	if _, err := js.AccountInfo(ctx); err != nil {
		t.Fatalf("JetStream over TLS: %v", err)
	}
	nc.Close()

	wrongPW := good
	wrongPW.Password = "not-" + password
	noCert := good
	noCert.TLS.CertFile, noCert.TLS.KeyFile = "", ""
	unknownCA := good
	unknownCA.TLS.CAFile = otherCA
	for name, c := range map[string]config.NATS{"wrong password": wrongPW, "no client certificate": noCert, "unknown CA": unknownCA} {
		nc, _, err := ConnectJetStream(ctx, url, c, "test", log)
		if err == nil {
			nc.Close()
			t.Errorf("%s: connected", name)
			continue
		}
		if strings.Contains(err.Error(), password) {
			t.Errorf("%s: the error holds the password: %v", name, err)
		}
	}
	if strings.Contains(logs.String(), password) {
		t.Errorf("a log line holds the password:\n%s", logs.String())
	}
}

func newCert(t *testing.T, parent *x509.Certificate, parentKey *ecdsa.PrivateKey, cn string, isCA bool) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{SerialNumber: serial, Subject: pkix.Name{CommonName: cn}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}, BasicConstraintsValid: true, IsCA: isCA}
	if !isCA {
		tmpl.DNSNames, tmpl.IPAddresses = []string{cn}, []net.IP{net.ParseIP("127.0.0.1")}
	}
	if parent == nil {
		parent, parentKey = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c, key
}

func certBlock(c *x509.Certificate) *pem.Block { return &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw} }

func keyBlock(t *testing.T, k *ecdsa.PrivateKey) *pem.Block {
	der, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return &pem.Block{Type: "EC PRIVATE KEY", Bytes: der}
}
