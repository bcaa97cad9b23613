package tpm

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
)

// bodyV1 is the first byte of every body produced by this package (doc.go).
const bodyV1 = 0x01

// blobV1 is the first byte of a KEK blob file (doc.go).
const blobV1 = 0x01

var errMalformed = errors.New("malformed")

// encodeObject returns version || TPM2B_PUBLIC || TPM2B_PRIVATE, each 2B being a
// big-endian uint16 size followed by that many bytes.
func encodeObject(version byte, pub []byte, priv []byte) ([]byte, error) {
	if len(pub) == 0 || len(pub) > 0xffff || len(priv) == 0 || len(priv) > 0xffff {
		return nil, fmt.Errorf("object areas of %d and %d bytes cannot be encoded", len(pub), len(priv))
	}
	out := make([]byte, 0, 1+2+len(pub)+2+len(priv))
	out = append(out, version)
	out = binary.BigEndian.AppendUint16(out, uint16(len(pub)))
	out = append(out, pub...)
	out = binary.BigEndian.AppendUint16(out, uint16(len(priv)))
	out = append(out, priv...)
	return out, nil
}

// decodeObject parses version || TPM2B_PUBLIC || TPM2B_PRIVATE strictly: exact
// version, sizes within the input, a public area that unmarshals and marshals back
// to the same bytes, a non-empty private area, and no trailing bytes.
func decodeObject(version byte, b []byte) (*tpm2.TPMTPublic, []byte, []byte, error) {
	if len(b) < 1 || b[0] != version {
		return nil, nil, nil, fmt.Errorf("%w: unknown format version", errMalformed)
	}
	rest := b[1:]
	pubBytes, rest, ok := cut2B(rest)
	if !ok || len(pubBytes) == 0 {
		return nil, nil, nil, fmt.Errorf("%w: public area truncated", errMalformed)
	}
	privBytes, rest, ok := cut2B(rest)
	if !ok || len(privBytes) == 0 {
		return nil, nil, nil, fmt.Errorf("%w: private area truncated", errMalformed)
	}
	if len(rest) != 0 {
		return nil, nil, nil, fmt.Errorf("%w: %d trailing bytes", errMalformed, len(rest))
	}
	pub, err := safeUnmarshalPublic(pubBytes)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("%w: public area: %w", errMalformed, err)
	}
	if again, err := safeMarshal(pub); err != nil || !bytes.Equal(again, pubBytes) {
		return nil, nil, nil, fmt.Errorf("%w: public area is not canonical", errMalformed)
	}
	return pub, pubBytes, privBytes, nil
}

// safeMarshal is tpm2.Marshal without its panic on values it cannot encode: input
// from a ciphertext must never crash the process.
func safeMarshal(v tpm2.Marshallable) (b []byte, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%w: cannot marshal", errMalformed)
		}
	}()
	return tpm2.Marshal(v), nil
}

// safeUnmarshalPublic is tpm2.Unmarshal guarded against panics on hostile input.
func safeUnmarshalPublic(b []byte) (pub *tpm2.TPMTPublic, err error) {
	defer func() {
		if r := recover(); r != nil {
			pub, err = nil, fmt.Errorf("%w: cannot unmarshal", errMalformed)
		}
	}()
	return tpm2.Unmarshal[tpm2.TPMTPublic](b)
}

func cut2B(b []byte) (field, rest []byte, ok bool) {
	if len(b) < 2 {
		return nil, nil, false
	}
	n := int(binary.BigEndian.Uint16(b))
	if len(b)-2 < n {
		return nil, nil, false
	}
	return b[2 : 2+n], b[2+n:], true
}

// objectName returns the TPM Name (nameAlg || H(TPMT_PUBLIC)) of pub, computed here.
func objectName(pub *tpm2.TPMTPublic) ([]byte, error) {
	n, err := tpm2.ObjectName(pub)
	if err != nil {
		return nil, err
	}
	return n.Buffer, nil
}

