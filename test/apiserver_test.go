package test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apiserver/pkg/server/healthz"
	"k8s.io/apiserver/pkg/server/options/encryptionconfig"
	"k8s.io/apiserver/pkg/storage/value"
	kmstypes "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2"
)

// providerName is the KMS provider name of the EncryptionConfiguration; the stored
// prefix is "k8s:enc:kms:v2:" + providerName + ":".
const (
	providerName = "hwkms"
	storedPrefix = "k8s:enc:kms:v2:" + providerName + ":"
)

var secrets = schema.GroupResource{Resource: "secrets"}

// writeEncryptionConfig writes the EncryptionConfiguration that `hwkms dev` prints, for
// socket, and returns its path.
func writeEncryptionConfig(tb testing.TB, socket string) string {
	tb.Helper()
	cfg := fmt.Sprintf(`apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources:
      - secrets
    providers:
      - kms:
          apiVersion: v2
          name: %s
          endpoint: unix://%s
          timeout: 3s
      - identity: {}
`, providerName, socket)
	path := filepath.Join(tb.TempDir(), "encryption-config.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		tb.Fatal(err)
	}
	return path
}

// apiserver is what one kube-apiserver process builds from its EncryptionConfiguration.
type apiserver struct {
	Transformer value.Transformer
	Health      healthz.HealthChecker
}

// loadAPIServer loads the EncryptionConfiguration at path as kube-apiserver does at
// start (a new process: new gRPC connection, new DEK cache), and waits until its KMS
// health check passes: until then the KMS v2 provider has no seed and cannot read or
// write. The goroutines it starts stop at cleanup.
func loadAPIServer(tb testing.TB, path string) *apiserver {
	tb.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	tb.Cleanup(cancel)
	ec, err := encryptionconfig.LoadEncryptionConfig(ctx, path, false, "test-apiserver-id")
	if err != nil {
		tb.Fatalf("LoadEncryptionConfig: %v", err)
	}
	tr, ok := ec.Transformers[secrets]
	if !ok {
		tb.Fatalf("no transformer for %v; have %v", secrets, ec.Transformers)
	}
	// KMS v2 only: LoadEncryptionConfig folds the probes into one "kms-providers" check.
	if len(ec.HealthChecks) != 1 {
		tb.Fatalf("got %d health checks, want 1 (KMS v2 only)", len(ec.HealthChecks))
	}
	a := &apiserver{Transformer: tr, Health: ec.HealthChecks[0]}
	a.waitHealthy(tb)
	return a
}

// waitHealthy polls the health check as /readyz would, until it passes.
func (a *apiserver) waitHealthy(tb testing.TB) {
	tb.Helper()
	deadline := time.Now().Add(readyTimeout)
	for {
		err := a.Health.Check(httptest.NewRequest("GET", "/readyz", nil))
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			tb.Fatalf("health check %q did not pass within %s: %v", a.Health.Name(), readyTimeout, err)
		}
		time.Sleep(pollEvery)
	}
}

func (a *apiserver) write(tb testing.TB, key string, data []byte) []byte {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
	defer cancel()
	out, err := a.Transformer.TransformToStorage(ctx, data, value.DefaultContext(key))
	if err != nil {
		tb.Fatalf("TransformToStorage(%s): %v", key, err)
	}
	return out
}

func (a *apiserver) read(key string, stored []byte) ([]byte, bool, error) {
	ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
	defer cancel()
	return a.Transformer.TransformFromStorage(ctx, stored, value.DefaultContext(key))
}

// mustRead reads stored and checks it equals want and is not stale.
func (a *apiserver) mustRead(tb testing.TB, key string, stored, want []byte) {
	tb.Helper()
	got, stale, err := a.read(key, stored)
	if err != nil {
		tb.Fatalf("TransformFromStorage(%s): %v", key, err)
	}
	if !bytes.Equal(got, want) {
		tb.Fatalf("TransformFromStorage(%s) returned %d bytes that differ from the %d written", key, len(got), len(want))
	}
	if stale {
		tb.Errorf("TransformFromStorage(%s): stale = true, want false (the key_id did not change)", key)
	}
}

// secretPayload returns a Secret-like JSON object of about n bytes, with random data
// so no part of it can appear in the stored bytes by chance.
func secretPayload(tb testing.TB, name string, n int) []byte {
	tb.Helper()
	raw := make([]byte, n*3/4)
	if _, err := rand.Read(raw); err != nil {
		tb.Fatal(err)
	}
	return fmt.Appendf(nil, `{"apiVersion":"v1","kind":"Secret","metadata":{"name":%q,"namespace":"default"},"type":"Opaque","data":{"key":%q}}`,
		name, base64.StdEncoding.EncodeToString(raw))
}

