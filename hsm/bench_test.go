package hsm

import (
	"context"
	"slices"
	"testing"
	"time"
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
	lat := make([]time.Duration, 0, b.N)
	for b.Loop() {
		t0 := time.Now()
		if _, err := k.Wrap(ctx, seed, aad); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(t0))
	}
	reportPercentiles(b, lat)
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
	lat := make([]time.Duration, 0, b.N)
	for b.Loop() {
		t0 := time.Now()
		if _, err := k.Unwrap(ctx, body, aad); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(t0))
	}
	reportPercentiles(b, lat)
}

// reportPercentiles adds p50-ns and p99-ns to the benchmark's output: `make bench`
// compares medians and tails, which ns/op (a mean) hides.
func reportPercentiles(b *testing.B, lat []time.Duration) {
	b.Helper()
	if len(lat) == 0 {
		return
	}
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2]), "p50-ns")
	b.ReportMetric(float64(lat[min(len(lat)-1, len(lat)*99/100)]), "p99-ns")
}
