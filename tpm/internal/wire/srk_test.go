package wire

import (
	"crypto/ecdh"
	"crypto/rand"
	"testing"

	"github.com/google/go-tpm/tpm2"
)

// TestCheckSRKPublic: only the SRK template with a point on the curve passes.
func TestCheckSRKPublic(t *testing.T) {
	k, err := ecdh.P256().GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	raw := k.PublicKey().Bytes() // 0x04 || X || Y
	withPoint := func(pub tpm2.TPMTPublic, x, y []byte) *tpm2.TPMTPublic {
		pub.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
			X: tpm2.TPM2BECCParameter{Buffer: x}, Y: tpm2.TPM2BECCParameter{Buffer: y}})
		return &pub
	}
	good := withPoint(SRKTemplate, raw[1:33], raw[33:])
	if err := CheckSRKPublic(good); err != nil {
		t.Fatalf("SRK template with a valid point: %v", err)
	}
	dup := SRKTemplate
	dup.ObjectAttributes.FixedTPM, dup.ObjectAttributes.FixedParent = false, false
	policy := SRKTemplate
	policy.AuthPolicy = tpm2.TPM2BDigest{Buffer: make([]byte, 32)}
	offCurve := append([]byte(nil), raw[33:]...)
	offCurve[31] ^= 1
	for name, pub := range map[string]*tpm2.TPMTPublic{
		"duplicable":       withPoint(dup, raw[1:33], raw[33:]),
		"authPolicy":       withPoint(policy, raw[1:33], raw[33:]),
		"point off curve":  withPoint(SRKTemplate, raw[1:33], offCurve),
		"RSA SRK template": &tpm2.RSASRKTemplate,
	} {
		if err := CheckSRKPublic(pub); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
