package test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"
)

func mustStatus(tb testing.TB, socket string) *kmsapi.StatusResponse {
	tb.Helper()
	st, err := statusOnce(socket)
	if err != nil {
		tb.Fatalf("Status: %v", err)
	}
	if st.Version != "v2" || st.Healthz != "ok" || st.KeyId == "" {
		tb.Fatalf("Status = version %q healthz %q key_id %q; want v2, ok, non-empty", st.Version, st.Healthz, st.KeyId)
	}
	return st
}

func randomBytes(tb testing.TB, n int) []byte {
	tb.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		tb.Fatal(err)
	}
	return b
}

// roundTrip encrypts plain and decrypts it again through c, checking the key_id against
// Status's and the result against plain. It returns the Encrypt response.
func roundTrip(tb testing.TB, c kmsapi.KeyManagementServiceClient, keyID string, plain []byte) *kmsapi.EncryptResponse {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
	defer cancel()
	enc, err := c.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: plain, Uid: "round-trip"})
	if err != nil {
		tb.Fatalf("Encrypt of %d bytes: %v", len(plain), err)
	}
	if enc.KeyId != keyID {
		tb.Errorf("Encrypt key_id = %q, Status key_id = %q", enc.KeyId, keyID)
	}
	if n := len(enc.Ciphertext); n == 0 || n > 1024 {
		tb.Errorf("Encrypt ciphertext is %d bytes, want 1..1024", n)
	}
	if len(enc.Annotations) != 0 {
		tb.Errorf("Encrypt returned annotations %v; hwkms produces none", enc.Annotations)
	}
	dec, err := c.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId, Uid: "round-trip"})
	if err != nil {
		tb.Fatalf("Decrypt of a fresh ciphertext: %v", err)
	}
	if !bytes.Equal(dec.Plaintext, plain) {
		tb.Fatalf("Decrypt returned different bytes than were encrypted")
	}
	return enc
}

// TestBadInputOverSocket sends what a broken or hostile client (or a corrupted etcd)
// could send, over the real socket, and checks the documented code for each, that the
// server keeps serving, and that its log leaks neither plaintext nor the PIN.
func TestBadInputOverSocket(t *testing.T) {
	p := startDev(t, "debug")
	pinFile, err := os.ReadFile(filepath.Join(p.Dir, "user.pin"))
	if err != nil {
		t.Fatal(err)
	}
	badInputSuite(t, p, strings.TrimSpace(string(pinFile)))
	if out := p.Stdout.String(); strings.Contains(out, strings.TrimSpace(string(pinFile))) {
		t.Errorf("hwkms dev's stdout contains the PIN")
	}
}

