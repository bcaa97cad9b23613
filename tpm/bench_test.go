package tpm

import (
	"testing"

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
	for b.Loop() {
		if _, err := k.Wrap(ctx, seed, aad); err != nil {
			b.Fatal(err)
		}
	}
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
	for b.Loop() {
		if _, err := k.Unwrap(ctx, body, aad); err != nil {
			b.Fatal(err)
		}
	}
}
