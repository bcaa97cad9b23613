package swtpmtest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"math/big"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/hwkms/hwkms/tpm/swtpm"
)

// EKCA is a test certificate authority that issues EK certificates, as a TPM
// manufacturer does at production: a self-signed root and an issuing CA under it.
type EKCA struct {
	// PEM holds the root and the issuing CA certificates, as an operator's trust
	// file for `hwkms key create --ek-roots` would.
	PEM []byte
	// Root is the self-signed root.
	Root *x509.Certificate

	issuer    *x509.Certificate
	issuerKey *ecdsa.PrivateKey
}

// NewEKCA makes a root and an issuing CA with fresh P-256 keys.
func NewEKCA(t testing.TB, name string) *EKCA {
	t.Helper()
	rootKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	root := caCert(t, &x509.Certificate{Subject: pkix.Name{CommonName: name + " EK Root CA"}}, nil, &rootKey.PublicKey, rootKey)
	issuerKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	issuer := caCert(t, &x509.Certificate{Subject: pkix.Name{CommonName: name + " EK Issuing CA"}}, root, &issuerKey.PublicKey, rootKey)
	p := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: root.Raw})
	p = append(p, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: issuer.Raw})...)
	return &EKCA{PEM: p, Root: root, issuer: issuer, issuerKey: issuerKey}
}

