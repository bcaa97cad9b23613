package tpm

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/hwkms/hwkms/tpm/internal/wire"
)

// bodyV1 is the first byte of every body produced by this package (doc.go).
const bodyV1 = 0x01

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
		return nil, nil, nil, fmt.Errorf("%w: unknown format version", wire.ErrMalformed)
	}
	rest := b[1:]
	pubBytes, rest, ok := wire.Cut2B(rest)
	if !ok || len(pubBytes) == 0 {
		return nil, nil, nil, fmt.Errorf("%w: public area truncated", wire.ErrMalformed)
	}
	privBytes, rest, ok := wire.Cut2B(rest)
	if !ok || len(privBytes) == 0 {
		return nil, nil, nil, fmt.Errorf("%w: private area truncated", wire.ErrMalformed)
	}
	if len(rest) != 0 {
		return nil, nil, nil, fmt.Errorf("%w: %d trailing bytes", wire.ErrMalformed, len(rest))
	}
	pub, err := wire.SafeUnmarshalPublic(pubBytes)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("%w: public area: %w", wire.ErrMalformed, err)
	}
	if again, err := wire.SafeMarshal(pub); err != nil || !bytes.Equal(again, pubBytes) {
		return nil, nil, nil, fmt.Errorf("%w: public area is not canonical", wire.ErrMalformed)
	}
	return pub, pubBytes, privBytes, nil
}

// Object attributes. Every bit is listed; anything else is refused on load.
var (
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

// checkSealedPublic accepts only a public area of the shape sealedTemplate creates:
// KEYEDHASH, NULL scheme, nameAlg SHA-256, fixedTPM|fixedParent|noDA, never sign or
// decrypt, and either userWithAuth with no policy or a 32-byte policy without it.
func checkSealedPublic(pub *tpm2.TPMTPublic) error {
	if pub.Type != tpm2.TPMAlgKeyedHash || pub.NameAlg != tpm2.TPMAlgSHA256 {
		return errors.New("not a KEYEDHASH object with nameAlg SHA-256")
	}
	switch {
	case wire.SameAttrs(pub.ObjectAttributes, sealedAttributes):
		if len(pub.AuthPolicy.Buffer) != 0 {
			return errors.New("unexpected authPolicy")
		}
	case wire.SameAttrs(pub.ObjectAttributes, sealedPolicyAttributes):
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

// Sealed objects under an imported KEK: fixedTPM must be clear (a fixedTPM object
// needs a fixedTPM parent); fixedParent keeps them from being duplicated.
var (
	sealedImportedAttributes = tpm2.TPMAObject{
		FixedParent:  true,
		UserWithAuth: true,
		NoDA:         true,
	}
	sealedImportedPolicyAttributes = tpm2.TPMAObject{
		FixedParent:     true,
		AdminWithPolicy: true,
		NoDA:            true,
	}
)

// sealedTemplateFor is sealedTemplate for a KEK of either form.
func sealedTemplateFor(authPolicy []byte, imported bool) tpm2.TPMTPublic {
	t := sealedTemplate(authPolicy)
	if imported {
		t.ObjectAttributes = sealedImportedAttributes
		if authPolicy != nil {
			t.ObjectAttributes = sealedImportedPolicyAttributes
		}
	}
	return t
}

// checkSealedPublicFor is checkSealedPublic for a KEK of either form: under an
// imported KEK, sealed objects have fixedTPM clear and nothing else differs.
func checkSealedPublicFor(pub *tpm2.TPMTPublic, imported bool) error {
	if !imported {
		return checkSealedPublic(pub)
	}
	cp := *pub
	switch {
	case wire.SameAttrs(pub.ObjectAttributes, sealedImportedAttributes):
		cp.ObjectAttributes = sealedAttributes
	case wire.SameAttrs(pub.ObjectAttributes, sealedImportedPolicyAttributes):
		cp.ObjectAttributes = sealedPolicyAttributes
	default:
		return errors.New("object attributes are not those of an hwkms sealed object under an imported KEK")
	}
	return checkSealedPublic(&cp)
}
