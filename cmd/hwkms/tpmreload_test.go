package main

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/hwkms/hwkms/plugin/config"
	"github.com/hwkms/hwkms/tpm"
	"github.com/hwkms/hwkms/tpm/swtpm/swtpmtest"
)

// TestReloadRotatesOnOneSwtpm rotates between two KEKs held by one swtpm by editing
// the config file while hwkms serves. swtpm (like /dev/tpm0) takes one connection at
// a time, so the reloaded keyring must reuse the running one's connection: the new
// primary, the old key (decrypt-only) and the keyring being replaced all share it.
// Then the old key is dropped from the file and its ciphertext is refused.
func TestReloadRotatesOnOneSwtpm(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	sim := swtpmtest.New(t)
	dir := shortDir(t)
	key1 := tpm.Config{Device: sim.Device, BlobFile: filepath.Join(dir, "k1.blob")}
	key2 := tpm.Config{Device: sim.Device, PersistentHandle: "0x81010020"}
	info1, err := tpm.CreateKey(ctx, key1)
	if err != nil {
		t.Fatal(err)
	}
	info2, err := tpm.CreateKey(ctx, key2)
	if err != nil {
		t.Fatal(err)
	}

	path := filepath.Join(dir, "hwkms.yaml")
	base := config.Config{Socket: config.Socket{Path: filepath.Join(dir, "kms.sock")}, Metrics: config.Metrics{Address: "127.0.0.1:0"}}
	withKeys := func(keys ...config.Key) *config.Config { c := base; c.Keys = keys; return &c }
	writeYAML(t, path, withKeys(config.Key{TPM: &key1}))
	srv := startServeWith(t, path, slog.New(slog.NewTextHandler(io.Discard, nil)))
	c := srv.client

	pt := []byte("a DEK seed of 32 bytes, say....!")
	enc1, err := c.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: pt, Uid: "1"})
	if err != nil || enc1.KeyId != info1.KeyID {
		t.Fatalf("Encrypt before rotation: %v, %v", enc1, err)
	}

	writeYAML(t, path, withKeys(config.Key{TPM: &key2}, config.Key{TPM: &key1}))
	waitSample(t, srv.metrics, "hwkms_reloads_total", map[string]string{"result": "ok"}, 1)
	st, err := c.Status(ctx, &kmsapi.StatusRequest{})
	if err != nil || st.KeyId != info2.KeyID || st.Healthz != "ok" {
		t.Fatalf("Status after rotation: %v, %v", st, err)
	}
	enc2, err := c.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: pt, Uid: "2"})
	if err != nil || enc2.KeyId != info2.KeyID {
		t.Fatalf("Encrypt after rotation: %v, %v", enc2, err)
	}
	// Alternate between the keys: each switch evicts the other from the TPM.
	for range 3 {
		for _, e := range []*kmsapi.EncryptResponse{enc1, enc2} {
			dec, err := c.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: e.Ciphertext, KeyId: e.KeyId, Uid: "d"})
			if err != nil || !bytes.Equal(dec.Plaintext, pt) {
				t.Fatalf("Decrypt under %s: %v", e.KeyId, err)
			}
		}
	}

	writeYAML(t, path, withKeys(config.Key{TPM: &key2}))
	waitSample(t, srv.metrics, "hwkms_reloads_total", map[string]string{"result": "ok"}, 2)
	if _, err := c.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: enc1.Ciphertext, KeyId: enc1.KeyId, Uid: "d"}); status.Code(err) != codes.NotFound {
		t.Fatalf("Decrypt under a key removed from the config: %v, want NotFound", err)
	}
	if dec, err := c.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: enc2.Ciphertext, KeyId: enc2.KeyId, Uid: "d"}); err != nil || !bytes.Equal(dec.Plaintext, pt) {
		t.Fatalf("Decrypt under the primary after dropping the old key: %v", err)
	}
}