// decodeStored strips the KMS v2 prefix and parses the EncryptedObject.
func decodeStored(tb testing.TB, stored []byte) *kmstypes.EncryptedObject {
	tb.Helper()
	if !bytes.HasPrefix(stored, []byte(storedPrefix)) {
		n := min(len(stored), len(storedPrefix)+8)
		tb.Fatalf("stored value starts with %q, want prefix %q", stored[:n], storedPrefix)
	}
	var obj kmstypes.EncryptedObject
	if err := proto.Unmarshal(stored[len(storedPrefix):], &obj); err != nil {
		tb.Fatalf("stored value is not an EncryptedObject: %v", err)
	}
	return &obj
}

func encodeStored(tb testing.TB, obj *kmstypes.EncryptedObject) []byte {
	tb.Helper()
	b, err := proto.Marshal(obj)
	if err != nil {
		tb.Fatal(err)
	}
	return append([]byte(storedPrefix), b...)
}

// decryptCalls counts the successful Decrypt requests in a debug log.
var decryptOK = regexp.MustCompile(`method=Decrypt .*code=OK`)

func decryptCalls(p *proc) int { return len(decryptOK.FindAllString(p.Stderr.String(), -1)) }

// TestAPIServerTransformer drives hwkms through k8s.io/apiserver's own KMS v2 code: the
// EncryptionConfiguration loader, the envelope transformer and the health check.
func TestAPIServerTransformer(t *testing.T) {
	p := startDev(t, "debug")
	apiserverSuite(t, p, func(t *testing.T) *proc { return serveDevConfig(t, p) })
}

// apiserverSuite is TestAPIServerTransformer on any hwkms process p serving at log
// level debug; restart starts it again (same config and key) after p was stopped. The
// interop matrix runs it on every PKCS#11 implementation.
func apiserverSuite(t *testing.T, p *proc, restart func(t *testing.T) *proc) {
	keyID := mustStatus(t, p.Socket).KeyId
	cfg := writeEncryptionConfig(t, p.Socket)

	first := loadAPIServer(t, cfg)
	if got := first.Health.Name(); got != "kms-providers" {
		t.Errorf("health check name = %q, want kms-providers", got)
	}

	type stored struct {
		key        string
		plain, out []byte
	}
	var all []stored
	for i, n := range []int{16, 300, 4 << 10, 64 << 10, 1 << 20} {
		key := fmt.Sprintf("/registry/secrets/default/s%d", i)
		plain := secretPayload(t, fmt.Sprintf("s%d", i), n)
		out := first.write(t, key, plain)
		obj := decodeStored(t, out)
		if bytes.Contains(out, plain) {
			t.Fatalf("%s: stored value contains the plaintext", key)
		}
		if obj.KeyID != keyID {
			t.Errorf("%s: EncryptedObject.KeyID = %q, want Status key_id %q", key, obj.KeyID, keyID)
		}
		if n := len(obj.EncryptedDEKSource); n == 0 || n > 1024 {
			t.Errorf("%s: EncryptedDEKSource is %d bytes, want 1..1024", key, n)
		}
		if len(obj.Annotations) != 0 {
			t.Errorf("%s: EncryptedObject has annotations %v; hwkms produces none", key, obj.Annotations)
		}
		first.mustRead(t, key, out, plain)
		all = append(all, stored{key, plain, out})
	}
	readAll := func(t *testing.T, a *apiserver) {
		t.Helper()
		for _, s := range all {
			a.mustRead(t, s.key, s.out, s.plain)
		}
	}

	t.Run("apiserver restart", func(t *testing.T) {
		before := decryptCalls(p)
		fresh := loadAPIServer(t, cfg)
		readAll(t, fresh)
		// The fresh process has an empty DEK cache: it must have asked hwkms. hwkms
		// logs a request after answering it, so give the line a moment to arrive.
		after := decryptCalls(p)
		for deadline := time.Now().Add(5 * time.Second); after <= before && time.Now().Before(deadline); after = decryptCalls(p) {
			time.Sleep(pollEvery)
		}
		if after <= before {
			t.Errorf("successful Decrypt requests in hwkms's log went %d -> %d; the fresh transformer did not call Decrypt", before, after)
		}
		// And what the new process writes, the old one reads.
		plain := secretPayload(t, "after-restart", 1000)
		out := fresh.write(t, "/registry/secrets/default/after-restart", plain)
		first.mustRead(t, "/registry/secrets/default/after-restart", out, plain)
	})

	t.Run("plugin restart", func(t *testing.T) {
		p.stop(t)
		p2 := restart(t)
		if got := mustStatus(t, p2.Socket).KeyId; got != keyID {
			t.Fatalf("key_id after restart = %q, want %q (same key)", got, keyID)
		}
		fresh := loadAPIServer(t, cfg)
		readAll(t, fresh)
		plain := secretPayload(t, "after-plugin-restart", 1000)
		out := fresh.write(t, "/registry/secrets/default/after-plugin-restart", plain)
		fresh.mustRead(t, "/registry/secrets/default/after-plugin-restart", out, plain)
		if err := fresh.Health.Check(httptest.NewRequest("GET", "/readyz", nil)); err != nil {
			t.Errorf("health check after plugin restart: %v", err)
		}
	})
}

