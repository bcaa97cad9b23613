package provision

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"fmt"

	"github.com/google/go-tpm/tpm2"

	"github.com/hwkms/hwkms/tpm/internal/wire"
)

// Import blob format (stored: escrow.import is kept for years, so every version
// stays readable; a change is a new version). Every blob starts with importMagic
// and a version byte, followed by u16-length-prefixed TPM2B fields:
//
//	version 1: TPM2B_PUBLIC (KEK) | TPM2B_NAME (target SRK) |
//	           TPM2B_PRIVATE (duplicate) | TPM2B_ENCRYPTED_SECRET (seed)
//	version 2: TPM2B_PUBLIC (KEK) | TPM2B_NAME (target SRK) | TPM2B_PUBLIC (EK) |
//	           TPM2B_ID_OBJECT | TPM2B_ENCRYPTED_SECRET (credential) |
//	           TPM2B (12-byte nonce || AES-256-GCM(K, TPM2B duplicate || TPM2B seed))
//
// In version 2 everything before the last field is the GCM additional data.

// importMagic starts every import blob, followed by its format version.
var importMagic = []byte("HWKI")

// Import blob format versions.
const (
	// ImportV1 is an import blob bound to an SRK.
	ImportV1 = 0x01
	// ImportV2 is an import blob also bound to the TPM's certified EK.
	ImportV2 = 0x02
)

