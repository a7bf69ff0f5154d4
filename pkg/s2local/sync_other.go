//go:build !linux

package s2local

import "os"

func fdatasync(f *os.File) error { return f.Sync() }
