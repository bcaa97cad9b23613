package tpm

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
)

// The golden vectors of the KEK of kind hmac, beside TestGolden's and made the same
// way (fixed-seed simulator, committed, read back every run): hmac-kek.blob (a
// CreateKey blob-form KEK of kind hmac; the blob file format is the one of
// kek.blob, holding a keyed-hash public area) and hmac-body-v2.bin (a body of
// version 2 it wrapped), with what they must give in hmac-vectors.json.
//
// Regenerate (only when adding a vector) with
//
//	go test ./tpm -run TestGoldenHMAC -args -update
//
// which rewrites only these three files.

// goldenHMACVectors is testdata/golden/hmac-vectors.json.
type goldenHMACVectors struct {
	// KEKKeyID is the key_id of hmac-kek.blob.
	KEKKeyID string `json:"kek_key_id"`
	// AAD and Plaintext (hex) are what hmac-body-v2.bin was wrapped with.
	AAD       string `json:"aad"`
	Plaintext string `json:"plaintext"`
}

func TestGoldenHMAC(t *testing.T) {
	if updateGolden() {
		t.Run("update", writeGoldenHMAC)
	}
	var v goldenHMACVectors
	raw, err := os.ReadFile(filepath.Join(goldenDir, "hmac-vectors.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(raw, &v); err != nil {
		t.Fatal(err)
	}
	aad, err := hex.DecodeString(v.AAD)
	if err != nil {
		t.Fatal(err)
	}
	pt, err := hex.DecodeString(v.Plaintext)
	if err != nil {
		t.Fatal(err)
	}
	body, err := os.ReadFile(filepath.Join(goldenDir, "hmac-body-v2.bin"))
	if err != nil {
		t.Fatal(err)
	}
	if len(body) != 1+32+len(pt)+16 || body[0] != bodyV2 {
		t.Fatalf("hmac-body-v2.bin: %d bytes, version %#x; want %d bytes, version 2", len(body), body[0], 1+32+len(pt)+16)
	}
	s := newSimTPM(t, goldenSeed)
	ctx := testCtx(t)
	cfg := Config{Device: s.Device, BlobFile: filepath.Join(goldenDir, "hmac-kek.blob"), Kind: KindHMAC}
	info, err := Probe(ctx, cfg)
	if err != nil || info.KeyID != v.KEKKeyID {
		t.Fatalf("Probe(hmac-kek.blob) = %+v, %v; want key_id %s", info, err, v.KEKKeyID)
	}
	k, err := Open(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close()
	if k.ID() != v.KEKKeyID {
		t.Fatalf("ID = %s, want %s", k.ID(), v.KEKKeyID)
	}
	got, err := k.Unwrap(ctx, body, aad)
	if err != nil || !bytes.Equal(got, pt) {
		t.Fatalf("Unwrap(hmac-body-v2.bin) = %q, %v; want %q", got, err, pt)
	}
}

func writeGoldenHMAC(t *testing.T) {
	s := newSimTPM(t, goldenSeed)
	ctx := testCtx(t)
	kekPath := filepath.Join(goldenDir, "hmac-kek.blob")
	os.Remove(kekPath)
	info := createKey(t, Config{Device: s.Device, BlobFile: kekPath, Kind: KindHMAC})
	pt := []byte("hwkms golden DEK seed, 32 bytes!")
	aad := goldenAAD(info.KeyID)
	k, err := Open(ctx, Config{Device: s.Device, BlobFile: kekPath, Kind: KindHMAC})
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close()
	body, err := k.Wrap(ctx, pt, aad)
	if err != nil {
		t.Fatal(err)
	}
	v, err := json.MarshalIndent(goldenHMACVectors{KEKKeyID: info.KeyID, AAD: hex.EncodeToString(aad), Plaintext: hex.EncodeToString(pt)}, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	for name, b := range map[string][]byte{"hmac-body-v2.bin": body, "hmac-vectors.json": append(v, '\n')} {
		if err := os.WriteFile(filepath.Join(goldenDir, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