func caCert(t testing.TB, tmpl, parent *x509.Certificate, pub *ecdsa.PublicKey, signer *ecdsa.PrivateKey) *x509.Certificate {
	t.Helper()
	tmpl.SerialNumber = serial(t)
	tmpl.NotBefore, tmpl.NotAfter = time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour)
	tmpl.IsCA, tmpl.BasicConstraintsValid = true, true
	tmpl.KeyUsage = x509.KeyUsageCertSign
	if parent == nil {
		parent = tmpl
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func serial(t testing.TB) *big.Int {
	t.Helper()
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// EK certificate NV indices (TCG EK Credential Profile for TPM 2.0, low range).
const (
	ekCertIndexRSA = 0x01C00002
	ekCertIndexECC = 0x01C0000A
)

// ProvisionEK does what TPM manufacturing does: it creates the TPM's EK from the TCG
// template (ECC P-256, or RSA 2048 if rsaEK), issues it a certificate from ca shaped
// like a real one (a critical subjectAltName holding only the TPM manufacturer, model
// and version as a directoryName, and the tcg-kp-EKCertificate extended key usage),
// and stores the DER certificate in the EK certificate NV index under platform
// authorisation. It returns the certificate.
func (ca *EKCA) ProvisionEK(t testing.TB, sim *swtpm.Sim, rsaEK bool) *x509.Certificate {
	t.Helper()
	tpm := dialSim(t, sim)
	defer tpm.Close()

	tmpl, index := tpm2.ECCEKTemplate, tpm2.TPMHandle(ekCertIndexECC)
	if rsaEK {
		tmpl, index = tpm2.RSAEKTemplate, tpm2.TPMHandle(ekCertIndexRSA)
	}
	ek, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
		InPublic:      tpm2.New2B(tmpl),
	}.Execute(tpm)
	if err != nil {
		t.Fatalf("create EK: %v", err)
	}
	defer tpm2.FlushContext{FlushHandle: ek.ObjectHandle}.Execute(tpm) //nolint:errcheck // test TPM
	pub, err := ek.OutPublic.Contents()
	if err != nil {
		t.Fatal(err)
	}
	var key any
	if rsaEK {
		n, err := pub.Unique.RSA()
		if err != nil {
			t.Fatal(err)
		}
		key = &rsa.PublicKey{N: new(big.Int).SetBytes(n.Buffer), E: 65537}
	} else {
		pt, err := pub.Unique.ECC()
		if err != nil {
			t.Fatal(err)
		}
		key = &ecdsa.PublicKey{Curve: elliptic.P256(), X: new(big.Int).SetBytes(pt.X.Buffer), Y: new(big.Int).SetBytes(pt.Y.Buffer)}
	}
	tmplCert := &x509.Certificate{
		SerialNumber:       serial(t),
		NotBefore:          time.Now().Add(-time.Hour),
		NotAfter:           time.Now().Add(24 * time.Hour),
		KeyUsage:           x509.KeyUsageKeyEncipherment,
		UnknownExtKeyUsage: []asn1.ObjectIdentifier{{2, 23, 133, 8, 1}},
		ExtraExtensions:    []pkix.Extension{tpmSAN(t)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmplCert, ca.issuer, key, ca.issuerKey)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	writeNV(t, tpm, index, der)
	return cert
}

// tpmSAN is a critical subjectAltName whose only name is a directoryName with the
// TCG TPM manufacturer, model and version attributes.
func tpmSAN(t testing.TB) pkix.Extension {
	t.Helper()
	rdn, err := asn1.Marshal(pkix.RDNSequence{{
		{Type: asn1.ObjectIdentifier{2, 23, 133, 2, 1}, Value: "id:53575450"}, // "SWTP"
		{Type: asn1.ObjectIdentifier{2, 23, 133, 2, 2}, Value: "swtpm"},
		{Type: asn1.ObjectIdentifier{2, 23, 133, 2, 3}, Value: "id:20191023"},
	}})
	if err != nil {
		t.Fatal(err)
	}
	names, err := asn1.Marshal([]asn1.RawValue{{Class: asn1.ClassContextSpecific, Tag: 4, IsCompound: true, Bytes: rdn}})
	if err != nil {
		t.Fatal(err)
	}
	return pkix.Extension{Id: asn1.ObjectIdentifier{2, 5, 29, 17}, Critical: true, Value: names}
}

// writeNV defines index with platform authorisation and writes data into it.
func writeNV(t testing.TB, tpm transport.TPM, index tpm2.TPMHandle, data []byte) {
	t.Helper()
	platform := tpm2.AuthHandle{Handle: tpm2.TPMRHPlatform, Auth: tpm2.PasswordAuth(nil)}
	_, err := tpm2.NVDefineSpace{
		AuthHandle: platform,
		PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{
			NVIndex: index,
			NameAlg: tpm2.TPMAlgSHA256,
			Attributes: tpm2.TPMANV{
				PPWrite: true, PPRead: true, OwnerRead: true, AuthRead: true,
				NoDA: true, PlatformCreate: true, NT: tpm2.TPMNTOrdinary,
			},
			DataSize: uint16(len(data)),
		}),
	}.Execute(tpm)
	if err != nil {
		t.Fatalf("define EK certificate NV index: %v", err)
	}
	rp, err := tpm2.NVReadPublic{NVIndex: index}.Execute(tpm)
	if err != nil {
		t.Fatal(err)
	}
	for off := 0; off < len(data); off += 512 {
		end := min(off+512, len(data))
		_, err := tpm2.NVWrite{
			AuthHandle: platform,
			NVIndex:    tpm2.NamedHandle{Handle: index, Name: rp.NVName},
			Data:       tpm2.TPM2BMaxNVBuffer{Buffer: data[off:end]},
			Offset:     uint16(off),
		}.Execute(tpm)
		if err != nil {
			t.Fatalf("write EK certificate: %v", err)
		}
	}
}

// dialSim opens a connection to sim's command channel. swtpm serves one connection
// at a time: close it before anything else talks to the TPM.
func dialSim(t testing.TB, sim *swtpm.Sim) transport.TPMCloser {
	t.Helper()
	network, addr := "unix", strings.TrimPrefix(sim.Device, "unix://")
	if a, ok := strings.CutPrefix(sim.Device, "tcp://"); ok {
		network, addr = "tcp", a
	}
	c, err := net.DialTimeout(network, addr, 10*time.Second)
	if err != nil {
		t.Fatalf("dial swtpm: %v", err)
	}
	return transport.FromReadWriteCloser(c)
}
