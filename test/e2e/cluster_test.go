package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kmsv2api "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2"
)

// providerName is the KMS provider's name in the EncryptionConfiguration; the stored
// values start with storagePrefix.
const (
	providerName  = "hwkms"
	storagePrefix = "k8s:enc:kms:v2:" + providerName + ":"
)

// cluster is one device, hwkms, etcd and kube-apiserver, started for one test.
type cluster struct {
	t       testing.TB
	backend string
	dir     string
	dev     *device
	kms     *hwkms
	etcd    *etcdServer
	api     *apiServer
	kcm     *controllerManager // nil unless clusterOptions.ControllerManager
	// KeyID is the key_id hwkms reported at start.
	KeyID string
}

// clusterOptions tune newCluster.
type clusterOptions struct {
	QPS   float32 // of the test's client; client-go's default when 0
	Burst int
	// Device, if set, makes the device instead of newDevice (a pkcs11 token other
	// than SoftHSM2: opencryptoki_test.go).
	Device func(t testing.TB, dir string) *device
	// ControllerManager starts a kube-controller-manager running the
	// storage-version-migrator controller (controllermanager_test.go).
	ControllerManager bool
	// APIServerArgs are added to kube-apiserver's flags.
	APIServerArgs []string
}

// newCluster creates KEK 1 on a fresh device of the backend with `hwkms key create`,
// starts `hwkms serve` with it as the only key, then etcd and a kube-apiserver that
// encrypts Secrets with it (and, with opts.ControllerManager, a kube-controller-manager).
// Everything is stopped in t.Cleanup, in reverse order.
func newCluster(t testing.TB, backend string, opts clusterOptions) *cluster {
	t.Helper()
	began := time.Now()
	dir := t.TempDir()
	dumpLogsOnFailure(t, dir)
	c := &cluster{t: t, backend: backend, dir: dir}
	if opts.Device != nil {
		c.dev = opts.Device(t, dir)
	} else {
		c.dev = newDevice(t, backend, dir)
	}
	c.kms = newHwkms(t, c.dev, dir, 1)
	created := c.kms.createKey(0)
	c.KeyID = c.kms.start()
	if c.KeyID != created {
		t.Fatalf("hwkms Status key_id %q differs from the key_id `hwkms key create` printed, %q", c.KeyID, created)
	}
	c.etcd = startEtcd(t, dir)
	encCfg := filepath.Join(dir, "encryption.yaml")
	if err := os.WriteFile(encCfg, fmt.Appendf(nil, encryptionConfig, providerName, c.kms.Socket), 0o600); err != nil {
		t.Fatal(err)
	}
	c.api = startAPIServer(t, apiServerOptions{
		Dir:              dir,
		EtcdURL:          c.etcd.URL,
		EncryptionConfig: encCfg,
		QPS:              opts.QPS,
		Burst:            opts.Burst,
		ExtraArgs:        opts.APIServerArgs,
	})
	if opts.ControllerManager {
		c.kcm = startControllerManager(t, c.api)
	}
	t.Logf("%s cluster up in %s; hwkms key_id %s", backend, time.Since(began).Round(10*time.Millisecond), c.KeyID)
	return c
}

// encryptionConfig encrypts Secrets with the KMS v2 provider (name, socket path);
// identity second, as a cluster that turned encryption on would have it.
const encryptionConfig = `apiVersion: apiserver.config.k8s.io/v1
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
`

// forEachBackend runs f as a parallel subtest per backend: each has its own processes,
// and most of a scenario's time is spent waiting for kube-apiserver's timers.
func forEachBackend(t *testing.T, f func(t *testing.T, backend string)) {
	for _, b := range backends {
		t.Run(b, func(t *testing.T) {
			t.Parallel()
			f(t, b)
		})
	}
}

// forEachBackendSerial runs f as a subtest per backend, one after the other, for
// measurements that must not share the CPUs.
func forEachBackendSerial(t *testing.T, f func(t *testing.T, backend string)) {
	for _, b := range backends {
		t.Run(b, func(t *testing.T) { f(t, b) })
	}
}

// ctx returns a context for one API call.
func (c *cluster) ctx() context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	c.t.Cleanup(cancel)
	return ctx
}

// newSecretData returns Secret data holding a random, recognisable plaintext.
func newSecretData(t testing.TB) (map[string][]byte, []byte) {
	plain := []byte("hwkms-e2e-plaintext-" + randomHex(t, 16))
	return map[string][]byte{"value": plain}, plain
}

// createSecret creates a Secret in namespace default and fails the test on error.
func (c *cluster) createSecret(name string, data map[string][]byte) *corev1.Secret {
	c.t.Helper()
	s, err := c.api.Client.CoreV1().Secrets("default").Create(c.ctx(), &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Data:       data,
	}, metav1.CreateOptions{})
	if err != nil {
		c.t.Fatalf("create Secret default/%s through kube-apiserver: %v", name, err)
	}
	return s
}

// getSecret reads a Secret in namespace default through kube-apiserver.
func (c *cluster) getSecret(name string) (*corev1.Secret, error) {
	return c.api.Client.CoreV1().Secrets("default").Get(c.ctx(), name, metav1.GetOptions{})
}

// mustReadSecret reads a Secret and checks its data equals want.
func (c *cluster) mustReadSecret(name string, want map[string][]byte) {
	c.t.Helper()
	s, err := c.getSecret(name)
	if err != nil {
		c.t.Fatalf("read Secret default/%s through kube-apiserver: %v", name, err)
	}
	if !equalData(s.Data, want) {
		c.t.Fatalf("Secret default/%s read back with different data: got %q, want %q", name, s.Data, want)
	}
}

func equalData(a, b map[string][]byte) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || !bytes.Equal(v, w) {
			return false
		}
	}
	return true
}

// stored reads Secret default/name straight from etcd, checks it carries the KMS v2
// prefix and returns the parsed EncryptedObject and the raw value.
func (c *cluster) stored(name string) (*kmsv2api.EncryptedObject, []byte) {
	c.t.Helper()
	raw := c.etcd.raw(c.t, secretKey("default", name))
	obj, err := parseStored(raw)
	if err != nil {
		c.t.Fatalf("Secret default/%s in etcd: %v", name, err)
	}
	return obj, raw
}

// parseStored checks the KMS v2 prefix of a stored value and parses the
// EncryptedObject after it.
func parseStored(raw []byte) (*kmsv2api.EncryptedObject, error) {
	if !bytes.HasPrefix(raw, []byte(storagePrefix)) {
		n := min(len(raw), len(storagePrefix)+8)
		return nil, fmt.Errorf("stored value does not start with %q: starts with %q", storagePrefix, raw[:n])
	}
	obj := &kmsv2api.EncryptedObject{}
	if err := proto.Unmarshal(raw[len(storagePrefix):], obj); err != nil {
		return nil, fmt.Errorf("stored value after %q is not an EncryptedObject: %w", storagePrefix, err)
	}
	return obj, nil
}

// marshalStored is the inverse of parseStored.
func marshalStored(t testing.TB, obj *kmsv2api.EncryptedObject) []byte {
	t.Helper()
	b, err := proto.Marshal(obj)
	if err != nil {
		t.Fatal(err)
	}
	return append([]byte(storagePrefix), b...)
}

// readyzCheck GETs /readyz/<check> (/readyz for "") and returns the status code and
// body.
func (c *cluster) readyzCheck(check string) (int, string) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	path := "/readyz"
	if check != "" {
		path += "/" + check
	}
	return c.api.get(ctx, path)
}
