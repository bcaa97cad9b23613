package hsm

import (
	"context"
	"testing"
	"time"
)

// mechBenchCases are the mechanisms BenchmarkMechanism measures, each on a fresh
// SoftHSM2 token. SoftHSM2 encrypts GCM with an all-zero IV when asked to generate
// one (doc.go), so aes-gcm-token-iv runs on the CloudHSM emulation of the p11 seam
// over SoftHSM2 (the IV written back into the parameters), which adds a reflection
// step per call that a real CloudHSM does not have.
var mechBenchCases = []struct {
	name string
	iv   ivEmulation
}{
	{MechanismAESGCM, 0},
	{MechanismAESGCMTokenIV, ivAsCloudHSM},
	{MechanismAESCBCHMAC, 0},
	{MechanismRSAOAEP, 0},
}

// mechBenchKEK opens a KEK with mechanism name (and the token-IV emulation iv) on a
// fresh SoftHSM2 token, with one session.
func mechBenchKEK(b *testing.B, name string, iv ivEmulation) *KEK {
	b.Helper()
	fx, toks := newTokens(b, 1)
	if iv != 0 {
		m := newMechTok()
		m.iv = iv
		seam(b, func(p p11) p11 { m.p11 = p; return m })
	}
	cfg := cfgFor(fx, toks[0], "bench-"+name)
	cfg.Mechanism = name
	cfg.Sessions = 1
	createKey(b, cfg)
	k := openKEK(b, cfg)
	if got := k.Mechanism(); got != name {
		b.Fatalf("Open chose %s, want %s", got, name)
	}
	return k
}

// BenchmarkMechanism measures KEK.Wrap and KEK.Unwrap of a 32-byte seed with each
// mechanism on SoftHSM2: BenchmarkMechanism/<mechanism>/wrap and .../unwrap, with the
// p50-ns and p99-ns metrics of BenchmarkWrap (`make bench` reads them).
func BenchmarkMechanism(b *testing.B) {
	ctx := context.Background()
	seed := make([]byte, 32)
	for _, mc := range mechBenchCases {
		b.Run(mc.name, func(b *testing.B) {
			k := mechBenchKEK(b, mc.name, mc.iv)
			b.Run("wrap", func(b *testing.B) {
				b.ReportAllocs()
				lat := make([]time.Duration, 0, 1024)
				for b.Loop() {
					t0 := time.Now()
					if _, err := k.Wrap(ctx, seed, aad); err != nil {
						b.Fatal(err)
					}
					lat = append(lat, time.Since(t0))
				}
				reportPercentiles(b, lat)
			})
			body, err := k.Wrap(ctx, seed, aad)
			if err != nil {
				b.Fatal(err)
			}
			b.Run("unwrap", func(b *testing.B) {
				b.ReportAllocs()
				lat := make([]time.Duration, 0, 1024)
				for b.Loop() {
					t0 := time.Now()
					if _, err := k.Unwrap(ctx, body, aad); err != nil {
						b.Fatal(err)
					}
					lat = append(lat, time.Since(t0))
				}
				reportPercentiles(b, lat)
			})
		})
	}
}
