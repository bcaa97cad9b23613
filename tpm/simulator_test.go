package tpm

import (
	"testing"

	"github.com/google/go-tpm-tools/simulator"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// TestSimulatorAnswers checks that the in-process simulator (test code only: it is cgo
// over OpenSSL and never linked into bin/hwkms) starts and answers TPM2_GetRandom.
func TestSimulatorAnswers(t *testing.T) {
	sim, err := simulator.GetWithFixedSeedInsecure(1)
	if err != nil {
		t.Fatalf("simulator: %v", err)
	}
	t.Cleanup(func() { _ = sim.Close() })
	rsp, err := tpm2.GetRandom{BytesRequested: 16}.Execute(transport.FromReadWriter(sim))
	if err != nil {
		t.Fatalf("GetRandom: %v", err)
	}
	if len(rsp.RandomBytes.Buffer) != 16 {
		t.Fatalf("GetRandom returned %d bytes, want 16", len(rsp.RandomBytes.Buffer))
	}
}
