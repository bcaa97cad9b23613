package tpm

import (
	"bytes"
	"context"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/hwkms/hwkms/tpm/internal/wire"
	"github.com/hwkms/hwkms/tpm/provision"
)

// This file holds the node side of the multi-node ("imported KEK") form of the KEK:
// exporting the SRK a ceremony makes import blobs for, and TPM2_Import of such a
// blob (Part 3 section 13.3). The blob format and the ceremony are package
// tpm/provision. See doc.go, "Imported KEK", and docs/ha.md.

// ExportSRK re-creates the owner SRK of the TPM at device from the TCG ECC P-256
// template (TPM2_CreatePrimary, Part 3 section 24.1), returns its public area and
// Name, and flushes it. This is the public key that import blobs for this TPM are
// encrypted to. The owner hierarchy's auth value must be empty.
func ExportSRK(ctx context.Context, device string) (provision.SRKPublic, error) {
	dev, err := parseDevice(device)
	if err != nil {
		return provision.SRKPublic{}, fmt.Errorf("tpm: device: %w", err)
	}
	c, err := openAdmin(ctx, dev)
	if err != nil {
		return provision.SRKPublic{}, err
	}
	defer c.Close()
	srk, err := createSRK(c, nil)
	if err != nil {
		return provision.SRKPublic{}, fmt.Errorf("tpm: export SRK: %w", err)
	}
	defer flushHandle(c, srk.Handle)
	name, err := wire.ObjectName(&srk.pub)
	if err != nil {
		return provision.SRKPublic{}, fmt.Errorf("tpm: export SRK: %w", err)
	}
	if !bytes.Equal(name, srk.Name.Buffer) {
		return provision.SRKPublic{}, fmt.Errorf("tpm: export SRK: the TPM's Name does not match the public area: %w", errDesync)
	}
	return provision.SRKPublic{Public: tpm2.Marshal(tpm2.New2B(srk.pub)), Name: name}, nil
}

// ImportKey imports the KEK in an import blob into the TPM in cfg: it re-creates
// the owner SRK, checks that the blob was made for it (else ErrWrongTPM), runs
// TPM2_Import under it (Part 3 section 13.3; the TPM decrypts the seed with the
// SRK's private key and checks the integrity HMAC), and then, like CreateKey,
// writes cfg.BlobFile (version 0x01 || TPM2B_PUBLIC || TPM2B_PRIVATE, the format
// Open reads) or makes the key persistent at cfg.PersistentHandle. It never
// overwrites (kek.ErrKeyExists). cfg.AuthFile is not read: the auth value is inside the
// blob, and Open checks the configured one.
func ImportKey(ctx context.Context, cfg Config, blob []byte) (KeyInfo, error) {
	if err := cfg.Validate("tpm"); err != nil {
		return KeyInfo{}, err
	}
	if cfg.Kind == KindHMAC {
		return KeyInfo{}, fmt.Errorf("tpm: import: an imported KEK is of kind %q, the configuration says %q", KindSealed, KindHMAC)
	}
	ib, err := provision.ParseBlob(blob)
	if err != nil {
		return KeyInfo{}, fmt.Errorf("tpm: import: %w", err)
	}
	if err := checkKeyID(ib.Name, cfg.pins().kek, "the import blob"); err != nil {
		return KeyInfo{}, fmt.Errorf("tpm: import: %w", err)
	}
	dev, _ := parseDevice(cfg.Device)
	t, err := openKeyTarget(ctx, cfg, dev, "import")
	if err != nil {
		return KeyInfo{}, err
	}
	defer t.close()
	c, srk := t.c, t.srk
	if !bytes.Equal(srk.Name.Buffer, ib.ParentName) {
		return KeyInfo{}, fmt.Errorf("tpm: import: blob is for SRK %x, this TPM's SRK is %x: %w", ib.ParentName, srk.Name.Buffer, ErrWrongTPM)
	}
	if ib.EK != nil {
		if ib.Duplicate, ib.Seed, err = activate(c, srk, ib.EK); err != nil {
			return KeyInfo{}, fmt.Errorf("tpm: import: %w", err)
		}
	}
	priv, err := importUnder(c, srk, ib)
	if err != nil {
		return KeyInfo{}, fmt.Errorf("tpm: import: %w", err)
	}
	info := KeyInfo{KeyID: wire.KeyID(ib.Name), Name: ib.Name}
	if err := t.store(cfg, "import", ib.PublicBytes, priv, ib.Name, true, &info); err != nil {
		return KeyInfo{}, err
	}
	return info, nil
}

// importUnder runs TPM2_Import of ib under the loaded SRK and returns the new
// TPM2B_PRIVATE contents. The parameters are already encrypted (the seed to the
// SRK, the sensitive area under the seed), so a password session suffices.
func importUnder(c *conn, srk primaryObject, ib *provision.Blob) ([]byte, error) {
	rsp, err := tpm2.Import{
		ParentHandle: tpm2.AuthHandle{Handle: srk.Handle, Name: srk.Name, Auth: tpm2.PasswordAuth(nil)},
		ObjectPublic: tpm2.BytesAs2B[tpm2.TPMTPublic](ib.PublicBytes),
		Duplicate:    tpm2.TPM2BPrivate{Buffer: ib.Duplicate},
		InSymSeed:    tpm2.TPM2BEncryptedSecret{Buffer: ib.Seed},
		Symmetric:    tpm2.TPMTSymDef{Algorithm: tpm2.TPMAlgNull},
	}.Execute(c)
	if err != nil {
		return nil, fmt.Errorf("TPM2_Import: %w", tpmCall(err))
	}
	return rsp.OutPrivate.Buffer, nil
}
