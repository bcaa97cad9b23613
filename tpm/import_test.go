package tpm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/tpm/internal/wire"
	"github.com/hwkms/hwkms/tpm/provision"
	"github.com/hwkms/hwkms/tpm/swtpm"
	"github.com/hwkms/hwkms/tpm/swtpm/swtpmtest"
)

// node is one simulated control-plane node: a swtpm and its KEK config.
type node struct {
	sim *swtpm.Sim
	srk []byte // exported SRK public area (PEM)
	cfg Config
}

// newNodes starts n swtpms and exports their SRKs.
func newNodes(t *testing.T, n int) []*node {
	t.Helper()
	nodes := make([]*node, n)
	for i := range nodes {
		sim := swtpmtest.New(t)
		srk, err := ExportSRK(testCtx(t), sim.Device)
		if err != nil {
			t.Fatalf("ExportSRK(node %d): %v", i, err)
		}
		assertNoHandles(t, sim)
		if _, _, err := provision.ParseSRKPublic(srk.EncodeSRKPEM()); err != nil {
			t.Fatalf("provision.ParseSRKPublic(node %d): %v", i, err)
		}
		if _, _, err := provision.ParseSRKPublic(srk.Public); err != nil {
			t.Fatalf("provision.ParseSRKPublic(raw, node %d): %v", i, err)
		}
		nodes[i] = &node{sim: sim, srk: srk.EncodeSRKPEM(),
			cfg: Config{Device: sim.Device, BlobFile: filepath.Join(t.TempDir(), "kek.blob")}}
	}
	return nodes
}

// provisionNodes makes one import blob per node from m and imports it.
func provisionNodes(t *testing.T, m *provision.KEKMaterial, nodes []*node) {
	t.Helper()
	for i, n := range nodes {
		blob, err := m.ImportBlob(n.srk)
		if err != nil {
			t.Fatalf("ImportBlob(node %d): %v", i, err)
		}
		info, err := ImportKey(testCtx(t), n.cfg, blob)
		if err != nil {
			t.Fatalf("ImportKey(node %d): %v", i, err)
		}
		if info.KeyID != m.KeyID() {
			t.Fatalf("node %d imported key_id %s, want %s", i, info.KeyID, m.KeyID())
		}
		assertNoHandles(t, n.sim) // ImportKey flushed the SRK and the loaded KEK
		if _, err := ImportKey(testCtx(t), n.cfg, blob); !errors.Is(err, kek.ErrKeyExists) {
			t.Fatalf("second ImportKey(node %d) = %v, want kek.ErrKeyExists", i, err)
		}
	}
}

// crossUnwrap wraps on every KEK and unwraps on every KEK.
func crossUnwrap(t *testing.T, keks []*KEK) {
	t.Helper()
	ctx := testCtx(t)
	for i, w := range keks {
		pt := randBytes(t, 32)
		aad := []byte(fmt.Sprintf("from node %d", i))
		body, err := w.Wrap(ctx, pt, aad)
		if err != nil {
			t.Fatalf("Wrap on node %d: %v", i, err)
		}
		for j, u := range keks {
			got, err := u.Unwrap(ctx, body, aad)
			if err != nil {
				t.Fatalf("Unwrap on node %d of a body wrapped on node %d: %v", j, i, err)
			}
			if !bytes.Equal(got, pt) {
				t.Fatalf("node %d unwrapped node %d's body to other bytes", j, i)
			}
		}
	}
}

