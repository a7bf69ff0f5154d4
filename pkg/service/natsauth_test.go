package service

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"testing"

	"github.com/pgs2/pgs2/pkg/config"
	"github.com/pgs2/pgs2/pkg/natstest"
	"github.com/pgs2/pgs2/pkg/tlstest"
)

// TestSecuredNATS: against a nats-server that requires TLS with client
// certificates and a password (certificates made here), a service
// connects with the config's TLS settings and PGS2_NATS_PASSWORD, and uses
// JetStream; a wrong password, a missing client certificate or an unknown
// CA are refused, and no error or log line holds the password.
func TestSecuredNATS(t *testing.T) {
	dir := t.TempDir()
	ca := tlstest.NewCA(t, "pgs2 test CA")
	cli := ca.Issue(t, "pgs2-client")
	caFile := ca.WriteCert(t, dir, "ca.pem")
	otherCA := tlstest.NewCA(t, "another CA").WriteCert(t, dir, "other.pem")
	cliCert, cliKeyFile := cli.WriteCert(t, dir, "client.pem"), cli.WriteKey(t, dir, "client.key")

	const password = "n4ts-s3cret-pw"
	ns := natstest.NewMutualTLS(t, ca, "nats.test", "pgs2", password)
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
