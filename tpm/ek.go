package tpm

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// This file binds import blobs to a TPM's endorsement key (EK), so that a provisioning
// ceremony can check, with the TPM manufacturer's certificate, that the SRK it was
// given lives in a genuine TPM. See doc.go, "EK-bound import blobs".
//
// The EK certificate certifies the EK, not the SRK. What ties the SRK to that EK is
// credential activation (Part 1 section 24): the ceremony encrypts the import blob's
// contents under a fresh AES-256 key K and protects K with TPM2_MakeCredential's
// construction (go-tpm's tpm2.CreateCredential) to the EK, naming the SRK. Only
// TPM2_ActivateCredential in the TPM that holds the EK's private key gives K back, and
// only while an object with the SRK's exact Name is loaded there and authorised in the
// ADMIN role. The SRK public area must be the TCG template (fixedTPM, fixedParent,
// sensitiveDataOrigin, adminWithPolicy clear, empty policy): its ADMIN role then needs
// its auth value, which a public-only copy loaded with TPM2_LoadExternal does not have,
// so a look-alike SRK whose private key lives outside that TPM cannot be activated.

// EK certificate NV indices, low range (TCG EK Credential Profile for TPM 2.0,
// section 2.2.1.4).
const (
	ekCertIndexRSA = tpm2.TPMHandle(0x01C00002)
	ekCertIndexECC = tpm2.TPMHandle(0x01C0000A)
)

// PEM block types of a node's public file beside the SRK's "TPM2B PUBLIC".
const (
	ekPEMType     = "TPM2B PUBLIC EK"
	ekCertPEMType = "CERTIFICATE"
)

// ErrEKNotTrusted means an EK certificate did not verify against the given roots, does
// not certify the EK it came with, or the EK or SRK public area is not the TCG
// template.
var ErrEKNotTrusted = errors.New("tpm: EK is not trusted")

// EKPublic is a TPM's endorsement key: its public area as the TPM re-creates it from
// the TCG template, and the certificate the manufacturer stored in NV.
type EKPublic struct {
	// Public is the TPM2B_PUBLIC of the EK.
	Public []byte
	// Cert is the DER EK certificate.
	Cert []byte
	// Name is nameAlg || SHA-256(TPMT_PUBLIC), computed here.
	Name []byte
}

// ExportEK re-creates the EK of the TPM at device from the TCG template that matches
// the EK certificate in NV (ECC P-256 at 0x01C0000A, else RSA 2048 at 0x01C00002),
// reads that certificate and checks that it certifies this EK. The endorsement
// hierarchy's auth value must be empty.
func ExportEK(ctx context.Context, device string) (EKPublic, error) {
	dev, err := parseDevice(device)
	if err != nil {
		return EKPublic{}, fmt.Errorf("tpm: device: %w", err)
	}
	c, err := openAdmin(ctx, dev)
	if err != nil {
		return EKPublic{}, err
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
			return EKPublic{}, fmt.Errorf("tpm: export EK: EK certificate at NV index 0x%08x: %w", uint32(index), err)
		}
	}
	if cert == nil {
		return EKPublic{}, fmt.Errorf("tpm: export EK: this TPM holds no EK certificate at NV index 0x%08x or 0x%08x", uint32(ekCertIndexECC), uint32(ekCertIndexRSA))
	}
	tmpl := tpm2.ECCEKTemplate
	if index == ekCertIndexRSA {
		tmpl = tpm2.RSAEKTemplate
	}
	ek, err := createEK(c, tmpl)
	if err != nil {
		return EKPublic{}, fmt.Errorf("tpm: export EK: %w", err)
	}
	defer flushHandle(c, ek.Handle)
	out := EKPublic{Public: tpm2.Marshal(tpm2.New2B(ek.pub)), Cert: cert}
	parsed, err := parseEK(out.Public, out.Cert)
	if err != nil {
		return EKPublic{}, fmt.Errorf("tpm: export EK: %w", err)
	}
	if !bytes.Equal(parsed.name, ek.Name.Buffer) {
		return EKPublic{}, fmt.Errorf("tpm: export EK: the TPM's Name does not match the public area: %w", errDesync)
	}
	out.Name = parsed.name
	return out, nil
}

