package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/hwkms/hwkms/softhsm"
	"github.com/hwkms/hwkms/softhsm/softhsmtest"
)

// TestDevMechanismServes serves a throwaway SoftHSM2 key of each mechanism the flag
// accepts: Status answers with a key_id, Encrypt answers a PKCS#11 frame around a
// body of that mechanism's version, and Decrypt opens it.
func TestDevMechanismServes(t *testing.T) {
	softhsmtest.New(t) // skips or fails, as the fixture decides, without SoftHSM2
	for _, c := range []struct {
		mech    string
		version byte // body version (hsm/doc.go)
	}{
		{"aes-cbc-hmac", 0x03},
		{"rsa-oaep", 0x04},
	} {
		t.Run(c.mech, func(t *testing.T) {
			// dev points SOFTHSM2_CONF of this process at its own token; restore the
			// test fixture's after it, or later tests' C_Initialize reads a removed file.
			t.Setenv(softhsm.ConfEnv, os.Getenv(softhsm.ConfEnv))
			dir := shortDir(t)
			sock := filepath.Join(dir, "kms.sock")
			ctx, cancel := context.WithCancel(context.Background())
			var stdout, stderr lockedBuffer
			done := make(chan error, 1)
			go func() {
				done <- run(ctx, []string{"dev", "--backend", "pkcs11", "--dev-mechanism", c.mech,
					"--socket", sock, "--dir", filepath.Join(dir, "work"), "--log-level", "warn"}, strings.NewReader(""), &stdout, &stderr)
			}()
			t.Cleanup(func() { cancel(); <-done })
			conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			kc := kmsapi.NewKeyManagementServiceClient(conn)
			var st *kmsapi.StatusResponse
			deadline := time.Now().Add(60 * time.Second)
			for {
				rctx, rcancel := context.WithTimeout(ctx, time.Second)
				st, err = kc.Status(rctx, &kmsapi.StatusRequest{})
				rcancel()
				if err == nil && st.Healthz == "ok" {
					break
				}
				select {
				case derr := <-done:
					done <- derr
					t.Fatalf("dev exited before serving: %v\n%s", derr, string(stderr.Bytes()))
				default:
				}
				if time.Now().After(deadline) {
					t.Fatalf("dev did not serve a healthy socket in 60 s: %v\n%s", err, string(stderr.Bytes()))
				}
				time.Sleep(100 * time.Millisecond)
			}
			if st.KeyId == "" {
				t.Fatal("Status answered an empty key_id")
			}
			pt := []byte("a 32-byte DEK seed for hwkms dev")
			rctx, rcancel := context.WithTimeout(ctx, 5*time.Second)
			defer rcancel()
			enc, err := kc.Encrypt(rctx, &kmsapi.EncryptRequest{Plaintext: pt, Uid: "dev"})
			if err != nil {
				t.Fatal(err)
			}
			if enc.KeyId != st.KeyId {
				t.Errorf("Encrypt key_id %q, Status key_id %q", enc.KeyId, st.KeyId)
			}
			// frame version, backend PKCS#11 (0x01), then the body's version.
			if len(enc.Ciphertext) < 3 || enc.Ciphertext[1] != 0x01 || enc.Ciphertext[2] != c.version {
				t.Fatalf("ciphertext %x: want a PKCS#11 frame around a body of version %#x", enc.Ciphertext, c.version)
			}
			dec, err := kc.Decrypt(rctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId, Uid: "dev"})
			if err != nil || !bytes.Equal(dec.Plaintext, pt) {
				t.Fatalf("Decrypt: %v", err)
			}
		})
	}
}
