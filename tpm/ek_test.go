package tpm

import (
	"bytes"
	"crypto/ecdh"
	"crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"github.com/hwkms/hwkms/tpm/internal/wire"
	"github.com/hwkms/hwkms/tpm/provision"
	"github.com/hwkms/hwkms/tpm/swtpm"
	"github.com/hwkms/hwkms/tpm/swtpm/swtpmtest"
)

// ekNode is a swtpm whose EK has a certificate from a test manufacturer CA, and the
// public file `hwkms tpm export-srk --ek` would write for it.
type ekNode struct {
	sim  *swtpm.Sim
	srk  provision.SRKPublic
	ek   provision.EKPublic
	file []byte
}

func newEKNode(t *testing.T, ca *swtpmtest.EKCA, rsaEK bool) *ekNode {
	t.Helper()
	sim := swtpmtest.New(t)
	ca.ProvisionEK(t, sim, rsaEK)
	srk, err := ExportSRK(testCtx(t), sim.Device)
	if err != nil {
		t.Fatal(err)
	}
	ek, err := ExportEK(testCtx(t), sim.Device)
	if err != nil {
		t.Fatalf("ExportEK: %v", err)
	}
	assertNoHandles(t, sim)
	return &ekNode{sim: sim, srk: srk, ek: ek, file: append(srk.EncodeSRKPEM(), ek.EncodePEM()...)}
}

// newEKTrust makes a test manufacturer CA and the trust its certificates give.
func newEKTrust(t *testing.T) (*swtpmtest.EKCA, *provision.EKTrust) {
	t.Helper()
	ca := swtpmtest.NewEKCA(t, "Test TPM Manufacturer")
	trust, err := provision.ParseEKTrust(ca.PEM)
	if err != nil {
		t.Fatal(err)
	}
	return ca, trust
}

// newMaterial makes an imported-form KEK without auth, destroyed at cleanup.
func newMaterial(t *testing.T) *provision.KEKMaterial {
	t.Helper()
	m, err := provision.NewKEKMaterial(nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Destroy)
	return m
}

func (n *ekNode) cfg(t *testing.T) Config {
	return Config{Device: n.sim.Device, BlobFile: filepath.Join(t.TempDir(), "kek.blob")}
}

// TestEKBoundImport: blobs bound to each node's certified EK import on that node
// (ECC and RSA EKs) and nowhere else, and the nodes then share the KEK.
func TestEKBoundImport(t *testing.T) {
	ca, trust := newEKTrust(t)
	a, b, c := newEKNode(t, ca, false), newEKNode(t, ca, true), newEKNode(t, ca, false)
	m := newMaterial(t)

	blobFor := func(file []byte) []byte {
		t.Helper()
		node, err := provision.VerifyNodeEK(file, trust)
		if err != nil {
			t.Fatalf("provision.VerifyNodeEK: %v", err)
		}
		blob, err := m.ImportBlobForEK(file, node)
		if err != nil {
			t.Fatalf("ImportBlobForEK: %v", err)
		}
		info, err := provision.InspectImportBlob(blob)
		if err != nil || info.KeyID != m.KeyID() || !bytes.Equal(info.EKName, node.Name) {
			t.Fatalf("provision.InspectImportBlob = %+v, %v; want key_id %s and EK %x", info, err, m.KeyID(), node.Name)
		}
		return blob
	}

	blobs := map[*ekNode][]byte{}
	cfgs := map[*ekNode]Config{}
	for _, n := range []*ekNode{a, b} {
		blob := blobFor(n.file)
		blobs[n] = blob
		cfg := n.cfg(t)
		info, err := ImportKey(testCtx(t), cfg, blob)
		if err != nil {
			t.Fatalf("ImportKey of an EK-bound blob on its own TPM: %v", err)
		}
		if info.KeyID != m.KeyID() {
			t.Fatalf("imported key_id %s, want %s", info.KeyID, m.KeyID())
		}
		assertNoHandles(t, n.sim) // the EK, the SRK and the KEK were flushed
		cfgs[n] = cfg
	}

	// A's blob on C: another SRK.
	if _, err := ImportKey(testCtx(t), c.cfg(t), blobs[a]); !errors.Is(err, ErrWrongTPM) {
		t.Errorf("ImportKey of A's blob on C = %v, want ErrWrongTPM", err)
	}
	// C's SRK with A's certified EK (a file put together from two TPMs): the ceremony
	// cannot tell, but neither TPM can import the blob.
	mixed := append(c.srk.EncodeSRKPEM(), a.ek.EncodePEM()...)
	blob := blobFor(mixed)
	for name, n := range map[string]*ekNode{"C (its SRK, another EK)": c, "A (its EK, another SRK)": a} {
		cfg := n.cfg(t)
		if _, err := ImportKey(testCtx(t), cfg, blob); !errors.Is(err, ErrWrongTPM) {
			t.Errorf("ImportKey of the mixed blob on %s = %v, want ErrWrongTPM", name, err)
		}
		if _, err := os.Stat(cfg.BlobFile); err == nil {
			t.Errorf("a failed import on %s wrote a blob file", name)
		}
		assertNoHandles(t, n.sim)
	}

	// Last, since a KEK holds its swtpm's one connection: the nodes share the KEK.
	crossUnwrap(t, []*KEK{openKEK(t, a.sim, cfgs[a]), openKEK(t, b.sim, cfgs[b])})
}