// badInputSuite is TestBadInputOverSocket on any hwkms process p serving at log level
// debug with a token whose user PIN is pin (the interop matrix runs it on every
// PKCS#11 implementation). It stops p at the end to read its whole log.
func badInputSuite(t *testing.T, p *proc, pin string) {
	c := dial(t, p.Socket)
	keyID := mustStatus(t, p.Socket).KeyId

	// Every plaintext sent in this test, to look for in the log afterwards.
	var sent [][]byte
	seed := randomBytes(t, 32)
	sent = append(sent, seed)
	good := roundTrip(t, c, keyID, seed)
	ct := good.Ciphertext

	flip := func(i int) []byte {
		b := bytes.Clone(ct)
		b[i] ^= 0x01
		return b
	}
	// A ciphertext that hwkms produced, decrypted under a key_id it does not have.
	const unknownKeyID = "hwkms-test-unknown-key-0001"

	decrypts := []struct {
		name     string
		req      *kmsapi.DecryptRequest
		code     codes.Code
		contains string // the message must name this
	}{
		{"tampered first body byte", &kmsapi.DecryptRequest{Ciphertext: flip(2), KeyId: keyID}, codes.InvalidArgument, ""},
		{"tampered middle byte", &kmsapi.DecryptRequest{Ciphertext: flip(len(ct) / 2), KeyId: keyID}, codes.InvalidArgument, ""},
		{"tampered last byte", &kmsapi.DecryptRequest{Ciphertext: flip(len(ct) - 1), KeyId: keyID}, codes.InvalidArgument, ""},
		{"tampered frame version", &kmsapi.DecryptRequest{Ciphertext: flip(0), KeyId: keyID}, codes.InvalidArgument, ""},
		{"tampered backend byte", &kmsapi.DecryptRequest{Ciphertext: flip(1), KeyId: keyID}, codes.InvalidArgument, ""},
		{"truncated by one byte", &kmsapi.DecryptRequest{Ciphertext: ct[:len(ct)-1], KeyId: keyID}, codes.InvalidArgument, ""},
		{"truncated to the header", &kmsapi.DecryptRequest{Ciphertext: ct[:2], KeyId: keyID}, codes.InvalidArgument, ""},
		{"truncated to one byte", &kmsapi.DecryptRequest{Ciphertext: ct[:1], KeyId: keyID}, codes.InvalidArgument, ""},
		{"extended by one byte", &kmsapi.DecryptRequest{Ciphertext: append(bytes.Clone(ct), 0), KeyId: keyID}, codes.InvalidArgument, ""},
		{"empty ciphertext", &kmsapi.DecryptRequest{Ciphertext: nil, KeyId: keyID}, codes.InvalidArgument, ""},
		{"oversize ciphertext 2 KiB", &kmsapi.DecryptRequest{Ciphertext: append(bytes.Clone(ct), make([]byte, 2048-len(ct))...), KeyId: keyID}, codes.InvalidArgument, ""},
		{"random ciphertext", &kmsapi.DecryptRequest{Ciphertext: randomBytes(t, len(ct)), KeyId: keyID}, codes.InvalidArgument, ""},
		{"unknown key_id", &kmsapi.DecryptRequest{Ciphertext: ct, KeyId: unknownKeyID}, codes.NotFound, unknownKeyID},
		{"empty key_id", &kmsapi.DecryptRequest{Ciphertext: ct, KeyId: ""}, codes.InvalidArgument, ""},
		{"oversize key_id", &kmsapi.DecryptRequest{Ciphertext: ct, KeyId: strings.Repeat("k", 1025)}, codes.InvalidArgument, ""},
		{"annotations present", &kmsapi.DecryptRequest{Ciphertext: ct, KeyId: keyID, Annotations: map[string][]byte{"version.hwkms.io": []byte("1")}}, codes.InvalidArgument, ""},
	}
	for _, tc := range decrypts {
		t.Run("Decrypt/"+tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
			defer cancel()
			tc.req.Uid = "bad-input"
			resp, err := c.Decrypt(ctx, tc.req)
			if got := status.Code(err); got != tc.code {
				t.Errorf("code = %v, want %v (err %v)", got, tc.code, err)
			}
			if resp != nil {
				t.Errorf("got a response with %d bytes of plaintext", len(resp.Plaintext))
			}
			if tc.contains != "" && !strings.Contains(status.Convert(err).Message(), tc.contains) {
				t.Errorf("message %q does not name %q", status.Convert(err).Message(), tc.contains)
			}
			plain := randomBytes(t, 32)
			sent = append(sent, plain)
			roundTrip(t, c, keyID, plain)
		})
	}

	encrypts := []struct {
		name  string
		plain []byte
		code  codes.Code
	}{
		{"empty plaintext", nil, codes.InvalidArgument},
		{"plaintext 97 bytes", randomBytes(t, 97), codes.InvalidArgument},
		{"plaintext 4 KiB", randomBytes(t, 4<<10), codes.InvalidArgument},
	}
	for _, tc := range encrypts {
		t.Run("Encrypt/"+tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
			defer cancel()
			sent = append(sent, tc.plain)
			resp, err := c.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: tc.plain, Uid: "bad-input"})
			if got := status.Code(err); got != tc.code {
				t.Errorf("code = %v, want %v (err %v)", got, tc.code, err)
			}
			if resp != nil {
				t.Errorf("got a response with %d bytes of ciphertext", len(resp.Ciphertext))
			}
			plain := randomBytes(t, 32)
			sent = append(sent, plain)
			roundTrip(t, c, keyID, plain)
		})
	}

	// hwkms caps a gRPC request at 1 MiB (plugin/socket.go maxRecvMsgSize): below it
	// hwkms's own limit check answers InvalidArgument (docs/contract.md), above it
	// grpc-go refuses the message with ResourceExhausted before hwkms sees it. Either
	// is a refusal the client cannot retry its way out of; what matters is that nothing
	// is encrypted and the server keeps serving.
	for _, tc := range []struct {
		name string
		size int
		want codes.Code
	}{
		{"Encrypt/plaintext 128 KiB under the gRPC message limit", 128 << 10, codes.InvalidArgument},
		{"Encrypt/plaintext 2 MiB over the gRPC message limit", 2 << 20, codes.ResourceExhausted},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
			defer cancel()
			big := randomBytes(t, tc.size)
			sent = append(sent, big)
			resp, err := c.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: big, Uid: "bad-input"})
			if got := status.Code(err); got != tc.want {
				t.Errorf("code = %v, want %v (err %v)", got, tc.want, err)
			}
			if resp != nil {
				t.Errorf("got a response with %d bytes of ciphertext", len(resp.Ciphertext))
			}
			plain := randomBytes(t, 32)
			sent = append(sent, plain)
			roundTrip(t, c, keyID, plain)
		})
	}

	t.Run("limits accepted", func(t *testing.T) {
		for _, n := range []int{1, 32, 96} {
			plain := randomBytes(t, n)
			sent = append(sent, plain)
			roundTrip(t, c, keyID, plain)
		}
	})

	// Stop first so every log line is flushed, then look for secrets in the log.
	p.stop(t)
	logs := p.Stderr.Bytes()
	if !bytes.Contains(logs, []byte("code=InvalidArgument")) || !bytes.Contains(logs, []byte("method=Decrypt")) {
		t.Fatalf("hwkms's debug log does not record the requests; the leak check below would prove nothing:\n%s", logs)
	}
	if pin == "" {
		t.Fatal("the PIN is empty")
	}
	secrets := map[string][]byte{"PIN": []byte(pin)}
	for i, s := range sent {
		// Short plaintexts (1 byte) match by chance; 8 bytes or more do not.
		if len(s) < 8 {
			continue
		}
		for form, b := range map[string][]byte{
			"raw":    s,
			"hex":    []byte(hex.EncodeToString(s)),
			"HEX":    []byte(strings.ToUpper(hex.EncodeToString(s))),
			"base64": []byte(base64.StdEncoding.EncodeToString(s)),
		} {
			secrets["plaintext "+strconv.Itoa(i)+" "+form] = b
		}
	}
	for name, s := range secrets {
		if bytes.Contains(logs, s) {
			t.Errorf("hwkms's log contains the %s", name)
		}
	}
}