// EncodePEM returns the EK public area and certificate as the PEM blocks
// "TPM2B PUBLIC EK" and "CERTIFICATE", to append to the SRK's block.
func (e EKPublic) EncodePEM() []byte {
	b := pem.EncodeToMemory(&pem.Block{Type: ekPEMType, Bytes: e.Public})
	return append(b, pem.EncodeToMemory(&pem.Block{Type: ekCertPEMType, Bytes: e.Cert})...)
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

// ekTemplateFor returns the TCG EK template of pub's type.
func ekTemplateFor(pub *tpm2.TPMTPublic) (tpm2.TPMTPublic, error) {
	switch pub.Type {
	case tpm2.TPMAlgECC:
		return tpm2.ECCEKTemplate, nil
	case tpm2.TPMAlgRSA:
		return tpm2.RSAEKTemplate, nil
	}
	return tpm2.TPMTPublic{}, errors.New("EK is neither ECC nor RSA")
}

// isTemplate reports whether pub is tmpl with some public key: every field but
// unique equal.
func isTemplate(pub *tpm2.TPMTPublic, tmpl tpm2.TPMTPublic) bool {
	cp := *pub
	cp.Unique = tmpl.Unique
	a, err1 := safeMarshal(&cp)
	b, err2 := safeMarshal(&tmpl)
	return err1 == nil && err2 == nil && bytes.Equal(a, b)
}

// parsedEK is an EK public area with its certificate, checked against each other.
type parsedEK struct {
	pub     *tpm2.TPMTPublic
	pubBody []byte // TPMT_PUBLIC
	name    []byte
	cert    *x509.Certificate
}

// parseEK parses a TPM2B_PUBLIC EK and a DER certificate and checks that the public
// area is a TCG EK template and that the certificate's key is that EK's.
func parseEK(public, certDER []byte) (*parsedEK, error) {
	body, rest, ok := cut2B(public)
	if !ok || len(rest) != 0 || len(body) == 0 {
		return nil, fmt.Errorf("%w: EK public area is not a TPM2B_PUBLIC", ErrEKNotTrusted)
	}
	pub, err := safeUnmarshalPublic(body)
	if err != nil {
		return nil, fmt.Errorf("%w: EK public area: %w", ErrEKNotTrusted, err)
	}
	if again, err := safeMarshal(pub); err != nil || !bytes.Equal(again, body) {
		return nil, fmt.Errorf("%w: EK public area is not canonical", ErrEKNotTrusted)
	}
	tmpl, err := ekTemplateFor(pub)
	if err != nil || !isTemplate(pub, tmpl) {
		return nil, fmt.Errorf("%w: EK public area is not the TCG EK template (ECC P-256 or RSA 2048)", ErrEKNotTrusted)
	}
	name, err := objectName(pub)
	if err != nil {
		return nil, fmt.Errorf("%w: EK Name: %w", ErrEKNotTrusted, err)
	}
	cert, err := x509.ParseCertificate(certDER)
	if err != nil {
		return nil, fmt.Errorf("%w: EK certificate: %w", ErrEKNotTrusted, err)
	}
	if err := sameKey(pub, cert); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrEKNotTrusted, err)
	}
	return &parsedEK{pub: pub, pubBody: body, name: name, cert: cert}, nil
}

