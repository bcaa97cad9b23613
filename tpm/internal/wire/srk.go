package wire

import (
	"bytes"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
)

// IsTemplate reports whether pub is tmpl with some public key: every field but
// unique equal, byte for byte.
func IsTemplate(pub *tpm2.TPMTPublic, tmpl tpm2.TPMTPublic) bool {
	cp := *pub
	cp.Unique = tmpl.Unique
	a, err1 := SafeMarshal(&cp)
	b, err2 := SafeMarshal(&tmpl)
	return err1 == nil && err2 == nil && bytes.Equal(a, b)
}

// CheckSRKPublic accepts only the public area TPM2_CreatePrimary makes from
// SRKTemplate: the TCG ECC P-256 SRK template (fixedTPM|fixedParent|
// sensitiveDataOrigin|userWithAuth|noDA|restricted|decrypt, empty authPolicy,
// AES-128-CFB) with a public point on the curve. A key of another shape in its place
// (an unrestricted key, one without fixedTPM, another curve) is not the SRK.
func CheckSRKPublic(pub *tpm2.TPMTPublic) error {
	if !IsTemplate(pub, SRKTemplate) {
		return errors.New("public area is not the TCG ECC P-256 SRK template")
	}
	ecc, err := pub.Parameters.ECCDetail()
	if err != nil {
		return err
	}
	pt, err := pub.Unique.ECC()
	if err != nil {
		return err
	}
	if _, err := tpm2.ECDHPub(ecc, pt); err != nil {
		return fmt.Errorf("public point: %w", err)
	}
	return nil
}
