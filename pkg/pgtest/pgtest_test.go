package pgtest

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// As root the server runs as the postgres OS user, which must be able to
// enter every directory above the data directory.
func TestParentPermissions(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("only as root: the server then runs as the postgres OS user")
	}
	if _, err := FindBinDir(); err != nil {
		t.Skipf("skipping: %v", err)
	}
	private, err := os.MkdirTemp("", "pgs2-pgtest-private-") // mode 0700, owned by root
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(private)
	data := filepath.Join(private, "run", "pg", "data")

	_, err = Start(context.Background(), Options{DataDir: data})
	if err == nil || !strings.Contains(err.Error(), "cannot enter "+private) || !strings.Contains(err.Error(), "chmod o+x") {
		t.Fatalf("Start in a private directory: %v, want an error naming %s and the fix", err, private)
	}

	in, err := Start(context.Background(), Options{DataDir: data, FixParentPerms: true})
	if err != nil {
		t.Fatalf("Start with FixParentPerms: %v", err)
	}
	defer in.Close()
	fi, err := os.Stat(private)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o701 {
		t.Errorf("%s has mode %04o, want 0701 (search for others added, nothing else)", private, fi.Mode().Perm())
	}
	// The kept data directory is reused: a second start skips initdb.
	if err := in.Stop(); err != nil {
		t.Fatal(err)
	}
	in2, err := Start(context.Background(), Options{DataDir: data, FixParentPerms: true})
	if err != nil {
		t.Fatalf("restart on the kept data directory: %v", err)
	}
	in2.Close()
}