// sameKey checks that cert certifies the key in pub.
func sameKey(pub *tpm2.TPMTPublic, cert *x509.Certificate) error {
	switch pub.Type {
	case tpm2.TPMAlgECC:
		pt, err := pub.Unique.ECC()
		if err != nil {
			return err
		}
		k, ok := cert.PublicKey.(*ecdsa.PublicKey)
		if !ok || k.Curve != elliptic.P256() || len(pt.X.Buffer) > 32 || len(pt.Y.Buffer) > 32 {
			return errors.New("the EK certificate's key is not ECC P-256")
		}
		got, err := k.Bytes()
		if err != nil {
			return err
		}
		want := make([]byte, 65) // 0x04 || X || Y, coordinates left-padded to 32 bytes
		want[0] = 4
		copy(want[33-len(pt.X.Buffer):33], pt.X.Buffer)
		copy(want[65-len(pt.Y.Buffer):], pt.Y.Buffer)
		if !bytes.Equal(got, want) {
			return errors.New("the EK certificate certifies another key than this EK")
		}
	case tpm2.TPMAlgRSA:
		n, err := pub.Unique.RSA()
		if err != nil {
			return err
		}
		k, ok := cert.PublicKey.(*rsa.PublicKey)
		if !ok {
			return errors.New("the EK certificate's key is not RSA")
		}
		parms, err := pub.Parameters.RSADetail()
		if err != nil {
			return err
		}
		e := int(parms.Exponent)
		if e == 0 {
			e = 65537
		}
		if len(n.Buffer) != int(parms.KeyBits)/8 {
			return errors.New("the EK's modulus is not as long as its key size")
		}
		if k.N.Cmp(new(big.Int).SetBytes(n.Buffer)) != 0 || k.E != e {
			return errors.New("the EK certificate certifies another key than this EK")
		}
	default:
		return errors.New("EK is neither ECC nor RSA")
	}
	return nil
}

// oidSubjectAltName is the SAN extension. TCG EK certificates carry the TPM
// manufacturer, model and version in a critical SAN of directoryName form only, which
// crypto/x509 leaves in UnhandledCriticalExtensions.
var oidSubjectAltName = asn1.ObjectIdentifier{2, 5, 29, 17}

// onlyDirectoryNames reports whether c's subjectAltName holds directoryName entries
// only (GeneralName tag [4]), the form TCG EK certificates use for the TPM's
// manufacturer, model and version.
func onlyDirectoryNames(c *x509.Certificate) bool {
	for _, e := range c.Extensions {
		if !e.Id.Equal(oidSubjectAltName) {
			continue
		}
		var names []asn1.RawValue
		rest, err := asn1.Unmarshal(e.Value, &names)
		if err != nil || len(rest) != 0 || len(names) == 0 {
			return false
		}
		for _, n := range names {
			if n.Class != asn1.ClassContextSpecific || n.Tag != 4 || !n.IsCompound {
				return false
			}
		}
		return true
	}
	return false
}

// EKTrust is the set of certificates EK certificates must chain to.
type EKTrust struct {
	roots, intermediates *x509.CertPool
}

// ParseEKTrust reads PEM certificates: self-signed ones become roots, the others
// intermediates (the manufacturer's issuing CAs, which TPMs often do not store).
func ParseEKTrust(pemBytes []byte) (*EKTrust, error) {
	t := &EKTrust{roots: x509.NewCertPool(), intermediates: x509.NewCertPool()}
	n := 0
	for rest := pemBytes; ; {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("tpm: EK roots: %w", err)
		}
		if bytes.Equal(c.RawSubject, c.RawIssuer) && c.CheckSignatureFrom(c) == nil {
			t.roots.AddCert(c)
			n++
		} else {
			t.intermediates.AddCert(c)
		}
	}
	if n == 0 {
		return nil, errors.New("tpm: EK roots: no self-signed CA certificate in the file")
	}
	return t, nil
}

