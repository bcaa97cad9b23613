package tpm

import (
	"bytes"
	"context"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/hwkms/hwkms/tpm/provision"
)

// This file is the node side of EK-bound import blobs (tpm/provision makes and
// parses them): exporting the EK and its certificate, and TPM2_ActivateCredential
// when a version 2 blob is imported. See doc.go, "EK-bound import blobs".

// EK certificate NV indices, low range (TCG EK Credential Profile for TPM 2.0,
// section 2.2.1.4).
const (
	ekCertIndexRSA = tpm2.TPMHandle(0x01C00002)
	ekCertIndexECC = tpm2.TPMHandle(0x01C0000A)
)

// ExportEK re-creates the EK of the TPM at device from the TCG template that matches
// the EK certificate in NV (ECC P-256 at 0x01C0000A, else RSA 2048 at 0x01C00002),
// reads that certificate and checks that it certifies this EK. The endorsement
// hierarchy's auth value must be empty.
func ExportEK(ctx context.Context, device string) (provision.EKPublic, error) {
	dev, err := parseDevice(device)
	if err != nil {
		return provision.EKPublic{}, fmt.Errorf("tpm: device: %w", err)
	}
	c, err := openAdmin(ctx, dev)
	if err != nil {
		return provision.EKPublic{}, err
	}
	defer c.Close()
	var (
		cert  []byte
		index tpm2.TPMHandle
	)
	for _, index = range []tpm2.TPMHandle{ekCertIndexECC, ekCertIndexRSA} {
		cert, err = readNV(c, index)
		if err == nil {
			break
		}
		if !errors.Is(err, tpm2.TPMRCHandle) {
			return provision.EKPublic{}, fmt.Errorf("tpm: export EK: EK certificate at NV index 0x%08x: %w", uint32(index), err)
		}
	}
	if cert == nil {
		return provision.EKPublic{}, fmt.Errorf("tpm: export EK: this TPM holds no EK certificate at NV index 0x%08x or 0x%08x", uint32(ekCertIndexECC), uint32(ekCertIndexRSA))
	}
	tmpl := tpm2.ECCEKTemplate
	if index == ekCertIndexRSA {
		tmpl = tpm2.RSAEKTemplate
	}
	ek, err := createEK(c, tmpl)
	if err != nil {
		return provision.EKPublic{}, fmt.Errorf("tpm: export EK: %w", err)
	}
	defer flushHandle(c, ek.Handle)
	out, err := provision.ParseEKPublic(tpm2.Marshal(tpm2.New2B(ek.pub)), cert)
	if err != nil {
		return provision.EKPublic{}, fmt.Errorf("tpm: export EK: %w", err)
	}
	if !bytes.Equal(out.Name, ek.Name.Buffer) {
		return provision.EKPublic{}, fmt.Errorf("tpm: export EK: the TPM's Name does not match the public area: %w", errDesync)
	}
	return out, nil
}

// readNV reads a whole NV index with owner authorisation.
func readNV(c *conn, index tpm2.TPMHandle) ([]byte, error) {
	rp, err := tpm2.NVReadPublic{NVIndex: index}.Execute(c)
	if err != nil {
		return nil, fmt.Errorf("TPM2_NV_ReadPublic: %w", err)
	}
	pub, err := rp.NVPublic.Contents()
	if err != nil {
		return nil, fmt.Errorf("TPM2_NV_ReadPublic: %w: %w", errDesync, err)
	}
	const chunk = 512 // below every TPM's MAX_NV_BUFFER_SIZE
	out := make([]byte, 0, pub.DataSize)
	for off := 0; off < int(pub.DataSize); off += chunk {
		n := min(chunk, int(pub.DataSize)-off)
		rsp, err := tpm2.NVRead{
			AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
			NVIndex:    tpm2.NamedHandle{Handle: index, Name: rp.NVName},
			Size:       uint16(n),
			Offset:     uint16(off),
		}.Execute(c)
		if err != nil {
			return nil, fmt.Errorf("TPM2_NV_Read: %w", tpmCall(err))
		}
		out = append(out, rsp.Data.Buffer...)
	}
	return out, nil
}

// createEK creates the EK from tmpl under the endorsement hierarchy. The caller
// flushes it.
func createEK(c *conn, tmpl tpm2.TPMTPublic) (primaryObject, error) {
	return createPrimary(c, tpm2.TPMRHEndorsement, tmpl, "EK")
}

// activate recovers the duplicate and seed of an EK-bound blob in the TPM on c: it
// re-creates the EK, checks it is the one the blob names (else ErrWrongTPM), runs
// TPM2_ActivateCredential with the SRK (ADMIN role, empty auth) and the EK (USER role,
// PolicySecret on the endorsement hierarchy), and opens the sealed fields with K.
func activate(c *conn, srk primaryObject, b *provision.EKBinding) (duplicate, seed []byte, err error) {
	tmpl, err := provision.EKTemplate(b.Public)
	if err != nil {
		return nil, nil, err
	}
	ek, err := createEK(c, tmpl)
	if err != nil {
		return nil, nil, err
	}
	defer flushHandle(c, ek.Handle)
	if !bytes.Equal(ek.Name.Buffer, b.Name) {
		return nil, nil, fmt.Errorf("blob is bound to EK %x, this TPM's EK is %x: %w", b.Name, ek.Name.Buffer, ErrWrongTPM)
	}
	endorsement := tpm2.Policy(tpm2.TPMAlgSHA256, 16, func(t transport.TPM, h tpm2.TPMISHPolicy, nonce tpm2.TPM2BNonce) error {
		_, err := tpm2.PolicySecret{
			AuthHandle:    tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
			PolicySession: h,
			NonceTPM:      nonce,
		}.Execute(t)
		return err
	})
	rsp, err := tpm2.ActivateCredential{
		ActivateHandle: tpm2.AuthHandle{Handle: srk.Handle, Name: srk.Name, Auth: tpm2.PasswordAuth(nil)},
		KeyHandle:      tpm2.AuthHandle{Handle: ek.Handle, Name: ek.Name, Auth: endorsement},
		CredentialBlob: tpm2.TPM2BIDObject{Buffer: b.IDObject},
		Secret:         tpm2.TPM2BEncryptedSecret{Buffer: b.EncSecret},
	}.Execute(c)
	if err != nil {
		return nil, nil, fmt.Errorf("TPM2_ActivateCredential: %w", tpmCall(err))
	}
	k := rsp.CertInfo.Buffer
	defer clear(k)
	return b.Open(k)
}
