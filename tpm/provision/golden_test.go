package provision

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/hwkms/hwkms/tpm/internal/wire"
)

// TestGolden reads back the committed ceremony formats (made by package tpm's
// TestGolden on the fixed-seed simulator, which also imports them there): both
// import blob versions parse with today's parser and name the committed KEK, SRK
// and EK; the escrow blob opens with the committed (test) escrow key to the same
// KEK, whose new blobs parse again. A parser change that refuses one fails here.
func TestGolden(t *testing.T) {
	dir := filepath.Join("testdata", "golden")
	read := func(name string) []byte {
		t.Helper()
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	var v struct {
		ImportedKeyID string `json:"imported_key_id"`
		SRKName       string `json:"srk_name"`
		EKName        string `json:"ek_name"`
	}
	if err := json.Unmarshal(read("vectors.json"), &v); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		file    string
		version byte
		ekName  string
	}{
		{"import-v1.bin", ImportV1, ""},
		{"import-v2.bin", ImportV2, v.EKName},
		{"escrow.import", ImportV1, ""},
	} {
		blob := read(tc.file)
		if !bytes.HasPrefix(blob, []byte("HWKI")) || blob[4] != tc.version {
			t.Errorf("%s: header %x, want HWKI %#x", tc.file, blob[:5], tc.version)
		}
		info, err := InspectImportBlob(blob)
		if err != nil {
			t.Fatalf("InspectImportBlob(%s): %v", tc.file, err)
		}
		if info.KeyID != v.ImportedKeyID {
			t.Errorf("%s: key_id %s, want %s", tc.file, info.KeyID, v.ImportedKeyID)
		}
		if got := hex.EncodeToString(info.EKName); got != tc.ekName {
			t.Errorf("%s: EK Name %q, want %q", tc.file, got, tc.ekName)
		}
		if tc.file != "escrow.import" && hex.EncodeToString(info.ParentName) != v.SRKName {
			t.Errorf("%s: SRK Name %x, want %s", tc.file, info.ParentName, v.SRKName)
		}
	}
	escrowPub, _, err := ParseSRKPublic(read("escrow.pub"))
	if err != nil {
		t.Fatal(err)
	}
	if info, _ := InspectImportBlob(read("escrow.import")); !bytes.Equal(info.ParentName, escrowPub.Name) {
		t.Errorf("escrow.import is for %x, escrow.pub is %x", info.ParentName, escrowPub.Name)
	}
	m, err := RecoverKEKMaterial(read("escrow.import"), read("escrow.key"))
	if err != nil {
		t.Fatalf("RecoverKEKMaterial: %v", err)
	}
	defer m.Destroy()
	if m.KeyID() != v.ImportedKeyID {
		t.Fatalf("recovered key_id %s, want %s", m.KeyID(), v.ImportedKeyID)
	}
	again, err := m.ImportBlob(read("escrow.pub"))
	if err != nil {
		t.Fatal(err)
	}
	m2, err := RecoverKEKMaterial(again, read("escrow.key"))
	if err != nil || m2.KeyID() != v.ImportedKeyID {
		t.Fatalf("a blob made from the recovered KEK recovers to %v, %v", m2, err)
	}
	m2.Destroy()
	// A v2 blob is a node's, never an escrow copy.
	if _, err := RecoverKEKMaterial(read("import-v2.bin"), read("escrow.key")); !errors.Is(err, wire.ErrMalformed) {
		t.Errorf("RecoverKEKMaterial(import-v2.bin) = %v, want malformed", err)
	}
	// The node blob was made for the simulator's SRK, not the escrow key.
	if _, err := RecoverKEKMaterial(read("import-v1.bin"), read("escrow.key")); !errors.Is(err, ErrWrongEscrowKey) {
		t.Errorf("RecoverKEKMaterial(import-v1.bin) = %v, want ErrWrongEscrowKey", err)
	}
}

// TestEscrowOffline: an escrow blob recovers its KEK in software, refuses another
// escrow key, a tampered blob and a key that is not P-256 PKCS#8.
func TestEscrowOffline(t *testing.T) {
	priv, pub, err := NewEscrowKey()
	if err != nil {
		t.Fatal(err)
	}
	other, _, err := NewEscrowKey()
	if err != nil {
		t.Fatal(err)
	}
	m, err := NewKEKMaterial([]byte("0123456789abcdef"))
	if err != nil {
		t.Fatal(err)
	}
	blob, err := m.ImportBlob(pub.EncodeSRKPEM())
	if err != nil {
		t.Fatal(err)
	}
	keyID, name := m.KeyID(), m.Name()
	m.Destroy()
	if _, err := m.ImportBlob(pub.EncodeSRKPEM()); err == nil {
		t.Error("ImportBlob after Destroy succeeded")
	}
	r, err := RecoverKEKMaterial(blob, priv)
	if err != nil {
		t.Fatal(err)
	}
	if r.KeyID() != keyID || !bytes.Equal(r.Name(), name) {
		t.Errorf("recovered %s, want %s", r.KeyID(), keyID)
	}
	r.Destroy()
	if _, err := RecoverKEKMaterial(blob, other); !errors.Is(err, ErrWrongEscrowKey) {
		t.Errorf("another escrow key: %v, want ErrWrongEscrowKey", err)
	}
	for name, key := range map[string][]byte{
		"not PEM":     []byte("nope"),
		"wrong block": []byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
	} {
		if _, err := RecoverKEKMaterial(blob, key); err == nil {
			t.Errorf("escrow key %s accepted", name)
		}
	}
	for i := len(blob) - 120; i < len(blob); i += 7 {
		bad := bytes.Clone(blob)
		bad[i] ^= 1
		if _, err := RecoverKEKMaterial(bad, priv); err == nil {
			t.Errorf("blob changed at byte %d recovered", i)
		}
	}
}