// TestEKBoundImportLookalikeSRK is the attack EK binding exists for: a node file
// with a genuine, certified EK but an SRK whose private key the attacker holds in
// software. The ceremony cannot tell the SRK apart offline; the attacker, with the
// genuine TPM in hand, loads the look-alike SRK's public area (TPM2_LoadExternal)
// and asks for the credential. The TPM must refuse, so the sealed duplicate stays
// sealed.
func TestEKBoundImportLookalikeSRK(t *testing.T) {
	ca, trust := newEKTrust(t)
	victim := newEKNode(t, ca, false)
	priv, err := ecdh.P256().GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	fake, err := srkShaped(t, priv.PublicKey()) // the SRK template with the attacker's point
	if err != nil {
		t.Fatal(err)
	}
	file := append(fake.EncodeSRKPEM(), victim.ek.EncodePEM()...)
	node, err := provision.VerifyNodeEK(file, trust)
	if err != nil {
		t.Fatalf("provision.VerifyNodeEK of the look-alike: %v (the offline checks cannot catch it; the TPM must)", err)
	}
	m := newMaterial(t)
	blob, err := m.ImportBlobForEK(file, node)
	if err != nil {
		t.Fatal(err)
	}
	ib, err := provision.ParseBlob(blob)
	if err != nil {
		t.Fatal(err)
	}
	_, fakePub, err := provision.ParseSRKPublic(fake.EncodeSRKPEM())
	if err != nil {
		t.Fatal(err)
	}
	withConn(t, victim.sim, func(c *conn) {
		// With its private key the look-alike does not load at all: an external
		// object with a sensitive area must have fixedTPM and fixedParent clear.
		sens := tpm2.TPMTSensitive{
			SensitiveType: tpm2.TPMAlgECC,
			Sensitive:     tpm2.NewTPMUSensitiveComposite(tpm2.TPMAlgECC, &tpm2.TPM2BECCParameter{Buffer: priv.Bytes()}),
		}
		if ext, err := (tpm2.LoadExternal{InPublic: tpm2.New2B(*fakePub), InPrivate: tpm2.New2B(sens), Hierarchy: tpm2.TPMRHNull}).Execute(c); err == nil {
			flushHandle(c, ext.ObjectHandle)
			t.Fatal("TPM2_LoadExternal loaded a fixedTPM object with its private area")
		} else if !errors.Is(err, tpm2.TPMRCAttributes) {
			t.Fatalf("TPM2_LoadExternal with the private area = %v, want TPM_RC_ATTRIBUTES", err)
		}
		ext, err := tpm2.LoadExternal{InPublic: tpm2.New2B(*fakePub), Hierarchy: tpm2.TPMRHNull}.Execute(c)
		if err != nil {
			t.Fatalf("TPM2_LoadExternal of the look-alike's public area: %v (expected to load; the defence is at activation)", err)
		}
		defer flushHandle(c, ext.ObjectHandle)
		if !bytes.Equal(ext.Name.Buffer, fake.Name) {
			t.Fatalf("loaded look-alike has Name %x, want %x", ext.Name.Buffer, fake.Name)
		}
		srk := primaryObject{NamedHandle: tpm2.NamedHandle{Handle: ext.ObjectHandle, Name: ext.Name}, pub: *fakePub}
		_, _, err = activate(c, srk, ib.EK)
		if !errors.Is(err, tpm2.TPMRCAuthUnavailable) {
			t.Fatalf("TPM2_ActivateCredential for a public-only look-alike SRK = %v, want TPM_RC_AUTH_UNAVAILABLE", err)
		}
		t.Logf("look-alike activation refused: %v", err)
	})
	assertNoHandles(t, victim.sim)
	if _, err := ImportKey(testCtx(t), victim.cfg(t), blob); !errors.Is(err, ErrWrongTPM) {
		t.Errorf("ImportKey of the look-alike's blob on the victim = %v, want ErrWrongTPM", err)
	}
}

