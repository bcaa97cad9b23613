package tpm

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"testing"

	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/tpm/provision"
	"github.com/hwkms/hwkms/tpm/swtpm"
	"github.com/hwkms/hwkms/tpm/swtpm/swtpmtest"
)

// Golden vectors: every stored TPM format, made once on the go-tpm-tools simulator
// with fixed hierarchy seeds and committed under testdata/golden (node formats) and
// provision/testdata/golden (ceremony formats). Every run reads them back with
// today's code on a fresh simulator with the same seed (so the same SRK and EK): the
// KEK blob file loads and its bodies unwrap to the committed plaintext, the import
// blobs of both versions import and give the committed key_id, and the escrow blob
// recovers that KEK. A change that can no longer read one of them fails here.
//
// Regenerate (only when adding a vector; a stored format never changes) with
//
//	go test ./tpm -run TestGolden -args -update     (or HWKMS_UPDATE_GOLDEN=1)
//
// Without it the test never writes. The simulator's DRBG is seeded too, but the
// salted sessions use crypto/rand, so regenerating gives other bytes: the files are
// the reference, not the generator.
var update = flag.Bool("update", false, "rewrite the golden vectors in testdata/golden and provision/testdata/golden")

// goldenSeed seeds the simulator's hierarchies: its SRK and EK are those of this seed.
const goldenSeed = 0x68776b6d73 // "hwkms"

const (
	goldenDir          = "testdata/golden"
	goldenProvisionDir = "provision/testdata/golden"
)

// goldenVectors is testdata/golden/vectors.json: what the committed files must give.
type goldenVectors struct {
	// KEKKeyID is the key_id of kek.blob (a CreateKey blob-form KEK).
	KEKKeyID string `json:"kek_key_id"`
	// AAD and Plaintext (hex) are what body-v1.bin and body-v1-pcr.bin were wrapped
	// with; AAD has the frame AAD's shape for frame version 1, backend TPM.
	AAD       string `json:"aad"`
	Plaintext string `json:"plaintext"`
	// PCRs is the selection body-v1-pcr.bin was sealed under (the simulator's PCRs
	// hold their reset values).
	PCRs []int `json:"pcrs"`
	// ImportedKeyID is the key_id of the KEK inside import-v1.bin, import-v2.bin and
	// escrow.import; body-v1-imported.bin was wrapped by it.
	ImportedKeyID string `json:"imported_key_id"`
	// SRKName and EKName (hex) are the simulator's, which the import blobs name.
	SRKName string `json:"srk_name"`
	EKName  string `json:"ek_name"`
}

func updateGolden() bool { return *update || os.Getenv("HWKMS_UPDATE_GOLDEN") == "1" }

func goldenAAD(keyID string) []byte {
	return append([]byte("hwkms\x00\x01\x02"), keyID...)
}

