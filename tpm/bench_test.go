package tpm

import (
	"slices"
	"testing"
	"time"

	"github.com/hwkms/hwkms/tpm/swtpm/swtpmtest"
)

func benchKEK(b *testing.B) *KEK {
	b.Helper()
	sim := swtpmtest.New(b)
	cfg := keyForms[1].cfg(b, sim) // blob form, as in `hwkms dev`
	createKey(b, cfg)
	return openKEK(b, sim, cfg)
}

// BenchmarkSeal is one raw KEK Wrap of a 32-byte seed (TPM2_Create of a sealed
// object with a reused salted session) on swtpm.
func BenchmarkSeal(b *testing.B) {
	k := benchKEK(b)
	ctx := testCtx(b)
	seed := make([]byte, 32)
	aad := []byte("aad")
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

// BenchmarkUnseal is one raw KEK Unwrap of a 32-byte seed (TPM2_Load, TPM2_Unseal,
// TPM2_FlushContext) on swtpm.
func BenchmarkUnseal(b *testing.B) {
	k := benchKEK(b)
	ctx := testCtx(b)
	aad := []byte("aad")
	body, err := k.Wrap(ctx, make([]byte, 32), aad)
	if err != nil {
		b.Fatal(err)
	}
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

// BenchmarkUnsealSwitch is BenchmarkUnseal alternating between two KEKs on one swtpm,
// which share its one connection (line.go): every call evicts the other KEK (flush
// its transient KEK and sessions) and loads its own (TPM2_Load under the SRK, two
// salted sessions) before the unseal. The difference from BenchmarkUnseal is the
// cost of a switch.
func BenchmarkUnsealSwitch(b *testing.B) {
	sim := swtpmtest.New(b)
	ctx := testCtx(b)
	aad := []byte("aad")
	var cfgs [2]Config
	for i := range cfgs {
		cfgs[i] = keyForms[1].cfg(b, sim)
		createKey(b, cfgs[i]) // before any Open: swtpm takes one connection at a time
	}
	var keks [2]*KEK
	var bodies [2][]byte
	for i, cfg := range cfgs {
		k, err := Open(ctx, cfg)
		if err != nil {
			b.Fatal(err)
		}
		defer k.Close()
		if bodies[i], err = k.Wrap(ctx, make([]byte, 32), aad); err != nil {
			b.Fatal(err)
		}
		keks[i] = k
	}
	lat := make([]time.Duration, 0, b.N)
	i := 0
	for b.Loop() {
		i ^= 1
		t0 := time.Now()
		if _, err := keks[i].Unwrap(ctx, bodies[i], aad); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(t0))
	}
	reportPercentiles(b, lat)
}
