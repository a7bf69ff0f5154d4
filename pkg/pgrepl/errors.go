package pgrepl

import (
	"errors"
	"fmt"
)

// ErrSetup marks a source that cannot be captured correctly as configured;
// the message says what to fix. Retrying does not help.
var ErrSetup = errors.New("source not ready for capture")

// SetupError is a problem with the database, with the SQL that fixes it.
type SetupError struct {
	Problem string
	Fix     string
}

func (e *SetupError) Error() string {
	if e.Fix == "" {
		return e.Problem
	}
	return e.Problem + "; fix: " + e.Fix
}

// Is makes errors.Is(err, ErrSetup) true.
func (e *SetupError) Is(target error) bool { return target == ErrSetup }

func setupErr(fix, format string, a ...any) error {
	return &SetupError{Problem: fmt.Sprintf(format, a...), Fix: fix}
}
