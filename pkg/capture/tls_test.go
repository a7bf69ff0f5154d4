package capture_test

import (
	"context"
	"fmt"
	"os"
	"os/user"
	"strconv"
	"strings"
	"testing"

	"github.com/pgs2/pgs2/pkg/pgrepl"
	"github.com/pgs2/pgs2/pkg/pgtest"
	"github.com/pgs2/pgs2/pkg/tlstest"
)

// TestPostgresTLS: capture's connections to the source (catalog and
// replication) work through sslmode=verify-full against a server with
// ssl=on and a certificate of a test CA, and are refused when the server's
// certificate does not chain to the CA given.
func TestPostgresTLS(t *testing.T) {
	dir, err := os.MkdirTemp("", "pgs2-tls-") // the server (another user when root) reads its key here
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	ca := tlstest.NewCA(t, "pgs2 test CA")
	srv := ca.Issue(t, "localhost")
	certFile, keyFile := srv.WriteCert(t, dir, "server.crt"), srv.WriteKey(t, dir, "server.key")
	caFile := ca.WriteCert(t, dir, "ca.pem")
	otherCA := tlstest.NewCA(t, "another CA").WriteCert(t, dir, "other.pem")
	if os.Getuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			t.Fatal(err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		for _, p := range []string{dir, certFile, keyFile} {
			if err := os.Chown(p, uid, gid); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	pg := pgtest.New(t, pgtest.WithSettings(map[string]string{"ssl": "on", "ssl_cert_file": certFile, "ssl_key_file": keyFile}))
	pg.MustExec(t, "postgres", "CREATE DATABASE app")
	pg.MustExec(t, "app", "CREATE TABLE users (id int PRIMARY KEY)")
	dsn := func(root string) string {
		return fmt.Sprintf("postgres://postgres@localhost:%d/app?sslmode=verify-full&sslrootcert=%s", pg.Port, root)
	}
	ctx := context.Background()
	cfg := pgrepl.Config{DSN: dsn(caFile), Slot: "pgs2", Publication: "pgs2", Tables: []string{"public.users"}}
	if _, err := pgrepl.Prepare(ctx, cfg); err != nil {
		t.Fatalf("prepare over verify-full TLS: %v", err)
	}
	conn, err := pgrepl.Connect(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	var ssl bool
	if err := conn.QueryRow(ctx, `SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()`).Scan(&ssl); err != nil || !ssl {
		t.Fatalf("the catalog connection is not TLS: %v %v", ssl, err)
	}
	conn.Close(ctx)
	repl, err := pgrepl.ConnectReplication(ctx, cfg)
	if err != nil {
		t.Fatalf("replication connection over TLS: %v", err)
	}
	repl.Close(ctx)

	cfg.DSN = dsn(otherCA)
	if _, err := pgrepl.Prepare(ctx, cfg); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("a server certificate of another CA: %v", err)
	}
}
