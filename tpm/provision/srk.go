package provision

import (
	"bytes"
	"encoding/pem"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"

	"github.com/hwkms/hwkms/tpm/internal/wire"
)

// SRKPublic is a TPM's owner SRK as tpm.ExportSRK exports it, or an escrow key's
// public half in the same shape (NewEscrowKey).
type SRKPublic struct {
	// Public is the TPM2B_PUBLIC of the SRK, as TPM2_CreatePrimary returns it (the
	// "tss" format of tpm2-tools).
	Public []byte
	// Name is nameAlg || SHA-256(TPMT_PUBLIC), computed here.
	Name []byte
}

// srkPEMType is the PEM block type of an exported SRK public area.
const srkPEMType = "TPM2B PUBLIC"

// EncodeSRKPEM returns the SRK public area as a PEM block "TPM2B PUBLIC" whose
// bytes are the TPM2B_PUBLIC.
func (s SRKPublic) EncodeSRKPEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: srkPEMType, Bytes: s.Public})
}

// ParseSRKPublic parses an SRK public area, either a raw TPM2B_PUBLIC (tpm2-tools
// "tss" format) or the PEM block EncodeSRKPEM writes, and checks that it is a
// storage key an import blob can be made for: ECC NIST P-256, nameAlg SHA-256,
// restricted|decrypt, AES-128-CFB, with a point on the curve.
func ParseSRKPublic(b []byte) (SRKPublic, *tpm2.TPMTPublic, error) {
	if blk, _ := pem.Decode(b); blk != nil {
		if blk.Type != srkPEMType {
			return SRKPublic{}, nil, fmt.Errorf("tpm: SRK public: PEM block %q, want %q", blk.Type, srkPEMType)
		}
		b = blk.Bytes
	}
	body, rest, ok := wire.Cut2B(b)
	if !ok || len(rest) != 0 || len(body) == 0 {
		return SRKPublic{}, nil, errors.New("tpm: SRK public: not a TPM2B_PUBLIC")
	}
	pub, err := wire.SafeUnmarshalPublic(body)
	if err != nil {
		return SRKPublic{}, nil, fmt.Errorf("tpm: SRK public: %w", err)
	}
	if again, err := wire.SafeMarshal(pub); err != nil || !bytes.Equal(again, body) {
		return SRKPublic{}, nil, errors.New("tpm: SRK public: public area is not canonical")
	}
	if err := checkStorageParent(pub); err != nil {
		return SRKPublic{}, nil, fmt.Errorf("tpm: SRK public: %w", err)
	}
	name, err := wire.ObjectName(pub)
	if err != nil {
		return SRKPublic{}, nil, fmt.Errorf("tpm: SRK public: %w", err)
	}
	return SRKPublic{Public: bytes.Clone(b), Name: name}, pub, nil
}

// checkStorageParent accepts the public area of an ECC P-256 storage key with the
// symmetric parameters of the TCG SRK template.
func checkStorageParent(pub *tpm2.TPMTPublic) error {
	if pub.Type != tpm2.TPMAlgECC || pub.NameAlg != tpm2.TPMAlgSHA256 {
		return errors.New("not an ECC key with nameAlg SHA-256")
	}
	a := pub.ObjectAttributes
	if !a.Restricted || !a.Decrypt || a.SignEncrypt {
		return errors.New("not a storage key (restricted decrypt)")
	}
	ecc, err := pub.Parameters.ECCDetail()
	if err != nil {
		return err
	}
	want, _ := wire.SRKTemplate.Parameters.ECCDetail()
	if !bytes.Equal(tpm2.Marshal(ecc), tpm2.Marshal(want)) {
		return errors.New("parameters are not ECC P-256 with AES-128-CFB")
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
