package wire

import (
	"testing"

	"github.com/google/go-tpm/tpm2"
)

func TestCheckHMACKEKPublic(t *testing.T) {
	good := func() tpm2.TPMTPublic {
		p := HMACKEKTemplate()
		p.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BDigest{Buffer: make([]byte, 32)})
		return p
	}
	scheme := func(alg, hash tpm2.TPMAlgID) tpm2.TPMUPublicParms {
		s := tpm2.TPMTKeyedHashScheme{Scheme: alg}
		if alg == tpm2.TPMAlgHMAC {
			s.Details = tpm2.NewTPMUSchemeKeyedHash(tpm2.TPMAlgHMAC, &tpm2.TPMSSchemeHMAC{HashAlg: hash})
		}
		return tpm2.NewTPMUPublicParms(tpm2.TPMAlgKeyedHash, &tpm2.TPMSKeyedHashParms{Scheme: s})
	}
	cases := []struct {
		name   string
		mutate func(*tpm2.TPMTPublic)
		ok     bool
	}{
		{"template", func(*tpm2.TPMTPublic) {}, true},
		{"decrypt too", func(p *tpm2.TPMTPublic) { p.ObjectAttributes.Decrypt = true }, false},
		{"duplicable", func(p *tpm2.TPMTPublic) { p.ObjectAttributes.FixedParent = false }, false},
		{"not fixedTPM", func(p *tpm2.TPMTPublic) { p.ObjectAttributes.FixedTPM = false }, false},
		{"with a policy", func(p *tpm2.TPMTPublic) { p.AuthPolicy = tpm2.TPM2BDigest{Buffer: make([]byte, 32)} }, false},
		{"NULL scheme", func(p *tpm2.TPMTPublic) { p.Parameters = scheme(tpm2.TPMAlgNull, 0) }, false},
		{"HMAC-SHA-1", func(p *tpm2.TPMTPublic) { p.Parameters = scheme(tpm2.TPMAlgHMAC, tpm2.TPMAlgSHA1) }, false},
		{"nameAlg SHA-1", func(p *tpm2.TPMTPublic) { p.NameAlg = tpm2.TPMAlgSHA1 }, false},
		{"short unique", func(p *tpm2.TPMTPublic) {
			p.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BDigest{Buffer: make([]byte, 20)})
		}, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := good()
			c.mutate(&p)
			err := CheckHMACKEKPublic(&p)
			if (err == nil) != c.ok {
				t.Fatalf("CheckHMACKEKPublic = %v, want ok=%v", err, c.ok)
			}
			if any := CheckAnyKEKPublic(&p); (any == nil) != c.ok {
				t.Fatalf("CheckAnyKEKPublic = %v, want ok=%v", any, c.ok)
			}
		})
	}
	ecc := KEKTemplate()
	if IsHMACKEK(&ecc) {
		t.Fatal("the sealed kind's KEK template counts as kind hmac")
	}
	if err := CheckHMACKEKPublic(&ecc); err == nil {
		t.Fatal("CheckHMACKEKPublic accepts an ECC KEK")
	}
}
