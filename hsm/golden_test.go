package hsm

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"encoding/hex"
	"encoding/json"
	"flag"
	"io"
	"log/slog"
	"os"
	"testing"

	"github.com/miekg/pkcs11"
	"k8s.io/kms/pkg/service"

	"github.com/hwkms/hwkms/plugin"
)

// updateGolden regenerates the golden files instead of only reading them
// (go test ./hsm/ -run TestGolden -update, or HWKMS_UPDATE_GOLDEN=1).
var updateGolden = flag.Bool("update", false, "regenerate the golden files under testdata/golden")

func updatingGolden() bool { return *updateGolden || os.Getenv("HWKMS_UPDATE_GOLDEN") == "1" }

// hexBytes is a byte string written as lower-case hex in the golden files.
type hexBytes []byte

func (h hexBytes) MarshalText() ([]byte, error) { return []byte(hex.EncodeToString(h)), nil }

func (h *hexBytes) UnmarshalText(b []byte) error {
	v, err := hex.DecodeString(string(b))
	*h = v
	return err
}

// goldenPKCS11 is a complete Encrypt ciphertext (frame version 1 around a PKCS#11
// body version 1) made with an AES-256 key of known value, with everything needed
// to import that key again and check the ciphertext.
type goldenPKCS11 struct {
	Comment   string   `json:"comment"`
	KeyValue  hexBytes `json:"key_value"`
	KeyLabel  string   `json:"key_label"`
	KeyCKAID  hexBytes `json:"key_cka_id"`
	KeyID     string   `json:"key_id"`
	AAD       hexBytes `json:"aad"`
	Plaintext hexBytes `json:"plaintext"`
	Frame     hexBytes `json:"frame"`
}

const goldenPKCS11File = "testdata/golden/pkcs11-frame-v1-body-v1.json"

// goldenPKCS11Inputs are the fixed inputs of the golden ciphertext. The key is the
// AES-256 key of NIST SP 800-38A F.1.5: a test key, not a secret.
func goldenPKCS11Inputs() goldenPKCS11 {
	return goldenPKCS11{
		Comment: "hwkms stored format: frame v1 (0x01 | backend 0x01 | body) around a PKCS#11 body v1 " +
			"(0x01 | 12-byte IV | AES-256-GCM ciphertext || 16-byte tag, aad = \"hwkms\\x00\" | 0x01 | 0x01 | key_id). " +
			"Test key, not secret. Regenerate with: go test ./hsm/ -run TestGoldenPKCS11 -update",
		KeyValue:  mustHex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4"),
		KeyLabel:  "hwkms-golden-v1",
		KeyCKAID:  hexBytes("golden-v1"),
		Plaintext: mustHex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"),
	}
}

func mustHex(s string) hexBytes {
	b, err := hex.DecodeString(s)
	if err != nil {
		panic(err)
	}
	return b
}

// importKey creates, with C_CreateObject, a token AES secret key of the given value:
// sensitive, not extractable, private, usable for encrypt and decrypt only.
func importKey(t *testing.T, cfg Config, value []byte, label string, id []byte) {
	t.Helper()
	c, sh := rawSession(t, cfg)
	ctx, ok := c.(interface {
		CreateObject(pkcs11.SessionHandle, []*pkcs11.Attribute) (pkcs11.ObjectHandle, error)
	})
	if !ok {
		t.Fatalf("module %T has no C_CreateObject", c)
	}
	_, err := ctx.CreateObject(sh, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE, value),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_ID, id),
	})
	if err != nil {
		t.Fatalf("C_CreateObject of the golden key: %v", err)
	}
}