// encodeImportBlob writes "HWKI", version and each field as a u16-length-prefixed
// TPM2B.
func encodeImportBlob(version byte, fields ...[]byte) ([]byte, error) {
	out := append(bytes.Clone(importMagic), version)
	var err error
	for _, f := range fields {
		if out, err = wire.Append2B(out, f); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// Blob is a parsed import blob: what a node needs to TPM2_Import it (package tpm's
// ImportKey) or the escrow recovery needs to open it in software.
type Blob struct {
	// Public is the KEK's public area; PublicBytes its TPMT_PUBLIC as stored.
	Public      *tpm2.TPMTPublic
	PublicBytes []byte
	// Name is the KEK's Name, computed from Public.
	Name []byte
	// ParentName is the Name of the SRK the blob was made for.
	ParentName []byte
	// Duplicate and Seed are TPM2_Import's duplicate and inSymSeed. In a version 2
	// blob they are nil: EK.Open gives them after TPM2_ActivateCredential.
	Duplicate, Seed []byte
	// EK is set for a version 2 (EK-bound) blob.
	EK *EKBinding
}

// ParseBlob parses an import blob (version 1, or version 2 bound to an EK) strictly
// and checks that the KEK's public area has the imported KEK's exact shape. A blob
// that does not parse gives an error wrapping wire.ErrMalformed; a well-formed blob
// holding another kind of key gives tpm.ErrNotKEK.
func ParseBlob(b []byte) (*Blob, error) {
	if !bytes.HasPrefix(b, importMagic) || len(b) < len(importMagic)+1 {
		return nil, fmt.Errorf("%w: not an hwkms import blob", wire.ErrMalformed)
	}
	var fields int
	switch v := b[len(importMagic)]; v {
	case ImportV1:
		fields = 4
	case ImportV2:
		fields = 6
	default:
		return nil, fmt.Errorf("%w: import blob version %d, want %d or %d", wire.ErrMalformed, v, ImportV1, ImportV2)
	}
	rest := b[len(importMagic)+1:]
	f := make([][]byte, fields)
	for i := range f {
		var ok bool
		if f[i], rest, ok = wire.Cut2B(rest); !ok || len(f[i]) == 0 {
			return nil, fmt.Errorf("%w: import blob truncated", wire.ErrMalformed)
		}
	}
	if len(rest) != 0 {
		return nil, fmt.Errorf("%w: import blob has %d trailing bytes", wire.ErrMalformed, len(rest))
	}
	pub, err := wire.SafeUnmarshalPublic(f[0])
	if err != nil {
		return nil, fmt.Errorf("%w: KEK public area: %w", wire.ErrMalformed, err)
	}
	if again, err := wire.SafeMarshal(pub); err != nil || !bytes.Equal(again, f[0]) {
		return nil, fmt.Errorf("%w: KEK public area is not canonical", wire.ErrMalformed)
	}
	if err := wire.CheckKEKPublic(pub); err != nil || !wire.IsImportedKEK(pub) {
		return nil, fmt.Errorf("%w: the public area is not an hwkms imported KEK", wire.ErrNotKEK)
	}
	name, err := wire.ObjectName(pub)
	if err != nil {
		return nil, err
	}
	ib := &Blob{Public: pub, PublicBytes: f[0], Name: name, ParentName: f[1]}
	if fields == 4 {
		ib.Duplicate, ib.Seed = f[2], f[3]
		return ib, nil
	}
	aad := b[:len(b)-2-len(f[5])]
	if ib.EK, err = parseEKBinding(f[2:], aad); err != nil {
		return nil, err
	}
	return ib, nil
}

// ImportBlobInfo describes an import blob without a TPM.
type ImportBlobInfo struct {
	KeyID      string // the key_id of the KEK inside
	ParentName []byte // Name of the SRK it was made for
	EKName     []byte // Name of the EK it is bound to; nil for a version 1 blob
}

// InspectImportBlob parses an import blob and reports what it holds.
func InspectImportBlob(b []byte) (ImportBlobInfo, error) {
	ib, err := ParseBlob(b)
	if err != nil {
		return ImportBlobInfo{}, fmt.Errorf("tpm: import blob: %w", err)
	}
	info := ImportBlobInfo{KeyID: wire.KeyID(ib.Name), ParentName: bytes.Clone(ib.ParentName)}
	if ib.EK != nil {
		info.EKName = bytes.Clone(ib.EK.Name)
	}
	return info, nil
}

// EKBinding is the EK part of a parsed version 2 import blob.
type EKBinding struct {
	// Public is the EK's public area (a TCG EK template); Name its Name.
	Public *tpm2.TPMTPublic
	Name   []byte
	// IDObject and EncSecret are TPM2_ActivateCredential's credentialBlob and secret.
	IDObject, EncSecret []byte
	// Sealed is the 12-byte GCM nonce followed by the sealed duplicate and seed.
	Sealed []byte
	aad    []byte
}

// parseEKBinding parses the fields after the parent Name of a version 2 blob (f:
// EK public, ID object, encrypted secret, sealed) whose header is aad.
func parseEKBinding(f [][]byte, aad []byte) (*EKBinding, error) {
	pub, err := wire.SafeUnmarshalPublic(f[0])
	if err != nil {
		return nil, fmt.Errorf("%w: EK public area: %w", wire.ErrMalformed, err)
	}
	if again, err := wire.SafeMarshal(pub); err != nil || !bytes.Equal(again, f[0]) {
		return nil, fmt.Errorf("%w: EK public area is not canonical", wire.ErrMalformed)
	}
	if tmpl, err := EKTemplate(pub); err != nil || !isTemplate(pub, tmpl) {
		return nil, fmt.Errorf("%w: EK public area is not the TCG EK template", wire.ErrMalformed)
	}
	name, err := wire.ObjectName(pub)
	if err != nil {
		return nil, fmt.Errorf("%w: EK Name: %w", wire.ErrMalformed, err)
	}
	if len(f[3]) < 12+16 {
		return nil, fmt.Errorf("%w: sealed duplicate too short", wire.ErrMalformed)
	}
	return &EKBinding{Public: pub, Name: name, IDObject: f[1], EncSecret: f[2], Sealed: f[3], aad: aad}, nil
}

// Open opens the sealed duplicate and seed with k, the credential
// TPM2_ActivateCredential released. A k that is not an AES-256 key or does not
// authenticate the sealed part (with the blob's header) gives wire.ErrMalformed.
func (b *EKBinding) Open(k []byte) (duplicate, seed []byte, err error) {
	aead, err := newGCM(k)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: credential is not an AES-256 key", wire.ErrMalformed)
	}
	ns := aead.NonceSize()
	inner, err := aead.Open(nil, b.Sealed[:ns], b.Sealed[ns:], b.aad)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: sealed duplicate does not authenticate", wire.ErrMalformed)
	}
	dup, rest, ok := wire.Cut2B(inner)
	s, rest2, ok2 := wire.Cut2B(rest)
	if !ok || !ok2 || len(rest2) != 0 || len(dup) == 0 || len(s) == 0 {
		return nil, nil, fmt.Errorf("%w: sealed duplicate", wire.ErrMalformed)
	}
	return dup, s, nil
}

func newGCM(k []byte) (cipher.AEAD, error) {
	block, err := aes.NewCipher(k)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}