// TestEKBoundBlobTampered: a changed byte anywhere in an EK-bound blob's sealed part
// or credential makes the import fail without writing anything; the escrow path
// refuses EK-bound blobs.
func TestEKBoundBlobTampered(t *testing.T) {
	ca, trust := newEKTrust(t)
	n := newEKNode(t, ca, false)
	node, err := provision.VerifyNodeEK(n.file, trust)
	if err != nil {
		t.Fatal(err)
	}
	m := newMaterial(t)
	blob, err := m.ImportBlobForEK(n.file, node)
	if err != nil {
		t.Fatal(err)
	}
	ib, err := provision.ParseBlob(blob)
	if err != nil {
		t.Fatal(err)
	}
	for name, off := range map[string]int{
		"sealed duplicate": len(blob) - 5,
		"GCM nonce":        bytes.Index(blob, ib.EK.Sealed) + 1,
		"credential":       bytes.Index(blob, ib.EK.IDObject) + 10,
		"KEK public area":  bytes.Index(blob, ib.PublicBytes) + 40,
	} {
		bad := bytes.Clone(blob)
		bad[off] ^= 0x01
		cfg := n.cfg(t)
		if _, err := ImportKey(testCtx(t), cfg, bad); err == nil {
			t.Errorf("ImportKey with a changed byte in the %s succeeded", name)
		} else {
			t.Logf("%s: %v", name, err)
		}
		if _, err := os.Stat(cfg.BlobFile); err == nil {
			t.Errorf("a failed import (%s) wrote a blob file", name)
		}
		assertNoHandles(t, n.sim)
	}
	// The header is GCM additional data: a blob whose KEK public area is swapped for
	// another (well-formed) imported KEK's fails authentication before the TPM sees it.
	other, err := provision.NewKEKMaterial(nil)
	if err != nil {
		t.Fatal(err)
	}
	otherBlob, err := other.ImportBlob(n.srk.EncodeSRKPEM())
	other.Destroy()
	if err != nil {
		t.Fatal(err)
	}
	otherIB, err := provision.ParseBlob(otherBlob)
	if err != nil {
		t.Fatal(err)
	}
	otherPub := otherIB.PublicBytes
	swapped := bytes.Replace(blob, ib.PublicBytes, otherPub, 1)
	if _, err := ImportKey(testCtx(t), n.cfg(t), swapped); err == nil || !strings.Contains(err.Error(), "does not authenticate") {
		t.Errorf("ImportKey with another KEK's public area = %v, want the GCM authentication failure", err)
	}
	// A non-template EK in a version 2 blob is malformed.
	loose := tpm2.ECCEKTemplate
	loose.ObjectAttributes.Restricted = false
	loose.Unique = ib.EK.Public.Unique
	if _, err := provision.ParseBlob(bytes.Replace(blob, tpm2.Marshal(ib.EK.Public), tpm2.Marshal(loose), 1)); !errors.Is(err, wire.ErrMalformed) {
		t.Errorf("parseImportBlob with a non-template EK = %v, want wire.ErrMalformed", err)
	}
	// The untampered blob still imports.
	if _, err := ImportKey(testCtx(t), n.cfg(t), blob); err != nil {
		t.Fatalf("ImportKey of the untampered blob: %v", err)
	}
	escrowKey, _, err := provision.NewEscrowKey()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := provision.RecoverKEKMaterial(blob, escrowKey); err == nil || !strings.Contains(err.Error(), "bound to a TPM's EK") {
		t.Errorf("provision.RecoverKEKMaterial of an EK-bound blob = %v", err)
	}
}

// srkShaped returns the TCG SRK template with k's point: what an attacker who holds
// k's private key in software would present as a node's SRK.
func srkShaped(t *testing.T, k *ecdh.PublicKey) (provision.SRKPublic, error) {
	t.Helper()
	raw := k.Bytes()
	p := wire.SRKTemplate
	p.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
		X: tpm2.TPM2BECCParameter{Buffer: bytes.Clone(raw[1:33])},
		Y: tpm2.TPM2BECCParameter{Buffer: bytes.Clone(raw[33:65])},
	})
	name, err := wire.ObjectName(&p)
	if err != nil {
		return provision.SRKPublic{}, err
	}
	return provision.SRKPublic{Public: tpm2.Marshal(tpm2.New2B(p)), Name: name}, nil
}

// TestExportEKWithoutCertificate: a TPM without an EK certificate in NV cannot
// export an EK, and nothing stays loaded.
func TestExportEKWithoutCertificate(t *testing.T) {
	bare := swtpmtest.New(t)
	if _, err := ExportEK(testCtx(t), bare.Device); err == nil || !strings.Contains(err.Error(), "no EK certificate") {
		t.Errorf("ExportEK without a certificate = %v", err)
	}
	assertNoHandles(t, bare)
}