// Object attributes. Every bit is listed; anything else is refused on load.
var (
	// kekAttributes: a storage key (restricted decrypt) that can never leave this TPM.
	kekAttributes = tpm2.TPMAObject{
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
	// sealedAttributes: a sealed-data object authorised with the KEK's auth value.
	sealedAttributes = tpm2.TPMAObject{
		FixedTPM:     true,
		FixedParent:  true,
		UserWithAuth: true,
		NoDA:         true,
	}
	// sealedPolicyAttributes: a sealed-data object that only a policy session
	// satisfying its authPolicy (PolicyPCR) can unseal; admin role by policy too.
	sealedPolicyAttributes = tpm2.TPMAObject{
		FixedTPM:        true,
		FixedParent:     true,
		AdminWithPolicy: true,
		NoDA:            true,
	}
)

// aes128CFB is the symmetric algorithm of the SRK and the KEK (storage keys), and
// of session parameter encryption.
var aes128CFB = tpm2.TPMTSymDefObject{
	Algorithm: tpm2.TPMAlgAES,
	KeyBits:   tpm2.NewTPMUSymKeyBits(tpm2.TPMAlgAES, tpm2.TPMKeyBits(128)),
	Mode:      tpm2.NewTPMUSymMode(tpm2.TPMAlgAES, tpm2.TPMAlgCFB),
}

// srkTemplate is the TCG ECC P-256 SRK template (TCG TPM v2.0 Provisioning
// Guidance, section 7.5.1). With its all-zero unique field, CreatePrimary derives the
// same key from the owner seed every time, so a KEK blob can be reloaded after any
// restart until the owner hierarchy is cleared.
var srkTemplate = tpm2.ECCSRKTemplate

// kekTemplate is the KEK: ECC NIST P-256 restricted decrypt, AES-128-CFB, nameAlg
// SHA-256. See doc.go for why ECC and why noDA.
func kekTemplate() tpm2.TPMTPublic {
	return tpm2.TPMTPublic{
		Type:             tpm2.TPMAlgECC,
		NameAlg:          tpm2.TPMAlgSHA256,
		ObjectAttributes: kekAttributes,
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: aes128CFB,
			Scheme:    tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull},
			CurveID:   tpm2.TPMECCNistP256,
			KDF:       tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{}),
	}
}

// sealedTemplate is the public area of a sealed-data object. authPolicy is empty, or
// a PolicyPCR digest, in which case userWithAuth is cleared.
func sealedTemplate(authPolicy []byte) tpm2.TPMTPublic {
	attrs := sealedAttributes
	if authPolicy != nil {
		attrs = sealedPolicyAttributes
	}
	return tpm2.TPMTPublic{
		Type:             tpm2.TPMAlgKeyedHash,
		NameAlg:          tpm2.TPMAlgSHA256,
		ObjectAttributes: attrs,
		AuthPolicy:       tpm2.TPM2BDigest{Buffer: authPolicy},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgKeyedHash, &tpm2.TPMSKeyedHashParms{
			Scheme: tpm2.TPMTKeyedHashScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BDigest{}),
	}
}

func sameAttrs(a, b tpm2.TPMAObject) bool {
	return bytes.Equal(tpm2.Marshal(a), tpm2.Marshal(b))
}

// checkKEKPublic accepts only a public area of the shape kekTemplate creates.
func checkKEKPublic(pub *tpm2.TPMTPublic) error {
	if pub.Type != tpm2.TPMAlgECC || pub.NameAlg != tpm2.TPMAlgSHA256 {
		return errors.New("not an ECC key with nameAlg SHA-256")
	}
	switch {
	case isImportedKEK(pub): // importkey.go: userWithAuth|noDA|restricted|decrypt, no-duplication policy
	case !sameAttrs(pub.ObjectAttributes, kekAttributes):
		return errors.New("object attributes differ from an hwkms KEK (fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|noDA|restricted|decrypt)")
	case len(pub.AuthPolicy.Buffer) != 0:
		return errors.New("KEK has an authPolicy")
	}
	ecc, err := pub.Parameters.ECCDetail()
	if err != nil {
		return err
	}
	want := kekTemplate()
	wantECC, _ := want.Parameters.ECCDetail()
	if !bytes.Equal(tpm2.Marshal(ecc), tpm2.Marshal(wantECC)) {
		return errors.New("KEK parameters are not ECC P-256 with AES-128-CFB")
	}
	return nil
}

// checkSealedPublic accepts only a public area of the shape sealedTemplate creates:
// KEYEDHASH, NULL scheme, nameAlg SHA-256, fixedTPM|fixedParent|noDA, never sign or
// decrypt, and either userWithAuth with no policy or a 32-byte policy without it.
func checkSealedPublic(pub *tpm2.TPMTPublic) error {
	if pub.Type != tpm2.TPMAlgKeyedHash || pub.NameAlg != tpm2.TPMAlgSHA256 {
		return errors.New("not a KEYEDHASH object with nameAlg SHA-256")
	}
	switch {
	case sameAttrs(pub.ObjectAttributes, sealedAttributes):
		if len(pub.AuthPolicy.Buffer) != 0 {
			return errors.New("unexpected authPolicy")
		}
	case sameAttrs(pub.ObjectAttributes, sealedPolicyAttributes):
		if len(pub.AuthPolicy.Buffer) != 32 {
			return errors.New("policy object without a SHA-256 authPolicy")
		}
	default:
		return errors.New("object attributes are not those of an hwkms sealed object")
	}
	kh, err := pub.Parameters.KeyedHashDetail()
	if err != nil {
		return err
	}
	if kh.Scheme.Scheme != tpm2.TPMAlgNull {
		return errors.New("keyed-hash scheme is not NULL")
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
