package main

import (
	"bytes"
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	kmsapi "k8s.io/kms/apis/v2"
)

// TestDevFlagsRefused: the dev-only TPM flags need --backend tpm and a known latency
// profile; --dev-mechanism needs --backend pkcs11 and a mechanism SoftHSM2 can serve.
func TestDevFlagsRefused(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--backend", "pkcs11", "--dev-tpm-latency", "slb9670"}, "need --backend tpm"},
		{[]string{"--backend", "pkcs11", "--dev-tpm-kind", "hmac"}, "need --backend tpm"},
		{[]string{"--backend", "pkcs11", "--dev-tpm-no-admission"}, "need --backend tpm"},
		{[]string{"--backend", "tpm", "--dev-tpm-latency", "fast"}, "known profiles"},
		// --dev-mechanism needs --backend pkcs11, a known name, and not aes-gcm-token-iv
		// (SoftHSM2 leaves a token-generated IV zero).
		{[]string{"--backend", "tpm", "--dev-mechanism", "aes-gcm"}, "needs --backend pkcs11"},
		{[]string{"--backend", "pkcs11", "--dev-mechanism", "aes-ctr"}, "supported: auto, aes-gcm, aes-cbc-hmac, rsa-oaep"},
		{[]string{"--backend", "pkcs11", "--dev-mechanism", "aes-gcm-token-iv"}, "BenchmarkMechanism"},
	} {
		var stdout, stderr lockedBuffer
		err := run(context.Background(), append([]string{"dev", "--socket", filepath.Join(shortDir(t), "s")}, c.args...), strings.NewReader(""), &stdout, &stderr)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("dev %v = %v, want an error with %q", c.args, err, c.want)
		}
	}
}

// TestDevTPMHMACAtDiscreteSpeed serves a KEK of kind hmac through the latency proxy:
// Encrypt answers a frame around a body of version 2 and Decrypt opens it.
func TestDevTPMHMACAtDiscreteSpeed(t *testing.T) {
	dir := shortDir(t)
	sock := filepath.Join(dir, "kms.sock")
	ctx, cancel := context.WithCancel(context.Background())
	var stdout, stderr lockedBuffer
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"dev", "--backend", "tpm", "--dev-tpm-kind", "hmac", "--dev-tpm-latency", "slb9670",
			"--socket", sock, "--dir", filepath.Join(dir, "work"), "--log-level", "warn"}, strings.NewReader(""), &stdout, &stderr)
	}()
	t.Cleanup(func() { cancel(); <-done })
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := kmsapi.NewKeyManagementServiceClient(conn)
	deadline := time.Now().Add(60 * time.Second)
	for {
		rctx, rcancel := context.WithTimeout(ctx, time.Second)
		st, err := c.Status(rctx, &kmsapi.StatusRequest{})
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
	pt := []byte("a 32-byte DEK seed for hwkms dev")
	rctx, rcancel := context.WithTimeout(ctx, 5*time.Second)
	defer rcancel()
	enc, err := c.Encrypt(rctx, &kmsapi.EncryptRequest{Plaintext: pt, Uid: "dev"})
	if err != nil {
		t.Fatal(err)
	}
	// frame version, backend TPM (0x02), then the body: version 2, 32-byte nonce,
	// ciphertext, tag.
	if len(enc.Ciphertext) != 2+1+32+len(pt)+16 || enc.Ciphertext[1] != 0x02 || enc.Ciphertext[2] != 0x02 {
		t.Fatalf("ciphertext %x: want a TPM frame around a body of version 2", enc.Ciphertext)
	}
	dec, err := c.Decrypt(rctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId, Uid: "dev"})
	if err != nil || !bytes.Equal(dec.Plaintext, pt) {
		t.Fatalf("Decrypt: %v", err)
	}
}
