package wire

import (
	"bytes"
	"crypto/sha256"
	"errors"

	"github.com/google/go-tpm/tpm2"
)

// AES128CFB is the symmetric algorithm of the SRK and the KEK (storage keys): how
// they protect their children.
var AES128CFB = tpm2.TPMTSymDefObject{
	Algorithm: tpm2.TPMAlgAES,
	KeyBits:   tpm2.NewTPMUSymKeyBits(tpm2.TPMAlgAES, tpm2.TPMKeyBits(128)),
	Mode:      tpm2.NewTPMUSymMode(tpm2.TPMAlgAES, tpm2.TPMAlgCFB),
}

// SRKTemplate is the TCG ECC P-256 SRK template (TCG TPM v2.0 Provisioning
// Guidance, section 7.5.1). With its all-zero unique field, CreatePrimary derives the
// same key from the owner seed every time, so a KEK blob can be reloaded after any
// restart until the owner hierarchy is cleared.
var SRKTemplate = tpm2.ECCSRKTemplate

// KEKAttributes is a storage key (restricted decrypt) that can never leave its TPM:
// the KEK CreateKey makes. Every bit is listed; anything else is refused on load.
var KEKAttributes = tpm2.TPMAObject{
	FixedTPM:            true,
	FixedParent:         true,
	SensitiveDataOrigin: true,
	UserWithAuth:        true,
	AdminWithPolicy:     false,
	NoDA:                true,
	Restricted:          true,
	Decrypt:             true,
	SignEncrypt:         false,
}

// KEKTemplate is the KEK: ECC NIST P-256 restricted decrypt, AES-128-CFB, nameAlg
// SHA-256 (package tpm's doc says why ECC and why noDA).
func KEKTemplate() tpm2.TPMTPublic {
	return tpm2.TPMTPublic{
		Type:             tpm2.TPMAlgECC,
		NameAlg:          tpm2.TPMAlgSHA256,
		ObjectAttributes: KEKAttributes,
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: AES128CFB,
			Scheme:    tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull},
			CurveID:   tpm2.TPMECCNistP256,
			KDF:       tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{}),
	}
}

// NoDuplicationLabel is 32 bytes: shorter than any policy hash input.
const NoDuplicationLabel = "hwkms: no policy satisfies this\x00"

// noDuplicationPolicy is the authPolicy of every imported KEK: SHA-256 of a
// 32-byte string. A policy session's digest is only ever SHA-256 of at least 36
// bytes (the previous 32-byte digest or zeros, then a 4-byte command code, then
// the command's arguments), so reaching this value needs a SHA-256 second
// preimage: no policy session can satisfy it. TPM2_Duplicate authorises its
// object in the DUP role, which only a policy session can take (Part 1 section
// 19.7.3), so the imported KEK can never be duplicated again; userWithAuth lets
// its auth value authorise the USER role (Create, Load under it), and
// adminWithPolicy is clear so the ADMIN role also takes the auth value.
var noDuplicationPolicy = func() []byte {
	d := sha256.Sum256([]byte(NoDuplicationLabel))
	return d[:]
}()

// ImportedKEKAttributes is the attribute set of an imported KEK. fixedTPM must be
// clear for any object made outside the TPM (TPM2_Import refuses it), and under a
// fixedTPM parent such as the SRK the TPM requires fixedParent == fixedTPM (Part 1
// section 27.2.3.4, PublicAttributesValidation), so fixedParent is clear too:
// non-duplicability comes from the no-duplication policy instead.
// sensitiveDataOrigin is clear because the TPM did not generate the key.
var ImportedKEKAttributes = tpm2.TPMAObject{
	FixedTPM:            false,
	FixedParent:         false,
	SensitiveDataOrigin: false,
	UserWithAuth:        true,
	AdminWithPolicy:     false,
	NoDA:                true,
	Restricted:          true,
	Decrypt:             true,
	SignEncrypt:         false,
}

// ImportedKEKTemplate is the public area of an imported KEK without its public
// point: KEKTemplate with ImportedKEKAttributes and the no-duplication policy.
func ImportedKEKTemplate() tpm2.TPMTPublic {
	t := KEKTemplate()
	t.ObjectAttributes = ImportedKEKAttributes
	t.AuthPolicy = tpm2.TPM2BDigest{Buffer: bytes.Clone(noDuplicationPolicy)}
	return t
}

// IsImportedKEK reports whether pub has the imported KEK's attributes and policy
// (its other fields are checked by CheckKEKPublic).
func IsImportedKEK(pub *tpm2.TPMTPublic) bool {
	return SameAttrs(pub.ObjectAttributes, ImportedKEKAttributes) &&
		bytes.Equal(pub.AuthPolicy.Buffer, noDuplicationPolicy)
}

// SameAttrs reports whether two attribute sets are equal bit for bit.
func SameAttrs(a, b tpm2.TPMAObject) bool {
	return bytes.Equal(tpm2.Marshal(a), tpm2.Marshal(b))
}

// CheckKEKPublic accepts only a public area of the shape KEKTemplate or
// ImportedKEKTemplate creates.
func CheckKEKPublic(pub *tpm2.TPMTPublic) error {
	if pub.Type != tpm2.TPMAlgECC || pub.NameAlg != tpm2.TPMAlgSHA256 {
		return errors.New("not an ECC key with nameAlg SHA-256")
	}
	switch {
	case IsImportedKEK(pub): // userWithAuth|noDA|restricted|decrypt, no-duplication policy
	case !SameAttrs(pub.ObjectAttributes, KEKAttributes):
		return errors.New("object attributes differ from an hwkms KEK (fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|noDA|restricted|decrypt)")
	case len(pub.AuthPolicy.Buffer) != 0:
		return errors.New("KEK has an authPolicy")
	}
	ecc, err := pub.Parameters.ECCDetail()
	if err != nil {
		return err
	}
	want := KEKTemplate()
	wantECC, _ := want.Parameters.ECCDetail()
	if !bytes.Equal(tpm2.Marshal(ecc), tpm2.Marshal(wantECC)) {
		return errors.New("KEK parameters are not ECC P-256 with AES-128-CFB")
	}
	return nil
}