func TestImportedKEKThreeNodes(t *testing.T) {
	nodes := newNodes(t, 4)
	outsider := nodes[3]
	nodes = nodes[:3]
	nodes[2].cfg = Config{Device: nodes[2].sim.Device, PersistentHandle: testHandle} // both key forms

	authFile := writeFile(t, "0123456789abcdef0123")
	m, err := provision.NewKEKMaterial([]byte("0123456789abcdef0123"))
	if err != nil {
		t.Fatal(err)
	}
	provisionNodes(t, m, nodes)
	blob0, err := m.ImportBlob(nodes[0].srk)
	if err != nil {
		t.Fatal(err)
	}
	m.Destroy()
	if _, err := m.ImportBlob(nodes[0].srk); err == nil {
		t.Fatal("ImportBlob after Destroy succeeded")
	}

	// The wrong auth value fails Open (before any KEK holds swtpm's one connection).
	bad := nodes[0].cfg
	bad.AuthFile = writeFile(t, "XXXXXXXXXXXXXXXXXXXX")
	if k, err := Open(testCtx(t), bad); err == nil {
		k.Close()
		t.Error("Open with the wrong auth value succeeded")
	}
	assertNoHandles(t, nodes[0].sim)

	var keks []*KEK
	for i, n := range nodes {
		n.cfg.AuthFile = authFile
		k := openKEK(t, n.sim, n.cfg)
		if !k.imported {
			t.Errorf("node %d: KEK not recognised as imported", i)
		}
		if i > 0 && k.ID() != keks[0].ID() {
			t.Errorf("node %d key_id %s, node 0 %s", i, k.ID(), keks[0].ID())
		}
		info, err := provision.InspectImportBlob(blob0)
		if err != nil || info.KeyID != k.ID() {
			t.Errorf("provision.InspectImportBlob = %+v, %v; want key_id %s", info, err, k.ID())
		}
		keks = append(keks, k)
	}
	crossUnwrap(t, keks)
	for _, k := range keks {
		assertOnlyOwn(t, k)
	}

	// A fourth TPM cannot import node 0's blob: hwkms refuses it (SRK Name), and
	// so does the TPM itself.
	ocfg := Config{Device: outsider.sim.Device, BlobFile: filepath.Join(t.TempDir(), "kek.blob")}
	if _, err := ImportKey(testCtx(t), ocfg, blob0); !errors.Is(err, ErrWrongTPM) {
		t.Errorf("ImportKey on the outsider = %v, want ErrWrongTPM", err)
	}
	withConn(t, outsider.sim, func(c *conn) {
		srk, err := createSRK(c, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer flushHandle(c, srk.Handle)
		ib, err := provision.ParseBlob(blob0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := importUnder(c, srk, ib); !errors.Is(err, tpm2.TPMRCIntegrity) {
			t.Errorf("the outsider TPM's TPM2_Import of node 0's blob = %v, want TPM_RC_INTEGRITY", err)
		} else {
			t.Logf("outsider TPM2_Import: %v", err)
		}
	})
	// ... and its own KEK cannot unwrap the nodes' bodies.
	createKey(t, ocfg)
	ok := openKEK(t, outsider.sim, ocfg)
	body, err := keks[0].Wrap(testCtx(t), []byte("seed"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ok.Unwrap(testCtx(t), body, nil); !errors.Is(err, kek.ErrInvalidCiphertext) {
		t.Errorf("outsider Unwrap = %v, want ErrInvalidCiphertext", err)
	}
}

// TestImportedKEKCannotBeDuplicated tries TPM2_Duplicate on an imported KEK with
// a policy session (the DUP role needs one): the no-duplication policy refuses it.
func TestImportedKEKCannotBeDuplicated(t *testing.T) {
	nodes := newNodes(t, 1)
	m, err := provision.NewKEKMaterial(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Destroy()
	provisionNodes(t, m, nodes)
	pub, pubBytes, priv, err := readBlobFile(nodes[0].cfg.BlobFile)
	if err != nil {
		t.Fatal(err)
	}
	if !wire.IsImportedKEK(pub) {
		t.Fatal("blob file does not hold an imported KEK")
	}
	withConn(t, nodes[0].sim, func(c *conn) {
		name, _ := wire.ObjectName(pub)
		h, err := loadUnderSRK(c, pubBytes, priv, name, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer flushHandle(c, h)
		for _, cc := range []tpm2.TPMCC{0, tpm2.TPMCCDuplicate} {
			sess, cleanup, err := tpm2.PolicySession(c, tpm2.TPMAlgSHA256, nonceSize)
			if err != nil {
				t.Fatal(err)
			}
			if cc != 0 {
				if _, err := (tpm2.PolicyCommandCode{PolicySession: sess.Handle(), Code: cc}).Execute(c); err != nil {
					t.Fatal(err)
				}
			}
			_, err = tpm2.Duplicate{
				ObjectHandle:    tpm2.AuthHandle{Handle: h, Name: tpm2.TPM2BName{Buffer: name}, Auth: sess},
				NewParentHandle: tpm2.TPMRHNull,
				Symmetric:       tpm2.TPMTSymDef{Algorithm: tpm2.TPMAlgNull},
			}.Execute(c)
			if !errors.Is(err, tpm2.TPMRCPolicyFail) {
				t.Errorf("TPM2_Duplicate (policy command code %v) = %v, want TPM_RC_POLICY_FAIL", cc, err)
			}
			if err := cleanup(); err != nil && !errors.Is(err, tpm2.TPMRCHandle) {
				t.Logf("flush policy session: %v", err)
			}
		}
	})
	assertNoHandles(t, nodes[0].sim)
}

// TestEscrowRecoveryDrill: three nodes provisioned with an escrow copy wrap data;
// all three TPMs die (stopped, state deleted); three new TPMs get blobs made from
// the escrow and unwrap the old ciphertexts.
func TestEscrowRecoveryDrill(t *testing.T) {
	escrowPriv, escrowPub, err := provision.NewEscrowKey()
	if err != nil {
		t.Fatal(err)
	}
	otherPriv, _, err := provision.NewEscrowKey()
	if err != nil {
		t.Fatal(err)
	}
	m, err := provision.NewKEKMaterial(nil)
	if err != nil {
		t.Fatal(err)
	}
	keyID := m.KeyID()
	nodes := newNodes(t, 3)
	provisionNodes(t, m, nodes)
	escrowBlob, err := m.ImportBlob(escrowPub.EncodeSRKPEM())
	if err != nil {
		t.Fatal(err)
	}
	m.Destroy()

	type stored struct{ body, aad, pt []byte }
	var old []stored
	ctx := testCtx(t)
	for i, n := range nodes {
		k, err := Open(ctx, n.cfg)
		if err != nil {
			t.Fatal(err)
		}
		pt, aad := randBytes(t, 32), []byte(fmt.Sprintf("node %d", i))
		body, err := k.Wrap(ctx, pt, aad)
		if err != nil {
			t.Fatal(err)
		}
		old = append(old, stored{body, aad, pt})
		if err := k.Close(); err != nil {
			t.Fatal(err)
		}
		// The TPM dies: stopped and its state deleted.
		if err := n.sim.Close(); err != nil {
			t.Fatal(err)
		}
		if err := os.RemoveAll(n.sim.Dir); err != nil {
			t.Fatal(err)
		}
	}

	if _, err := provision.RecoverKEKMaterial(escrowBlob, otherPriv); !errors.Is(err, provision.ErrWrongEscrowKey) {
		t.Errorf("recover with another escrow key = %v, want provision.ErrWrongEscrowKey", err)
	}
	tampered := bytes.Clone(escrowBlob)
	tampered[len(tampered)-80] ^= 1 // inside the duplicate
	if _, err := provision.RecoverKEKMaterial(tampered, escrowPriv); err == nil {
		t.Error("recover from a tampered escrow blob succeeded")
	}

	rm, err := provision.RecoverKEKMaterial(escrowBlob, escrowPriv)
	if err != nil {
		t.Fatalf("provision.RecoverKEKMaterial: %v", err)
	}
	if rm.KeyID() != keyID {
		t.Fatalf("recovered key_id %s, want %s", rm.KeyID(), keyID)
	}
	fresh := newNodes(t, 3)
	provisionNodes(t, rm, fresh)
	rm.Destroy()
	var keks []*KEK
	for _, n := range fresh {
		keks = append(keks, openKEK(t, n.sim, n.cfg))
	}
	for j, k := range keks {
		if k.ID() != keyID {
			t.Errorf("new node %d key_id %s, want %s", j, k.ID(), keyID)
		}
		for i, s := range old {
			got, err := k.Unwrap(ctx, s.body, s.aad)
			if err != nil {
				t.Fatalf("new node %d Unwrap of old node %d's body: %v", j, i, err)
			}
			if !bytes.Equal(got, s.pt) {
				t.Fatalf("new node %d unwrapped old node %d's body to other bytes", j, i)
			}
		}
	}
	crossUnwrap(t, keks)
}

// withConn runs fn on a fresh connection to sim.
func withConn(t *testing.T, sim *swtpm.Sim, fn func(c *conn)) {
	t.Helper()
	dev, err := parseDevice(sim.Device)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := openAdmin(ctx, dev)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.ctx = ctx
	fn(c)
}
