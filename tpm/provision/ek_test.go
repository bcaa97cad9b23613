package provision_test

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/hwkms/hwkms/tpm"
	"github.com/hwkms/hwkms/tpm/provision"
	"github.com/hwkms/hwkms/tpm/swtpm/swtpmtest"
)

// ekNode is what `hwkms tpm export-srk --ek` exports from a swtpm whose EK has a
// certificate from a test manufacturer CA.
type ekNode struct {
	srk  provision.SRKPublic
	ek   provision.EKPublic
	file []byte
}

func newEKNode(t *testing.T, ca *swtpmtest.EKCA, rsaEK bool) *ekNode {
	t.Helper()
	sim := swtpmtest.New(t)
	ca.ProvisionEK(t, sim, rsaEK)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	srk, err := tpm.ExportSRK(ctx, sim.Device)
	if err != nil {
		t.Fatal(err)
	}
	ek, err := tpm.ExportEK(ctx, sim.Device)
	if err != nil {
		t.Fatalf("ExportEK: %v", err)
	}
	return &ekNode{srk: srk, ek: ek, file: append(srk.EncodeSRKPEM(), ek.EncodePEM()...)}
}

func newMaterial(t *testing.T) *provision.KEKMaterial {
	t.Helper()
	m, err := provision.NewKEKMaterial(nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Destroy)
	return m
}

// TestVerifyNodeEKRefuses: every reason not to trust a node file.
func TestVerifyNodeEKRefuses(t *testing.T) {
	ca := swtpmtest.NewEKCA(t, "Test TPM Manufacturer")
	other := swtpmtest.NewEKCA(t, "Someone Else")
	trust, err := provision.ParseEKTrust(ca.PEM)
	if err != nil {
		t.Fatal(err)
	}
	otherTrust, err := provision.ParseEKTrust(other.PEM)
	if err != nil {
		t.Fatal(err)
	}
	a, b := newEKNode(t, ca, false), newEKNode(t, ca, true)

	rootOnly, err := provision.ParseEKTrust(ca.PEM[:bytes.Index(ca.PEM, []byte("-----END CERTIFICATE-----"))+len("-----END CERTIFICATE-----\n")])
	if err != nil {
		t.Fatal(err)
	}
	notTemplate := func() []byte {
		_, pub, err := provision.ParseSRKPublic(a.srk.Public)
		if err != nil {
			t.Fatal(err)
		}
		pub.ObjectAttributes.AdminWithPolicy = true // ADMIN role by policy: the look-alike defence needs it clear
		p := provision.SRKPublic{Public: tpm2.Marshal(tpm2.New2B(*pub))}
		return append(p.EncodeSRKPEM(), a.ek.EncodePEM()...)
	}()
	swapped := provision.EKPublic{Public: b.ek.Public, Cert: a.ek.Cert}
	for _, tc := range []struct {
		name  string
		file  []byte
		trust *provision.EKTrust
		want  string
	}{
		{"another manufacturer's CA", a.file, otherTrust, "certificate signed by unknown authority"},
		{"issuing CA missing from the trust file", a.file, rootOnly, "certificate signed by unknown authority"},
		{"no EK in the file", a.srk.EncodeSRKPEM(), trust, "no EK public area"},
		{"certificate of another EK", append(a.srk.EncodeSRKPEM(), swapped.EncodePEM()...), trust, "not RSA"},
		{"SRK not the TCG template", notTemplate, trust, "SRK public area is not the TCG"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := provision.VerifyNodeEK(tc.file, tc.trust)
			if !errors.Is(err, provision.ErrEKNotTrusted) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("provision.VerifyNodeEK = %v, want provision.ErrEKNotTrusted mentioning %q", err, tc.want)
			}
		})
	}
	// An EK public area that is not the TCG template (here: not restricted, so it could
	// decrypt the credential outside TPM2_ActivateCredential) with its own point and
	// certificate: refused before the certificate matters.
	_, ekPub, err := provision.ParseSRKPublic(a.srk.Public) // any public area to start from
	if err != nil {
		t.Fatal(err)
	}
	loose := tpm2.ECCEKTemplate
	loose.ObjectAttributes.Restricted = false
	loose.Unique = ekPub.Unique
	looseEK := provision.EKPublic{Public: tpm2.Marshal(tpm2.New2B(loose)), Cert: a.ek.Cert}
	if _, err := provision.VerifyNodeEK(append(a.srk.EncodeSRKPEM(), looseEK.EncodePEM()...), trust); !errors.Is(err, provision.ErrEKNotTrusted) || !strings.Contains(err.Error(), "not the TCG EK template") {
		t.Errorf("provision.VerifyNodeEK with a non-template EK = %v", err)
	}
	// A verified EK does not lend its trust to another SRK.
	node, err := provision.VerifyNodeEK(a.file, trust)
	if err != nil {
		t.Fatal(err)
	}
	m := newMaterial(t)
	if _, err := m.ImportBlobForEK(b.srk.EncodeSRKPEM(), node); !errors.Is(err, provision.ErrEKNotTrusted) {
		t.Errorf("ImportBlobForEK with another SRK than the verified one = %v, want provision.ErrEKNotTrusted", err)
	}
	if _, err := provision.ParseEKTrust(a.ek.EncodePEM()); err == nil {
		t.Error("provision.ParseEKTrust accepted a file without a self-signed CA")
	}
}

// TestImportBlobForEK: a blob bound to a verified EK names that EK and the SRK,
// parses as version 2, and its sealed part opens only with the credential the TPM
// would release (any other key is refused without a panic). Activation itself is
// package tpm's (TestEKBoundImport, on swtpm).
func TestImportBlobForEK(t *testing.T) {
	ca := swtpmtest.NewEKCA(t, "Test TPM Manufacturer")
	trust, err := provision.ParseEKTrust(ca.PEM)
	if err != nil {
		t.Fatal(err)
	}
	a := newEKNode(t, ca, false)
	node, err := provision.VerifyNodeEK(a.file, trust)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(node.Name, a.ek.Name) || !bytes.Equal(node.SRKName, a.srk.Name) || node.Serial == "" || node.Issuer == "" {
		t.Errorf("VerifyNodeEK = %+v; want EK %x, SRK %x, serial and issuer", node, a.ek.Name, a.srk.Name)
	}
	m := newMaterial(t)
	blob, err := m.ImportBlobForEK(a.file, node)
	if err != nil {
		t.Fatal(err)
	}
	info, err := provision.InspectImportBlob(blob)
	if err != nil || info.KeyID != m.KeyID() || !bytes.Equal(info.EKName, a.ek.Name) || !bytes.Equal(info.ParentName, a.srk.Name) {
		t.Fatalf("InspectImportBlob = %+v, %v", info, err)
	}
	b, err := provision.ParseBlob(blob)
	if err != nil || blob[4] != provision.ImportV2 || b.EK == nil || b.Duplicate != nil {
		t.Fatalf("ParseBlob = %+v, %v; want a version 2 blob with its duplicate sealed", b, err)
	}
	for _, k := range [][]byte{make([]byte, 32), make([]byte, 16), make([]byte, 5)} {
		if _, _, err := b.EK.Open(k); err == nil {
			t.Errorf("EKBinding.Open with a %d-byte key of zeros succeeded", len(k))
		}
	}
	if _, err := m.ImportBlobForEK(a.file, nil); err == nil {
		t.Error("ImportBlobForEK without a verified EK succeeded")
	}
}
