package provision

import (
	"bytes"
	"crypto/ecdh"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"

	"github.com/hwkms/hwkms/tpm/internal/wire"
)

// KEKMaterial is an imported-form KEK in memory: its public area and its
// TPMT_SENSITIVE (private scalar, storage seed, auth value). It exists only during
// a provisioning or recovery ceremony; call Destroy when done. Not safe for
// concurrent use.
type KEKMaterial struct {
	pub       tpm2.TPMTPublic
	name      []byte
	sensitive []byte // marshalled TPMT_SENSITIVE; cleared by Destroy
}

// NewKEKMaterial generates an imported-form KEK with crypto/rand: an ECC P-256
// private scalar, a 32-byte storage seed (the key from which the TPM derives the
// protection of every sealed object under the KEK, Part 1 section 23.4), and the
// given auth value (nil, or tpm.MinAuthLen..tpm.MaxAuthLen bytes without NUL). The
// public area is the imported KEK template with the public point.
func NewKEKMaterial(auth []byte) (*KEKMaterial, error) {
	if len(auth) != 0 && (len(auth) < wire.MinAuthLen || len(auth) > wire.MaxAuthLen || bytes.IndexByte(auth, 0) >= 0) {
		return nil, fmt.Errorf("tpm: KEK auth value must be %d to %d bytes without NUL", wire.MinAuthLen, wire.MaxAuthLen)
	}
	priv, err := ecdh.P256().GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("tpm: generate KEK: %w", err)
	}
	seed := make([]byte, sha256.Size)
	if _, err := rand.Read(seed); err != nil {
		return nil, fmt.Errorf("tpm: generate KEK: %w", err)
	}
	d := priv.Bytes()
	defer clear(d)
	defer clear(seed)
	return newKEKMaterial(priv.PublicKey(), d, seed, auth)
}

func newKEKMaterial(pubKey *ecdh.PublicKey, d, seed, auth []byte) (*KEKMaterial, error) {
	raw := pubKey.Bytes() // 0x04 || X || Y
	pub := wire.ImportedKEKTemplate()
	pub.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
		X: tpm2.TPM2BECCParameter{Buffer: bytes.Clone(raw[1:33])},
		Y: tpm2.TPM2BECCParameter{Buffer: bytes.Clone(raw[33:65])},
	})
	name, err := wire.ObjectName(&pub)
	if err != nil {
		return nil, fmt.Errorf("tpm: KEK Name: %w", err)
	}
	sens := tpm2.Marshal(tpm2.TPMTSensitive{
		SensitiveType: tpm2.TPMAlgECC,
		AuthValue:     tpm2.TPM2BAuth{Buffer: auth},
		SeedValue:     tpm2.TPM2BDigest{Buffer: seed},
		Sensitive:     tpm2.NewTPMUSensitiveComposite(tpm2.TPMAlgECC, &tpm2.TPM2BECCParameter{Buffer: d}),
	})
	return &KEKMaterial{pub: pub, name: name, sensitive: sens}, nil
}

// KeyID is the key_id every node that imports this KEK reports.
func (m *KEKMaterial) KeyID() string { return wire.KeyID(m.name) }

// Name is the KEK's TPM Name.
func (m *KEKMaterial) Name() []byte { return bytes.Clone(m.name) }

// Destroy clears the private part. The KEKMaterial is unusable afterwards. Go's
// crypto/ecdh and go-tpm keep copies of the scalar that cannot be cleared; run the
// ceremony in a short-lived process.
func (m *KEKMaterial) Destroy() {
	clear(m.sensitive)
	m.sensitive = nil
}

// ImportBlob encrypts the KEK to a TPM's SRK (parent, as ParseSRKPublic accepts it)
// in the duplication format of Part 1 section 23.3 with an outer wrapper only:
// a fresh symmetric seed is encapsulated to the SRK's public key (one-pass ECDH,
// KDFe label "DUPLICATE"), the TPM2B_SENSITIVE is AES-128-CFB encrypted with
// KDFa(seed, "STORAGE", Name) and integrity-protected with HMAC-SHA-256 keyed by
// KDFa(seed, "INTEGRITY") over the ciphertext and the KEK's Name (go-tpm's
// tpm2.CreateDuplicate). The returned blob is:
//
//	"HWKI" 0x01 | TPM2B_PUBLIC (KEK) | TPM2B_NAME (parent SRK) |
//	TPM2B_PRIVATE (duplicate) | TPM2B_ENCRYPTED_SECRET (inSymSeed)
//
// Only the TPM holding the SRK's private key can TPM2_Import it.
func (m *KEKMaterial) ImportBlob(parent []byte) ([]byte, error) {
	srkName, dup, seed, err := m.duplicateFor(parent)
	if err != nil {
		return nil, err
	}
	return encodeImportBlob(ImportV1, tpm2.Marshal(m.pub), srkName, dup, seed)
}

// duplicateFor encrypts the KEK to the SRK in parent (ParseSRKPublic's input) and
// returns the SRK's Name and the duplication-format fields (see ImportBlob).
func (m *KEKMaterial) duplicateFor(parent []byte) (srkName, dup, seed []byte, err error) {
	if m.sensitive == nil {
		return nil, nil, nil, errors.New("tpm: KEK material destroyed")
	}
	srk, srkPub, err := ParseSRKPublic(parent)
	if err != nil {
		return nil, nil, nil, err
	}
	ek, err := tpm2.ImportEncapsulationKey(srkPub)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("tpm: SRK public: %w", err)
	}
	dup, seed, err = tpm2.CreateDuplicate(rand.Reader, ek, m.name, m.sensitive)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("tpm: duplicate: %w", err)
	}
	return srk.Name, dup, seed, nil
}
