package e2e

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kmsv2api "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2"
)

// Scenario 1: Secrets created through kube-apiserver are stored in etcd as KMS v2
// EncryptedObjects under hwkms's key_id, their plaintext nowhere in the raw value, and
// read back equal.
func TestSecretsStoredEncrypted(t *testing.T) {
	forEachBackend(t, func(t *testing.T, backend string) {
		c := newCluster(t, backend, clusterOptions{})

		// Control: a ConfigMap is not encrypted, so its plaintext must be visible in
		// etcd. This proves the raw reads below would see plaintext if it were there.
		cmData, cmPlain := newSecretData(t)
		_, err := c.api.Client.CoreV1().ConfigMaps("default").Create(c.ctx(), &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Name: "control"},
			Data:       map[string]string{"value": string(cmData["value"])},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("create ConfigMap: %v", err)
		}
		if raw := c.etcd.raw(t, "/registry/configmaps/default/control"); !bytes.Contains(raw, cmPlain) {
			t.Fatalf("control ConfigMap's plaintext is not in its raw etcd value: the raw reads cannot be trusted")
		}

		const n = 10
		want := map[string]map[string][]byte{}
		seeds := map[string]bool{}
		for i := range n {
			name := fmt.Sprintf("s1-%d", i)
			data, plain := newSecretData(t)
			want[name] = data
			c.createSecret(name, data)
			obj, raw := c.stored(name)
			if bytes.Contains(raw, plain) {
				t.Errorf("Secret default/%s: plaintext %q appears in the raw etcd value", name, plain)
			}
			if bytes.Contains(raw, []byte(name)) {
				t.Errorf("Secret default/%s: its name appears inside the encrypted etcd value (only the key should carry it)", name)
			}
			if obj.KeyID != c.KeyID {
				t.Errorf("Secret default/%s: stored key_id %q, want hwkms's %q", name, obj.KeyID, c.KeyID)
			}
			if l := len(obj.EncryptedDEKSource); l == 0 || l > 1024 {
				t.Errorf("Secret default/%s: encrypted DEK source is %d bytes, want 1..1024", name, l)
			}
			if len(obj.EncryptedData) == 0 {
				t.Errorf("Secret default/%s: no encrypted data", name)
			}
			seeds[string(obj.EncryptedDEKSource)] = true
		}
		for name, data := range want {
			c.mustReadSecret(name, data)
		}
		enc := c.kms.requestCounts(0)
		t.Logf("%d Secrets stored under %d DEK seed(s); hwkms served %d Encrypt, %d Decrypt", n, len(seeds), enc["Encrypt OK"], enc["Decrypt OK"])
		if enc["Encrypt OK"] == 0 {
			t.Errorf("hwkms logged no successful Encrypt: kube-apiserver did not get its DEK seed wrapped by hwkms")
		}
	})
}

// Scenario 2: hwkms crashes (SIGKILL, leaving its socket file) and comes back. While
// it is down kube-apiserver's KMS readiness check fails; reads and writes on the
// cached seed continue; after the restart the check recovers on its own and reads and
// writes work, with the same key_id.
func TestHwkmsRestart(t *testing.T) {
	forEachBackend(t, func(t *testing.T, backend string) {
		c := newCluster(t, backend, clusterOptions{})
		check := c.kmsCheckName()
		if check != "kms-providers" {
			t.Fatalf("kube-apiserver runs with --encryption-provider-config-automatic-reload, so its KMS readiness check should be kms-providers, not %s", check)
		}
		before, _ := newSecretData(t)
		c.createSecret("before", before)

		c.kms.kill()
		down := time.Now()
		var body string
		err := waitFor(context.Background(), 90*time.Second, 500*time.Millisecond, nil, func(context.Context) error {
			code, b := c.readyzCheck(check)
			if code == 200 {
				return fmt.Errorf("/readyz/%s still 200", check)
			}
			body = b
			return nil
		})
		if err != nil {
			t.Fatalf("hwkms is down but kube-apiserver's /readyz/%s did not report it: %v", check, err)
		}
		t.Logf("hwkms down: /readyz/%s failed after %s: %s", check, time.Since(down).Round(time.Millisecond), lastLines(body, 2))
		if code, _ := c.readyzCheck(""); code == 200 {
			t.Errorf("hwkms is down and /readyz/%s fails, but /readyz is 200", check)
		}

		// KMS v2: the apiserver keeps its current seed; cached reads and writes go on.
		c.mustReadSecret("before", before)
		during, _ := newSecretData(t)
		c.createSecret("during", during)

		since := len(c.kms.logRecords(""))
		keyID := c.kms.start()
		if keyID != c.KeyID {
			t.Errorf("key_id changed across an hwkms restart: %q, then %q", c.KeyID, keyID)
		}
		up := time.Now()
		err = waitFor(context.Background(), 90*time.Second, 500*time.Millisecond, nil, func(context.Context) error {
			if code, b := c.readyzCheck(check); code != 200 {
				return fmt.Errorf("/readyz/%s: %d %s", check, code, lastLines(b, 2))
			}
			return nil
		})
		if err != nil {
			t.Fatalf("hwkms is back but kube-apiserver's KMS check did not recover: %v", err)
		}
		t.Logf("hwkms back: /readyz/%s ok after %s", check, time.Since(up).Round(time.Millisecond))
		if err := waitFor(context.Background(), 30*time.Second, 250*time.Millisecond, nil, func(context.Context) error {
			if code, b := c.readyzCheck(""); code != 200 {
				return fmt.Errorf("/readyz: %d %s", code, lastLines(b, 3))
			}
			return nil
		}); err != nil {
			t.Fatalf("kube-apiserver /readyz did not recover after hwkms came back: %v", err)
		}

		after, _ := newSecretData(t)
		c.createSecret("after", after)
		c.mustReadSecret("before", before)
		c.mustReadSecret("during", during)
		c.mustReadSecret("after", after)
		if got := c.kms.requestCounts(since)["Status OK"]; got == 0 {
			t.Errorf("the restarted hwkms served no Status call: kube-apiserver did not reconnect to it")
		}
		for _, name := range []string{"before", "during", "after"} {
			if obj, _ := c.stored(name); obj.KeyID != c.KeyID {
				t.Errorf("Secret %s stored with key_id %q, want %q", name, obj.KeyID, c.KeyID)
			}
		}
	})
}

