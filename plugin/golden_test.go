package plugin

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"encoding/hex"
	"encoding/json"
	"flag"
	"os"
	"testing"

	"k8s.io/kms/pkg/service"

	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/plugin/kek/kektest"
)

// updateGolden regenerates the golden files instead of only reading them
// (go test ./plugin/ -run TestGoldenFrame -update, or HWKMS_UPDATE_GOLDEN=1).
var updateGolden = flag.Bool("update", false, "regenerate the golden files under testdata/golden")

// hexBytes is a byte string written as lower-case hex in the golden files.
type hexBytes []byte

func (h hexBytes) MarshalText() ([]byte, error) { return []byte(hex.EncodeToString(h)), nil }

func (h *hexBytes) UnmarshalText(b []byte) error {
	v, err := hex.DecodeString(string(b))
	*h = v
	return err
}

// goldenFrame is an Encrypt ciphertext made by the Service around a kektest.Fake of
// known key: it pins the frame version 1 header and its AAD without a device (the
// body is the Fake's, nonce | AES-256-GCM ciphertext || tag, a test-only format).
type goldenFrame struct {
	Comment   string   `json:"comment"`
	KeyValue  hexBytes `json:"key_value"`
	KeyID     string   `json:"key_id"`
	AAD       hexBytes `json:"aad"`
	Plaintext hexBytes `json:"plaintext"`
	Frame     hexBytes `json:"frame"`
}

const goldenFrameFile = "testdata/golden/frame-v1-fake.json"

// TestGoldenFrame reads the committed frame: the Service decrypts it, parseFrame and
// frameAAD agree with the literal layout, and crypto/aes under the known key opens
// its body with the literal AAD. A change that can no longer read it fails here.
func TestGoldenFrame(t *testing.T) {
	ctx := context.Background()
	in := goldenFrame{
		Comment: "hwkms frame v1: 0x01 | backend | body, aad = \"hwkms\\x00\" | 0x01 | backend | key_id; " +
			"backend 0x7f is the in-memory kektest.Fake (body: 12-byte nonce | AES-256-GCM ciphertext || tag). " +
			"Test key, not secret. Regenerate with: go test ./plugin/ -run TestGoldenFrame -update",
		KeyValue:  bytes.Repeat([]byte{0x42}, 32),
		KeyID:     "golden-fake",
		Plaintext: []byte("0123456789abcdef0123456789abcdef"),
	}
	in.AAD = append([]byte("hwkms\x00\x01\x7f"), in.KeyID...)
	svc := newTestService(t, kektest.NewFake(in.KeyID, kektest.FakeKey(in.KeyValue)))

	var g goldenFrame
	if *updateGolden || os.Getenv("HWKMS_UPDATE_GOLDEN") == "1" {
		resp, err := svc.Encrypt(ctx, "golden", in.Plaintext)
		if err != nil {
			t.Fatal(err)
		}
		g = in
		g.Frame = resp.Ciphertext
		out, err := json.MarshalIndent(g, "", "  ")
		if err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll("testdata/golden", 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(goldenFrameFile, append(out, '\n'), 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("wrote %s", goldenFrameFile)
	} else {
		raw, err := os.ReadFile(goldenFrameFile)
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(raw, &g); err != nil {
			t.Fatalf("%s: %v", goldenFrameFile, err)
		}
		if !bytes.Equal(g.KeyValue, in.KeyValue) || g.KeyID != in.KeyID || !bytes.Equal(g.Plaintext, in.Plaintext) || !bytes.Equal(g.AAD, in.AAD) {
			t.Fatalf("%s: key, key_id, plaintext or aad differ from the test's fixed inputs", goldenFrameFile)
		}
	}

	got, err := svc.Decrypt(ctx, "golden", &service.DecryptRequest{Ciphertext: g.Frame, KeyID: g.KeyID})
	if err != nil || !bytes.Equal(got, in.Plaintext) {
		t.Fatalf("Decrypt of the golden frame: %d bytes, %v", len(got), err)
	}
	b, body, err := parseFrame(g.Frame)
	if err != nil || b != kek.BackendTest || g.Frame[0] != 0x01 || !bytes.Equal(body, g.Frame[2:]) {
		t.Fatalf("parseFrame of the golden frame: backend %v, %v; header % x", b, err, g.Frame[:2])
	}
	if aad := frameAAD(b, g.KeyID); !bytes.Equal(aad, in.AAD) {
		t.Fatalf("frameAAD = %x, want the literal %x", aad, in.AAD)
	}
	blk, err := aes.NewCipher(in.KeyValue)
	if err != nil {
		t.Fatal(err)
	}
	gcm, err := cipher.NewGCM(blk)
	if err != nil {
		t.Fatal(err)
	}
	pt, err := gcm.Open(nil, body[:12], body[12:], in.AAD)
	if err != nil || !bytes.Equal(pt, in.Plaintext) {
		t.Fatalf("crypto/aes GCM under the known key and the literal aad: %d bytes, %v", len(pt), err)
	}
}