// verify checks that ek's certificate chains to t.
func (t *EKTrust) verify(ek *parsedEK) error {
	c := *ek.cert
	var unhandled []asn1.ObjectIdentifier
	for _, oid := range c.UnhandledCriticalExtensions {
		if !oid.Equal(oidSubjectAltName) || !onlyDirectoryNames(&c) {
			unhandled = append(unhandled, oid)
		}
	}
	c.UnhandledCriticalExtensions = unhandled
	_, err := c.Verify(x509.VerifyOptions{
		Roots:         t.roots,
		Intermediates: t.intermediates,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		return fmt.Errorf("%w: EK certificate: %w", ErrEKNotTrusted, err)
	}
	return nil
}

// NodeEK is the EK in a node's public file, verified.
type NodeEK struct {
	// Name is the EK's TPM Name.
	Name []byte
	// SRKName is the Name of the SRK in the same file, which VerifyNodeEK checked is
	// the TCG SRK template; ImportBlobForEK makes blobs for that SRK only.
	SRKName []byte
	// Serial (hex) and Issuer are the EK certificate's, for the ceremony to print
	// (EK certificates usually have an empty subject).
	Serial, Issuer string
	ek             *parsedEK
}

// VerifyNodeEK reads the EK blocks of a node's public file (what `hwkms tpm
// export-srk --ek` writes: the SRK, then "TPM2B PUBLIC EK" and "CERTIFICATE"),
// checks that the certificate certifies that EK and chains to trust, and that the
// SRK in the same file is the TCG SRK template (see the comment at the top of this
// file for why). It fails with ErrEKNotTrusted.
func VerifyNodeEK(file []byte, trust *EKTrust) (*NodeEK, error) {
	srk, srkPub, err := ParseSRKPublic(file)
	if err != nil {
		return nil, err
	}
	if !isTemplate(srkPub, srkTemplate) {
		return nil, fmt.Errorf("%w: the SRK public area is not the TCG ECC P-256 SRK template", ErrEKNotTrusted)
	}
	var public, cert []byte
	for rest := file; ; {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			break
		}
		switch blk.Type {
		case ekPEMType:
			if public != nil {
				return nil, fmt.Errorf("%w: two EK public areas", ErrEKNotTrusted)
			}
			public = blk.Bytes
		case ekCertPEMType:
			if cert != nil {
				return nil, fmt.Errorf("%w: two EK certificates", ErrEKNotTrusted)
			}
			cert = blk.Bytes
		}
	}
	if public == nil || cert == nil {
		return nil, fmt.Errorf("%w: the file has no EK public area and certificate (export it with `hwkms tpm export-srk --ek`)", ErrEKNotTrusted)
	}
	ek, err := parseEK(public, cert)
	if err != nil {
		return nil, err
	}
	if err := trust.verify(ek); err != nil {
		return nil, err
	}
	return &NodeEK{Name: ek.name, SRKName: srk.Name, Serial: ek.cert.SerialNumber.Text(16), Issuer: ek.cert.Issuer.String(), ek: ek}, nil
}

// importV2 is the format version of an EK-bound import blob.
const importV2 = 0x02

