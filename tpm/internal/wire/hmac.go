package wire

import (
	"errors"

	"github.com/google/go-tpm/tpm2"
)

// HMACKEKAttributes is the KEK of kind hmac (package tpm's doc.go): a keyed-hash
// signing key that can never leave its TPM and is never duplicated. Every bit is
// listed; anything else is refused on load.
var HMACKEKAttributes = tpm2.TPMAObject{
	FixedTPM:            true,
	FixedParent:         true,
	SensitiveDataOrigin: true,
	UserWithAuth:        true,
	NoDA:                true,
	SignEncrypt:         true,
}

// HMACKEKTemplate is the KEK of kind hmac: KEYEDHASH, HMAC-SHA-256 scheme, nameAlg
// SHA-256, its key generated inside the TPM.
func HMACKEKTemplate() tpm2.TPMTPublic {
	return tpm2.TPMTPublic{
		Type:             tpm2.TPMAlgKeyedHash,
		NameAlg:          tpm2.TPMAlgSHA256,
		ObjectAttributes: HMACKEKAttributes,
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgKeyedHash, &tpm2.TPMSKeyedHashParms{
			Scheme: tpm2.TPMTKeyedHashScheme{
				Scheme:  tpm2.TPMAlgHMAC,
				Details: tpm2.NewTPMUSchemeKeyedHash(tpm2.TPMAlgHMAC, &tpm2.TPMSSchemeHMAC{HashAlg: tpm2.TPMAlgSHA256}),
			},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BDigest{}),
	}
}

// IsHMACKEK reports whether pub is a KEYEDHASH object (the kind hmac shape, or a
// broken one CheckHMACKEKPublic refuses) rather than an ECC storage KEK.
func IsHMACKEK(pub *tpm2.TPMTPublic) bool { return pub.Type == tpm2.TPMAlgKeyedHash }

// CheckHMACKEKPublic accepts only a public area of the shape HMACKEKTemplate
// creates: exact attributes, no authPolicy, HMAC-SHA-256, a 32-byte unique.
func CheckHMACKEKPublic(pub *tpm2.TPMTPublic) error {
	if pub.Type != tpm2.TPMAlgKeyedHash || pub.NameAlg != tpm2.TPMAlgSHA256 {
		return errors.New("not a KEYEDHASH key with nameAlg SHA-256")
	}
	if !SameAttrs(pub.ObjectAttributes, HMACKEKAttributes) {
		return errors.New("object attributes are not those of an hwkms HMAC KEK")
	}
	if len(pub.AuthPolicy.Buffer) != 0 {
		return errors.New("unexpected authPolicy")
	}
	kh, err := pub.Parameters.KeyedHashDetail()
	if err != nil {
		return err
	}
	if kh.Scheme.Scheme != tpm2.TPMAlgHMAC {
		return errors.New("keyed-hash scheme is not HMAC")
	}
	h, err := kh.Scheme.Details.HMAC()
	if err != nil || h.HashAlg != tpm2.TPMAlgSHA256 {
		return errors.New("HMAC scheme hash is not SHA-256")
	}
	u, err := pub.Unique.KeyedHash()
	if err != nil {
		return err
	}
	if len(u.Buffer) != 32 {
		return errors.New("unique is not a SHA-256 digest")
	}
	return nil
}

// CheckAnyKEKPublic accepts a KEK of either kind.
func CheckAnyKEKPublic(pub *tpm2.TPMTPublic) error {
	if IsHMACKEK(pub) {
		return CheckHMACKEKPublic(pub)
	}
	return CheckKEKPublic(pub)
}
