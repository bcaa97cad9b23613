package hsm

import (
	"context"
	"testing"
)

// benchKEK opens a KEK on a fresh SoftHSM2 token with one session, as a raw baseline
// (no gRPC, no plugin framing) for the plugin's benchmarks.
func benchKEK(b *testing.B) *KEK {
	b.Helper()
	fx, toks := newTokens(b, 1)
	cfg := cfgFor(fx, toks[0], "bench")
	createKey(b, cfg)
	return openKEK(b, cfg)
}

// BenchmarkWrap measures KEK.Wrap of a 32-byte seed (CKM_AES_GCM on the token).
func BenchmarkWrap(b *testing.B) {
	k := benchKEK(b)
	ctx := context.Background()
	seed := make([]byte, 32)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := k.Wrap(ctx, seed, aad); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkUnwrap measures KEK.Unwrap of a body holding a 32-byte seed.
func BenchmarkUnwrap(b *testing.B) {
	k := benchKEK(b)
	ctx := context.Background()
	body, err := k.Wrap(ctx, make([]byte, 32), aad)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := k.Unwrap(ctx, body, aad); err != nil {
			b.Fatal(err)
		}
	}
}
