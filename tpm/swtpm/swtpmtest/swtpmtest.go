// Package swtpmtest starts a swtpm per test for packages that test against a real
// (software) TPM.
package swtpmtest

import (
	"context"
	"errors"
	"os"
	"testing"
	"time"

	"github.com/hwkms/hwkms/tpm/swtpm"
)

// New starts a swtpm on a unix socket with its state in t.TempDir() and stops it in
// t.Cleanup. When swtpm is not installed the test is skipped, unless the CI
// environment variable is set, in which case it fails.
func New(t testing.TB) *swtpm.Sim {
	t.Helper()
	return NewWith(t, swtpm.Options{})
}

// NewTCP is New with swtpm serving on a free loopback TCP port.
func NewTCP(t testing.TB) *swtpm.Sim {
	t.Helper()
	return NewWith(t, swtpm.Options{TCP: true})
}

// NewWith is New with options.
func NewWith(t testing.TB, opts swtpm.Options) *swtpm.Sim {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	sim, err := swtpm.StartWith(ctx, t.TempDir(), opts)
	if errors.Is(err, swtpm.ErrNotInstalled) && os.Getenv("CI") == "" {
		t.Skipf("skipping: %v; CI is unset", err)
	}
	if err != nil {
		t.Fatalf("start swtpm: %v", err)
	}
	t.Cleanup(func() {
		if err := sim.Close(); err != nil {
			t.Errorf("stop swtpm: %v", err)
		}
	})
	return sim
}
