package provision

import (
	"bytes"
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

	"github.com/hwkms/hwkms/tpm/internal/wire"
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

// PEM block types of a node's public file beside the SRK's "TPM2B PUBLIC".
const (
	ekPEMType     = "TPM2B PUBLIC EK"
	ekCertPEMType = "CERTIFICATE"
)

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

// ParseEKPublic checks that public (a TPM2B_PUBLIC) is a TCG EK template and that
// the DER certificate certifies that key, and returns them with the EK's Name. It
// does not check who issued the certificate (VerifyNodeEK does). It fails with
// ErrEKNotTrusted.
func ParseEKPublic(public, certDER []byte) (EKPublic, error) {
	ek, err := parseEK(public, certDER)
	if err != nil {
		return EKPublic{}, err
	}
	return EKPublic{Public: bytes.Clone(public), Cert: bytes.Clone(certDER), Name: ek.name}, nil
}

// EncodePEM returns the EK public area and certificate as the PEM blocks
// "TPM2B PUBLIC EK" and "CERTIFICATE", to append to the SRK's block.
func (e EKPublic) EncodePEM() []byte {
	b := pem.EncodeToMemory(&pem.Block{Type: ekPEMType, Bytes: e.Public})
	return append(b, pem.EncodeToMemory(&pem.Block{Type: ekCertPEMType, Bytes: e.Cert})...)
}

// EKTemplate returns the TCG EK template of pub's type (ECC P-256 or RSA 2048).
func EKTemplate(pub *tpm2.TPMTPublic) (tpm2.TPMTPublic, error) {
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
	a, err1 := wire.SafeMarshal(&cp)
	b, err2 := wire.SafeMarshal(&tmpl)
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
	body, rest, ok := wire.Cut2B(public)
	if !ok || len(rest) != 0 || len(body) == 0 {
		return nil, fmt.Errorf("%w: EK public area is not a TPM2B_PUBLIC", ErrEKNotTrusted)
	}
	pub, err := wire.SafeUnmarshalPublic(body)
	if err != nil {
		return nil, fmt.Errorf("%w: EK public area: %w", ErrEKNotTrusted, err)
	}
	if again, err := wire.SafeMarshal(pub); err != nil || !bytes.Equal(again, body) {
		return nil, fmt.Errorf("%w: EK public area is not canonical", ErrEKNotTrusted)
	}
	tmpl, err := EKTemplate(pub)
	if err != nil || !isTemplate(pub, tmpl) {
		return nil, fmt.Errorf("%w: EK public area is not the TCG EK template (ECC P-256 or RSA 2048)", ErrEKNotTrusted)
	}
	name, err := wire.ObjectName(pub)
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
	if !isTemplate(srkPub, wire.SRKTemplate) {
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
	out, err := encodeImportBlob(ImportV2, tpm2.Marshal(m.pub), srkName, node.ek.pubBody, idObject, encSecret)
	if err != nil {
		return nil, err
	}
	inner, err := wire.Append2B(nil, dup)
	if err != nil {
		return nil, err
	}
	if inner, err = wire.Append2B(inner, seed); err != nil {
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
	return wire.Append2B(out, sealed)
}
