// Package tlstest makes certificates for tests: a CA and the certificates
// it signs, written as PEM files.
package tlstest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// Cert is a certificate and its key.
type Cert struct {
	Cert *x509.Certificate
	Key  *ecdsa.PrivateKey
}

// NewCA makes a self-signed CA.
func NewCA(t testing.TB, name string) *Cert { return issue(t, nil, name, true) }

// Issue makes a certificate for name (its DNS name, and 127.0.0.1) that
// ca signs, good for servers and clients.
func (ca *Cert) Issue(t testing.TB, name string) *Cert { return issue(t, ca, name, false) }

func issue(t testing.TB, ca *Cert, name string, isCA bool) *Cert {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{SerialNumber: serial, Subject: pkix.Name{CommonName: name}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(24 * time.Hour), KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}, BasicConstraintsValid: true, IsCA: isCA}
	if !isCA {
		tmpl.DNSNames, tmpl.IPAddresses = []string{name}, []net.IP{net.ParseIP("127.0.0.1")}
	}
	parent, parentKey := tmpl, key
	if ca != nil {
		parent, parentKey = ca.Cert, ca.Key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &Cert{Cert: c, Key: key}
}

// WriteCert writes the certificate as PEM to dir/name and returns its path.
func (c *Cert) WriteCert(t testing.TB, dir, name string) string {
	t.Helper()
	return write(t, filepath.Join(dir, name), &pem.Block{Type: "CERTIFICATE", Bytes: c.Cert.Raw})
}

// WriteKey writes the key as PEM to dir/name (mode 0600) and returns its path.
func (c *Cert) WriteKey(t testing.TB, dir, name string) string {
	t.Helper()
	der, err := x509.MarshalECPrivateKey(c.Key)
	if err != nil {
		t.Fatal(err)
	}
	return write(t, filepath.Join(dir, name), &pem.Block{Type: "EC PRIVATE KEY", Bytes: der})
}

func write(t testing.TB, path string, b *pem.Block) string {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(b), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}