// TestGoldenPKCS11 reads the committed golden ciphertext with a key of known value
// imported into SoftHSM2: (a) it decrypts to its plaintext through the path
// kube-apiserver uses (plugin.Service.Decrypt: frame parse, AAD, hsm Unwrap), (b) its
// body decrypts with Go's crypto/aes GCM under the known key with the layout of
// doc.go, and (c) its key_id is the documented derivation from CKA_LABEL and CKA_ID.
// A change that can no longer read it changes a stored format and fails here.
func TestGoldenPKCS11(t *testing.T) {
	ctx := context.Background()
	in := goldenPKCS11Inputs()
	var g goldenPKCS11
	if !updatingGolden() {
		raw, err := os.ReadFile(goldenPKCS11File)
		if err != nil {
			t.Fatalf("%v (regenerate with -update only for a new format version)", err)
		}
		if err := json.Unmarshal(raw, &g); err != nil {
			t.Fatalf("%s: %v", goldenPKCS11File, err)
		}
		// The file must still be made of the fixed inputs.
		if !bytes.Equal(g.KeyValue, in.KeyValue) || g.KeyLabel != in.KeyLabel || !bytes.Equal(g.KeyCKAID, in.KeyCKAID) || !bytes.Equal(g.Plaintext, in.Plaintext) {
			t.Fatalf("%s: key, label, CKA_ID or plaintext differ from the test's fixed inputs", goldenPKCS11File)
		}
	}

	fx, toks := newTokens(t, 1)
	cfg := cfgFor(fx, toks[0], in.KeyLabel)
	cfg.KeyCKAID = hex.EncodeToString(in.KeyCKAID)
	cfg.AllowExtractable = true // an imported key is not CKA_NEVER_EXTRACTABLE: its value existed outside
	importKey(t, cfg, in.KeyValue, in.KeyLabel, in.KeyCKAID)
	k := openKEK(t, cfg)
	ring, err := plugin.NewKeyring(k)
	if err != nil {
		t.Fatal(err)
	}
	svc := plugin.NewService(ring, plugin.Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})

	if updatingGolden() {
		resp, err := svc.Encrypt(ctx, "golden", in.Plaintext)
		if err != nil {
			t.Fatalf("Encrypt: %v", err)
		}
		g = in
		g.KeyID = resp.KeyID
		g.Frame = resp.Ciphertext
		g.AAD = append(append([]byte("hwkms\x00"), plugin.FrameV1, 0x01), resp.KeyID...)
		writeGolden(t, goldenPKCS11File, g)
	}

	// (c) key_id: the documented derivation, the package's KeyID and the open key agree.
	if want := "p11:" + keyIDFor(in.KeyLabel, in.KeyCKAID); g.KeyID != want {
		t.Errorf("golden key_id %q, want %q from CKA_LABEL and CKA_ID", g.KeyID, want)
	}
	if got := KeyID(in.KeyLabel, in.KeyCKAID); got != g.KeyID {
		t.Errorf("KeyID = %q, golden key_id %q", got, g.KeyID)
	}
	if k.ID() != g.KeyID {
		t.Errorf("the imported key's ID = %q, golden key_id %q", k.ID(), g.KeyID)
	}

	// (a) The real path: Service.Decrypt parses the frame, builds the AAD and unwraps.
	got, err := svc.Decrypt(ctx, "golden", &service.DecryptRequest{Ciphertext: g.Frame, KeyID: g.KeyID})
	if err != nil {
		t.Fatalf("Decrypt of the golden frame: %v", err)
	}
	if !bytes.Equal(got, in.Plaintext) {
		t.Fatalf("Decrypt of the golden frame returned %d bytes that differ from the golden plaintext", len(got))
	}

	// (b) The layout, checked without PKCS#11: frame v1, backend 0x01, body v1 with
	// mechanism 0x01, 12-byte IV, AES-256-GCM ciphertext and 16-byte tag, and the AAD.
	wantAAD := append(append([]byte("hwkms\x00"), 0x01, 0x01), g.KeyID...)
	if !bytes.Equal(g.AAD, wantAAD) {
		t.Fatalf("golden aad %x, want %x", g.AAD, wantAAD)
	}
	f := g.Frame
	if len(f) != 2+1+12+len(in.Plaintext)+16 || f[0] != 0x01 || f[1] != 0x01 || f[2] != 0x01 {
		t.Fatalf("golden frame: %d bytes, header % x; want %d bytes, 01 01 01", len(f), f[:min(3, len(f))], 2+1+12+len(in.Plaintext)+16)
	}
	body := f[2:]
	blk, err := aes.NewCipher(in.KeyValue)
	if err != nil {
		t.Fatal(err)
	}
	gcm, err := cipher.NewGCM(blk)
	if err != nil {
		t.Fatal(err)
	}
	pt, err := gcm.Open(nil, body[1:13], body[13:], wantAAD)
	if err != nil {
		t.Fatalf("crypto/aes GCM under the known key does not open the golden body: %v", err)
	}
	if !bytes.Equal(pt, in.Plaintext) {
		t.Fatal("crypto/aes GCM under the known key returned other bytes than the golden plaintext")
	}
}
