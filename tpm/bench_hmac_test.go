package tpm

import (
	"testing"
	"time"

	"github.com/hwkms/hwkms/tpm/swtpm/swtpmtest"
)

// BenchmarkUnwrapHMAC is one raw Unwrap of a 32-byte seed by a KEK of kind hmac
// (one TPM2_HMAC, then AES-256-GCM in software) on swtpm: the raw device floor of
// the kind hmac rows of `make bench`.
func BenchmarkUnwrapHMAC(b *testing.B) {
	sim := swtpmtest.New(b)
	cfg := keyForms[1].cfg(b, sim)
	cfg.Kind = KindHMAC
	createKey(b, cfg)
	k := openKEK(b, sim, cfg)
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
