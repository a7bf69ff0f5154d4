package pgrepl

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
)

// TestRedactKeepsTheCode: an error whose text holds the password (here
// it is also the user's name) loses the password but keeps what callers
// branch on: the server's SQLSTATE (capture ends its session on 57P03)
// and a context's end. Redacted to plain text, the code was lost and a
// backfill during a PostgreSQL shutdown held it up for ever again.
func TestRedactKeepsTheCode(t *testing.T) {
	c := Config{DSN: "postgres://postgres:postgres@127.0.0.1:5432/app"}
	pe := &pgconn.PgError{Severity: "FATAL", Code: "57P03", Message: "the database system is shutting down", Detail: "as postgres"}
	err := redact(fmt.Errorf("failed to connect to `user=postgres database=app`: %w", pe), c)
	if strings.Contains(err.Error(), "postgres") {
		t.Errorf("redacted error %q still holds the password", err)
	}
	var got *pgconn.PgError
	if !errors.As(err, &got) || got.Code != "57P03" {
		t.Fatalf("redacted error %q: SQLSTATE lost (%v)", err, got)
	}
	if strings.Contains(got.Error(), "postgres") || strings.Contains(got.Detail, "postgres") {
		t.Errorf("the server's error under it, %q (detail %q), still holds the password", got.Error(), got.Detail)
	}
	err = redact(fmt.Errorf("dial postgres: %w", context.DeadlineExceeded), c)
	if !errors.Is(err, context.DeadlineExceeded) || strings.Contains(err.Error(), "postgres") {
		t.Errorf("redacted %q: want no password and context.DeadlineExceeded", err)
	}
}