// TestTamperedEtcdValue alters stored values the way a corrupted or malicious etcd
// could, and checks that a fresh apiserver gets an error from hwkms, never wrong data,
// while the untouched values still read.
func TestTamperedEtcdValue(t *testing.T) {
	tamperSuite(t, startDev(t, "info"))
}

// tamperSuite is TestTamperedEtcdValue on any hwkms process p (log level info or
// debug).
func tamperSuite(t *testing.T, p *proc) {
	cfg := writeEncryptionConfig(t, p.Socket)
	writer := loadAPIServer(t, cfg)

	good := map[string][]byte{}
	var goodKeys []string
	stored := map[string][]byte{}
	for i := range 3 {
		key := fmt.Sprintf("/registry/secrets/default/t%d", i)
		good[key] = secretPayload(t, key, 2000)
		stored[key] = writer.write(t, key, good[key])
		goodKeys = append(goodKeys, key)
	}
	victim := goodKeys[0]

	for _, tc := range []struct {
		name   string
		tamper func(*kmstypes.EncryptedObject)
		code   codes.Code
	}{
		{"flip middle byte of DEK source", func(o *kmstypes.EncryptedObject) { o.EncryptedDEKSource[len(o.EncryptedDEKSource)/2] ^= 0x01 }, codes.InvalidArgument},
		{"flip last byte of DEK source (tag)", func(o *kmstypes.EncryptedObject) { o.EncryptedDEKSource[len(o.EncryptedDEKSource)-1] ^= 0x80 }, codes.InvalidArgument},
		{"flip frame version byte", func(o *kmstypes.EncryptedObject) { o.EncryptedDEKSource[0] ^= 0x01 }, codes.InvalidArgument},
		{"flip backend byte", func(o *kmstypes.EncryptedObject) { o.EncryptedDEKSource[1] ^= 0x03 }, codes.InvalidArgument},
		{"truncate DEK source", func(o *kmstypes.EncryptedObject) {
			o.EncryptedDEKSource = o.EncryptedDEKSource[:len(o.EncryptedDEKSource)-4]
		}, codes.InvalidArgument},
		{"other key_id", func(o *kmstypes.EncryptedObject) { o.KeyID += "x" }, codes.NotFound},
		{"annotation added", func(o *kmstypes.EncryptedObject) { o.Annotations = map[string][]byte{"x.hwkms.io": []byte("1")} }, codes.InvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			obj := decodeStored(t, stored[victim])
			tc.tamper(obj)
			bad := encodeStored(t, obj)

			fresh := loadAPIServer(t, cfg) // empty DEK cache: must ask hwkms
			out, _, err := fresh.read(victim, bad)
			if err == nil {
				t.Fatalf("tampered value read without error (%d bytes, equal to original: %v)", len(out), bytes.Equal(out, good[victim]))
			}
			if out != nil {
				t.Errorf("tampered read returned %d bytes with its error", len(out))
			}
			if got := status.Code(err); got != tc.code {
				t.Errorf("error code = %v, want %v: %v", got, tc.code, err)
			}
			for _, key := range goodKeys {
				fresh.mustRead(t, key, stored[key], good[key])
			}
		})
	}
	if s := p.Stderr.String(); !strings.Contains(s, "code=InvalidArgument") || !strings.Contains(s, "code=NotFound") {
		t.Errorf("hwkms's log does not record the refused Decrypts:\n%s", s)
	}
}