// ImportBlobForEK is ImportBlob bound to a node's EK (from VerifyNodeEK): the
// duplicate and its seed are sealed with AES-256-GCM under a fresh key K, and K is
// protected by tpm2.CreateCredential to the EK for the SRK's Name, so only
// TPM2_ActivateCredential in that TPM, with that SRK, recovers them. The blob is:
//
//	"HWKI" 0x02 | TPM2B_PUBLIC (KEK) | TPM2B_NAME (parent SRK) |
//	TPM2B_PUBLIC (EK) | TPM2B_ID_OBJECT | TPM2B_ENCRYPTED_SECRET (credential) |
//	TPM2B (12-byte nonce || AES-256-GCM(K, TPM2B_PRIVATE duplicate || TPM2B_ENCRYPTED_SECRET inSymSeed))
//
// with everything before the last field as GCM additional data.
func (m *KEKMaterial) ImportBlobForEK(parent []byte, node *NodeEK) ([]byte, error) {
	if node == nil || node.ek == nil {
		return nil, errors.New("tpm: EK-bound import blob: no verified EK")
	}
	srkName, dup, seed, err := m.duplicateFor(parent)
	if err != nil {
		return nil, err
	}
	if !bytes.Equal(srkName, node.SRKName) {
		return nil, fmt.Errorf("%w: the SRK is not the one VerifyNodeEK checked with this EK", ErrEKNotTrusted)
	}
	ekKey, err := tpm2.ImportEncapsulationKey(node.ek.pub)
	if err != nil {
		return nil, fmt.Errorf("tpm: EK public: %w", err)
	}
	k := make([]byte, 32)
	defer clear(k)
	if _, err := rand.Read(k); err != nil {
		return nil, err
	}
	idObject, encSecret, err := tpm2.CreateCredential(rand.Reader, ekKey, srkName, k)
	if err != nil {
		return nil, fmt.Errorf("tpm: make credential: %w", err)
	}
	out, err := encodeImportBlob(importV2, tpm2.Marshal(m.pub), srkName, node.ek.pubBody, idObject, encSecret)
	if err != nil {
		return nil, err
	}
	inner, err := append2B(nil, dup)
	if err != nil {
		return nil, err
	}
	if inner, err = append2B(inner, seed); err != nil {
		return nil, err
	}
	aead, err := newGCM(k)
	if err != nil {
		return nil, err
	}
	nonce := make([]byte, aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	sealed := aead.Seal(nonce, nonce, inner, out)
	return append2B(out, sealed)
}

func newGCM(k []byte) (cipher.AEAD, error) {
	block, err := aes.NewCipher(k)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// ekBinding is the EK part of a parsed version 2 import blob.
type ekBinding struct {
	pub       *tpm2.TPMTPublic
	name      []byte
	idObject  []byte
	encSecret []byte
	sealed    []byte // nonce || GCM ciphertext
	aad       []byte
}

// parseEKBinding parses the fields after the parent Name of a version 2 blob (f:
// EK public, ID object, encrypted secret, sealed) whose header is aad.
func parseEKBinding(f [][]byte, aad []byte) (*ekBinding, error) {
	pub, err := safeUnmarshalPublic(f[0])
	if err != nil {
		return nil, fmt.Errorf("%w: EK public area: %w", errMalformed, err)
	}
	if again, err := safeMarshal(pub); err != nil || !bytes.Equal(again, f[0]) {
		return nil, fmt.Errorf("%w: EK public area is not canonical", errMalformed)
	}
	if tmpl, err := ekTemplateFor(pub); err != nil || !isTemplate(pub, tmpl) {
		return nil, fmt.Errorf("%w: EK public area is not the TCG EK template", errMalformed)
	}
	name, err := objectName(pub)
	if err != nil {
		return nil, fmt.Errorf("%w: EK Name: %w", errMalformed, err)
	}
	if len(f[3]) < 12+16 {
		return nil, fmt.Errorf("%w: sealed duplicate too short", errMalformed)
	}
	return &ekBinding{pub: pub, name: name, idObject: f[1], encSecret: f[2], sealed: f[3], aad: aad}, nil
}

// activate recovers the duplicate and seed of an EK-bound blob in the TPM on c: it
// re-creates the EK, checks it is the one the blob names (else ErrWrongTPM), runs
// TPM2_ActivateCredential with the SRK (ADMIN role, empty auth) and the EK (USER role,
// PolicySecret on the endorsement hierarchy), and opens the sealed fields with K.
func activate(c *conn, srk primaryObject, b *ekBinding) (duplicate, seed []byte, err error) {
	tmpl, err := ekTemplateFor(b.pub)
	if err != nil {
		return nil, nil, err
	}
	ek, err := createEK(c, tmpl)
	if err != nil {
		return nil, nil, err
	}
	defer flushHandle(c, ek.Handle)
	if !bytes.Equal(ek.Name.Buffer, b.name) {
		return nil, nil, fmt.Errorf("blob is bound to EK %x, this TPM's EK is %x: %w", b.name, ek.Name.Buffer, ErrWrongTPM)
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
		CredentialBlob: tpm2.TPM2BIDObject{Buffer: b.idObject},
		Secret:         tpm2.TPM2BEncryptedSecret{Buffer: b.encSecret},
	}.Execute(c)
	if err != nil {
		return nil, nil, fmt.Errorf("TPM2_ActivateCredential: %w", tpmCall(err))
	}
	k := rsp.CertInfo.Buffer
	defer clear(k)
	aead, err := newGCM(k)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: credential is not an AES-256 key", errMalformed)
	}
	ns := aead.NonceSize()
	inner, err := aead.Open(nil, b.sealed[:ns], b.sealed[ns:], b.aad)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: sealed duplicate does not authenticate", errMalformed)
	}
	dup, rest, ok := cut2B(inner)
	s, rest2, ok2 := cut2B(rest)
	if !ok || !ok2 || len(rest2) != 0 || len(dup) == 0 || len(s) == 0 {
		return nil, nil, fmt.Errorf("%w: sealed duplicate", errMalformed)
	}
	return dup, s, nil
}
