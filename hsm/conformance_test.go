package hsm

import (
	"context"
	"testing"

	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/plugin/kek/kektest"
)

// TestConformance runs the kek.KEK conformance suite on hsm.KEK over SoftHSM2: once
// with the default session pool and once with a single session, where every failed
// Unwrap (each tampered, truncated or foreign body, each wrong aad) reuses the one
// session, so a failed decrypt that left the session unusable fails the next check.
func TestConformance(t *testing.T) {
	for _, tc := range []struct {
		name     string
		sessions int
	}{
		{"default pool", 0},
		{"one session", 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fx, toks := newTokens(t, 1)
			opener := func(label string) func(t *testing.T) kek.KEK {
				cfg := cfgFor(fx, toks[0], label)
				cfg.Sessions = tc.sessions
				createKey(t, cfg)
				return func(t *testing.T) kek.KEK {
					t.Helper()
					k, err := Open(context.Background(), cfg)
					if err != nil {
						t.Fatalf("Open %q: %v", label, err)
					}
					return k
				}
			}
			kektest.Run(t, opener("kek"), kektest.WithOther(opener("other")))
		})
	}
}