func TestGolden(t *testing.T) {
	if updateGolden() {
		// In a subtest so that its simulator is closed (there is one per process)
		// before the read-back below starts a fresh one with the same seed.
		t.Run("update", writeGolden)
	}
	var v goldenVectors
	raw, err := os.ReadFile(filepath.Join(goldenDir, "vectors.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(raw, &v); err != nil {
		t.Fatal(err)
	}
	read := func(dir, name string) []byte {
		t.Helper()
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	unhex := func(s string) []byte {
		t.Helper()
		b, err := hex.DecodeString(s)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	aad, pt := unhex(v.AAD), unhex(v.Plaintext)
	s := newSimTPM(t, goldenSeed)
	ctx := testCtx(t)

	// The KEK blob file loads under the simulator's SRK; its bodies unwrap.
	blobCfg := Config{Device: s.Device, BlobFile: filepath.Join(goldenDir, "kek.blob")}
	info, err := Probe(ctx, blobCfg)
	if err != nil || info.KeyID != v.KEKKeyID {
		t.Fatalf("Probe(kek.blob) = %+v, %v; want key_id %s", info, err, v.KEKKeyID)
	}
	for _, tc := range []struct {
		file string
		pcrs []int
		size int
	}{
		{"body-v1.bin", nil, 241},
		{"body-v1-pcr.bin", v.PCRs, 273},
	} {
		body := read(goldenDir, tc.file)
		if len(body) != tc.size || body[0] != bodyV1 {
			t.Errorf("%s: %d bytes, version %#x; want %d bytes, version 1", tc.file, len(body), body[0], tc.size)
		}
		cfg := blobCfg
		cfg.PCRs, cfg.AllowVolatilePCRs = tc.pcrs, true // the vectors are sealed to 7 and 16 (the debug PCR)
		k, err := Open(ctx, cfg)
		if err != nil {
			t.Fatalf("Open(kek.blob, pcrs %v): %v", tc.pcrs, err)
		}
		if k.ID() != v.KEKKeyID {
			t.Errorf("kek.blob key_id %s, want %s", k.ID(), v.KEKKeyID)
		}
		got, err := k.Unwrap(ctx, body, aad)
		if err != nil || !bytes.Equal(got, pt) {
			t.Errorf("Unwrap(%s) = %x, %v; want the committed plaintext", tc.file, got, err)
		}
		if _, err := k.Unwrap(ctx, body, append(bytes.Clone(aad), 'x')); !errors.Is(err, kek.ErrInvalidCiphertext) {
			t.Errorf("Unwrap(%s) with another aad = %v, want ErrInvalidCiphertext", tc.file, err)
		}
		if err := k.Close(); err != nil {
			t.Fatal(err)
		}
	}

	// Both import blob versions import on the TPM they were made for and give the
	// committed key_id; a KEK imported from either unwraps the committed body.
	for _, name := range []string{"import-v1.bin", "import-v2.bin"} {
		blob := read(goldenProvisionDir, name)
		cfg := Config{Device: s.Device, BlobFile: filepath.Join(t.TempDir(), "imported.blob")}
		info, err := ImportKey(ctx, cfg, blob)
		if err != nil || info.KeyID != v.ImportedKeyID {
			t.Fatalf("ImportKey(%s) = %+v, %v; want key_id %s", name, info, err, v.ImportedKeyID)
		}
		k, err := Open(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		got, err := k.Unwrap(ctx, read(goldenDir, "body-v1-imported.bin"), aad)
		if err != nil || !bytes.Equal(got, pt) {
			t.Errorf("KEK imported from %s: Unwrap(body-v1-imported.bin) = %x, %v; want the committed plaintext", name, got, err)
		}
		if err := k.Close(); err != nil {
			t.Fatal(err)
		}
	}
	srk, err := ExportSRK(ctx, s.Device)
	if err != nil || hex.EncodeToString(srk.Name) != v.SRKName {
		t.Errorf("simulator SRK Name %x, %v; want %s (the seed no longer gives the same SRK)", srk.Name, err, v.SRKName)
	}

	// The escrow blob recovers the same KEK in software.
	m, err := provision.RecoverKEKMaterial(read(goldenProvisionDir, "escrow.import"), read(goldenProvisionDir, "escrow.key"))
	if err != nil || m.KeyID() != v.ImportedKeyID {
		t.Fatalf("RecoverKEKMaterial(escrow.import) = %v; want key_id %s", err, v.ImportedKeyID)
	}
	m.Destroy()
}

// writeGolden makes every golden file on a simulator with goldenSeed.
func writeGolden(t *testing.T) {
	t.Helper()
	s := newSimTPM(t, goldenSeed)
	ctx := testCtx(t)
	for _, dir := range []string{goldenDir, goldenProvisionDir} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	write := func(dir, name string, b []byte) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	pt := []byte("hwkms golden DEK seed, 32 bytes!")
	v := goldenVectors{Plaintext: hex.EncodeToString(pt), PCRs: []int{7, 16}}

	kekPath := filepath.Join(goldenDir, "kek.blob")
	os.Remove(kekPath)
	info := createKey(t, Config{Device: s.Device, BlobFile: kekPath})
	v.KEKKeyID = info.KeyID
	aad := goldenAAD(info.KeyID)
	v.AAD = hex.EncodeToString(aad)
	for name, pcrs := range map[string][]int{"body-v1.bin": nil, "body-v1-pcr.bin": v.PCRs} {
		k, err := Open(ctx, Config{Device: s.Device, BlobFile: kekPath, PCRs: pcrs, AllowVolatilePCRs: true})
		if err != nil {
			t.Fatal(err)
		}
		body, err := k.Wrap(ctx, pt, aad)
		if err != nil {
			t.Fatal(err)
		}
		write(goldenDir, name, body)
		k.Close()
	}

	srk, err := ExportSRK(ctx, s.Device)
	if err != nil {
		t.Fatal(err)
	}
	v.SRKName = hex.EncodeToString(srk.Name)
	ca := swtpmtest.NewEKCA(t, "Golden TPM Manufacturer")
	ca.ProvisionEK(t, &swtpm.Sim{Device: s.Device}, false)
	ek, err := ExportEK(ctx, s.Device)
	if err != nil {
		t.Fatal(err)
	}
	v.EKName = hex.EncodeToString(ek.Name)
	trust, err := provision.ParseEKTrust(ca.PEM)
	if err != nil {
		t.Fatal(err)
	}
	file := append(srk.EncodeSRKPEM(), ek.EncodePEM()...)
	node, err := provision.VerifyNodeEK(file, trust)
	if err != nil {
		t.Fatal(err)
	}
	m, err := provision.NewKEKMaterial(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Destroy()
	v.ImportedKeyID = m.KeyID()
	v1, err := m.ImportBlob(srk.EncodeSRKPEM())
	if err != nil {
		t.Fatal(err)
	}
	v2, err := m.ImportBlobForEK(file, node)
	if err != nil {
		t.Fatal(err)
	}
	escrowKey, escrowPub, err := provision.NewEscrowKey()
	if err != nil {
		t.Fatal(err)
	}
	escrow, err := m.ImportBlob(escrowPub.EncodeSRKPEM())
	if err != nil {
		t.Fatal(err)
	}
	write(goldenProvisionDir, "import-v1.bin", v1)
	write(goldenProvisionDir, "import-v2.bin", v2)
	write(goldenProvisionDir, "escrow.import", escrow)
	write(goldenProvisionDir, "escrow.key", escrowKey) // a test key, committed on purpose
	write(goldenProvisionDir, "escrow.pub", escrowPub.EncodeSRKPEM())

	cfg := Config{Device: s.Device, BlobFile: filepath.Join(t.TempDir(), "imported.blob")}
	if _, err := ImportKey(ctx, cfg, v1); err != nil {
		t.Fatal(err)
	}
	k, err := Open(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	body, err := k.Wrap(ctx, pt, aad)
	if err != nil {
		t.Fatal(err)
	}
	k.Close()
	write(goldenDir, "body-v1-imported.bin", body)

	js, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	write(goldenDir, "vectors.json", append(js, '\n'))
	// The ceremony's part, for tpm/provision's own read-back (no TPM there).
	js, err = json.MarshalIndent(map[string]string{
		"imported_key_id": v.ImportedKeyID, "srk_name": v.SRKName, "ek_name": v.EKName,
	}, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	write(goldenProvisionDir, "vectors.json", append(js, '\n'))
	t.Logf("golden vectors rewritten in %s and %s", goldenDir, goldenProvisionDir)
}