// Scenario 3: kube-apiserver restarts; every Secret still reads, which needs a fresh
// Decrypt from hwkms because the new process has no cached seed.
func TestAPIServerRestart(t *testing.T) {
	forEachBackend(t, func(t *testing.T, backend string) {
		c := newCluster(t, backend, clusterOptions{})
		const n = 20
		want := map[string]map[string][]byte{}
		for i := range n {
			name := fmt.Sprintf("s3-%d", i)
			want[name], _ = newSecretData(t)
			c.createSecret(name, want[name])
		}
		since := len(c.kms.logRecords(""))
		c.api.restart()
		for name, data := range want {
			c.mustReadSecret(name, data)
		}
		counts := c.kms.requestCounts(since)
		t.Logf("after the kube-apiserver restart hwkms served: %v", counts)
		if counts["Decrypt OK"] == 0 {
			t.Errorf("every Secret read after the restart but hwkms served no Decrypt: the reads did not go through hwkms")
		}
		for k, v := range counts {
			if !strings.HasSuffix(k, " OK") {
				t.Errorf("hwkms answered %d %s after the kube-apiserver restart", v, k)
			}
		}
		more, _ := newSecretData(t)
		c.createSecret("after-restart", more)
		c.mustReadSecret("after-restart", more)
	})
}

// Scenario 5: one byte flipped in a stored value gives a read error, never wrong data,
// and kube-apiserver keeps serving other Secrets. Flipped in the DEK seed's ciphertext
// (hwkms must refuse it) and in the data ciphertext (kube-apiserver's AES-GCM must).
func TestTamperedValue(t *testing.T) {
	forEachBackend(t, func(t *testing.T, backend string) {
		c := newCluster(t, backend, clusterOptions{})
		for _, tc := range []struct {
			name string
			flip func(*kmsv2api.EncryptedObject)
			// hwkms must see and refuse the tampered ciphertext.
			wantRefusal bool
		}{
			{name: "seed-ciphertext", flip: func(o *kmsv2api.EncryptedObject) { flipByte(o.EncryptedDEKSource) }, wantRefusal: true},
			{name: "data-ciphertext", flip: func(o *kmsv2api.EncryptedObject) { flipByte(o.EncryptedData) }},
		} {
			t.Run(tc.name, func(t *testing.T) {
				victim, bystander := "victim-"+tc.name, "bystander-"+tc.name
				vdata, vplain := newSecretData(t)
				bdata, _ := newSecretData(t)
				c.createSecret(victim, vdata)
				c.createSecret(bystander, bdata)

				obj, _ := c.stored(victim)
				tampered := proto.Clone(obj).(*kmsv2api.EncryptedObject)
				tc.flip(tampered)
				since := len(c.kms.logRecords(""))
				c.etcd.put(t, secretKey("default", victim), marshalStored(t, tampered))

				s, err := c.getSecret(victim)
				if err == nil {
					if bytes.Equal(s.Data["value"], vplain) {
						t.Fatalf("tampered Secret %s read back its original data: the flipped byte was not detected", victim)
					}
					t.Fatalf("tampered Secret %s read back WRONG data %q instead of an error", victim, s.Data)
				}
				if apierrors.IsNotFound(err) {
					t.Fatalf("tampered Secret %s: got NotFound, want a decryption error: %v", victim, err)
				}
				t.Logf("read of tampered Secret failed as it must: %v", err)

				c.mustReadSecret(bystander, bdata)
				fresh, _ := newSecretData(t)
				c.createSecret("fresh-"+tc.name, fresh)
				c.mustReadSecret("fresh-"+tc.name, fresh)

				counts := c.kms.requestCounts(since)
				t.Logf("hwkms served after the tampering: %v", counts)
				if tc.wantRefusal && counts["Decrypt InvalidArgument"] == 0 {
					t.Errorf("hwkms did not refuse the tampered seed ciphertext with InvalidArgument (served %v)", counts)
				}
				if counts["Decrypt OK"] > 0 && tc.wantRefusal {
					t.Errorf("hwkms decrypted %d seed ciphertext(s) after the tampering; only refusals were expected", counts["Decrypt OK"])
				}
			})
		}
	})
}

// flipByte flips the low bit of the middle byte of b.
func flipByte(b []byte) { b[len(b)/2] ^= 0x01 }

// kmsCheckName returns the name of kube-apiserver's KMS readiness check:
// "kms-providers" with automatic config reload, "kms-provider-0" without.
func (c *cluster) kmsCheckName() string {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	code, body := c.api.get(ctx, "/readyz?verbose")
	if code != 200 {
		c.t.Fatalf("/readyz?verbose: %d %s", code, body)
	}
	for _, line := range strings.Split(body, "\n") {
		if name, ok := strings.CutPrefix(strings.TrimSpace(line), "[+]kms-provider"); ok {
			return "kms-provider" + strings.Fields(name)[0]
		}
	}
	c.t.Fatalf("no KMS check in /readyz?verbose:\n%s", body)
	return ""
}
