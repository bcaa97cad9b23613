package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Scenario 4: KEK rotation with kube-apiserver, following docs/rotation.md: `hwkms
// key rotate` creates the new key and puts it first in the config, the running hwkms
// sees the file change and reloads, kube-apiserver picks up the new key_id on its
// Status poll (up to 60 s), old Secrets read as stale, the storage audit counts them
// under the old key_id and key destroy refuses to destroy it, `hwkms storage migrate`
// rewrites them, etcd holds only the new key_id, the old key is dropped from the config
// and everything still reads, after a kube-apiserver restart so every seed goes through
// hwkms.
//
// The migration runs both ways storage migrate knows. On pkcs11 the cluster has a
// kube-controller-manager running the storage-version-migrator controller, so storage
// migrate finds storagemigration.k8s.io/v1 served and creates a StorageVersionMigration
// that the real controller runs. On tpm kube-apiserver runs with
// --runtime-config=storagemigration.k8s.io/v1=false, so storage migrate falls back to
// kubectl get -o json | kubectl replace. (The backend does not matter to the migration,
// which only talks to kube-apiserver; it only splits the two cases over the two
// parallel clusters.)
//
// Both keys live in one device and no step restarts hwkms for the rotation itself.
// On swtpm, which serves one connection at a time (as /dev/tpm0 does), `hwkms key
// rotate` cannot reach the TPM while hwkms serves, so the key is created ahead of time
// as docs/rotation.md says: hwkms stops, `key rotate` (without --apply) creates the
// key and prints the rotated config, hwkms starts again on the old config, and the
// rotated config is written while it serves: the reloaded keyring shares the running
// one's TPM connection.
func TestKeyRotation(t *testing.T) {
	forEachBackend(t, func(t *testing.T, backend string) {
		opts := clusterOptions{ControllerManager: true}
		if backend == "tpm" {
			opts = clusterOptions{APIServerArgs: []string{"--runtime-config", "storagemigration.k8s.io/v1=false"}}
		}
		c := newCluster(t, backend, opts)
		oldKey := c.KeyID
		const n = 10
		want := map[string]map[string][]byte{}
		for i := range n {
			name := fmt.Sprintf("s4-%d", i)
			want[name], _ = newSecretData(t)
			c.createSecret(name, want[name])
		}
		// Not stale yet: an unchanged update is a no-op that does not touch etcd.
		if c.replaceSecret("s4-0") {
			t.Fatalf("an unchanged update of s4-0 rewrote it before any rotation: kube-apiserver considers fresh data stale")
		}

		// 1. New key first in the config, created on the device; 2. hwkms reloads the file.
		var newKey string
		if backend == "tpm" {
			c.kms.stop()
			var rotated []byte
			newKey, rotated = c.kms.rotate()
			c.kms.start()
			before := len(c.kms.reloadResults())
			c.kms.writeConfigBytes(rotated)
			c.kms.waitReload(before, 2*time.Minute, "writing the rotated config")
		} else {
			before := len(c.kms.reloadResults())
			newKey, _ = c.kms.rotate("--apply")
			c.kms.waitReload(before, 2*time.Minute, "hwkms key rotate --apply")
		}
		if newKey == oldKey {
			t.Fatalf("the new key has the old key's key_id %q", newKey)
		}
		if got, err := c.kms.status(); err != nil || got != newKey {
			t.Fatalf("after the reload hwkms Status reports key_id %q (%v), want the new key's %q", got, err, newKey)
		}

		// 3. kube-apiserver polls Status every 60 s; wait until new writes use the new key.
		began := time.Now()
		probe := map[string][]byte{}
		c.createSecret("s4-probe", probe)
		err := waitFor(context.Background(), 150*time.Second, 2*time.Second, nil, func(context.Context) error {
			probe, _ = newSecretData(t)
			c.updateSecretData("s4-probe", probe)
			if obj, _ := c.stored("s4-probe"); obj.KeyID != newKey {
				return fmt.Errorf("new writes still use key_id %s", obj.KeyID)
			}
			return nil
		})
		if err != nil {
			t.Fatalf("kube-apiserver did not switch to the new key_id %s: %v", newKey, err)
		}
		want["s4-probe"] = probe
		t.Logf("kube-apiserver writes with the new key_id %s after %s", newKey, time.Since(began).Round(time.Second))

		// 4. Old Secrets still read (hwkms decrypts with the old, decrypt-only key) and
		// are stale: an unchanged update now rewrites them under the new key.
		for name, data := range want {
			c.mustReadSecret(name, data)
		}
		if obj, _ := c.stored("s4-1"); obj.KeyID != oldKey {
			t.Fatalf("s4-1 has key_id %s before migration, want the old %s", obj.KeyID, oldKey)
		}
		_, relic := c.stored("s4-2") // kept to show what removing the old key too early does
		if !c.replaceSecret("s4-1") {
			t.Fatalf("an unchanged update of s4-1 did not rewrite it after the rotation: kube-apiserver does not consider old-key data stale")
		}

		// The audit sees what is left to migrate: objects under the old key_id.
		encCfg := filepath.Join(c.dir, "encryption.yaml")
		before := c.auditKeyIDs(encCfg)
		if before[oldKey] == 0 || before[newKey] == 0 {
			t.Fatalf("storage audit before migration: key_ids %v, want objects under both the old %s and the new %s", before, oldKey, newKey)
		}
		// key destroy, given etcd, refuses while they are there, even with the old key
		// out of the config it is given (pkcs11: see step 8).
		destroy := func(config string) (string, error) {
			out, errOut, err := runHwkms(t, c.dev.env, "key", "destroy", "--config", config, "--key-id", oldKey, "--confirm", oldKey,
				"--etcd-servers", c.etcd.URL, "--encryption-provider-config", encCfg)
			return out + errOut, err
		}
		if backend != "tpm" {
			newOnly := filepath.Join(c.dir, "hwkms-new-key-only.yaml")
			if err := os.WriteFile(newOnly, c.kms.primaryOnlyConfig(), 0o600); err != nil {
				t.Fatal(err)
			}
			want := fmt.Sprintf("%d object(s) stored under key_id %s", before[oldKey], oldKey)
			if out, err := destroy(newOnly); err == nil || !strings.Contains(out, want) {
				t.Fatalf("key destroy before migration: %v, want a refusal with %q\n%s", err, want, out)
			}
			t.Logf("before migration key destroy refuses: %s", want)
		}

		// 5. Migrate everything, as docs/rotation.md step 4 says: hwkms storage migrate.
		began = time.Now()
		out, errOut, err := runHwkms(t, []string{"HOME=" + c.dir}, "storage", "migrate",
			"--encryption-provider-config", encCfg, "--kubectl", binaryPath(t, "E2E_KUBECTL"), "--kubeconfig", c.api.Kubeconfig,
			"--etcd-servers", c.etcd.URL, "--socket", c.kms.Socket)
		if err != nil {
			t.Fatalf("hwkms storage migrate: %v\nstdout:\n%s\nstderr:\n%s", err, out, errOut)
		}
		t.Logf("hwkms storage migrate took %s\nstdout:\n%s\nstderr:\n%s", time.Since(began).Round(100*time.Millisecond), out, errOut)
		for _, data := range want {
			if strings.Contains(out+errOut, string(data["value"])) {
				t.Fatalf("hwkms storage migrate printed a Secret's plaintext")
			}
		}
		if backend == "tpm" {
			if !strings.Contains(errOut, "does not serve storagemigration.k8s.io/v1; rewriting the objects with kubectl replace") {
				t.Errorf("storage migrate did not say it fell back to kubectl replace:\n%s", errOut)
			}
			var n int
			if _, err := fmt.Sscanf(out[strings.Index(out, "secrets: kubectl replace rewrote ")+len("secrets: kubectl replace rewrote "):], "%d", &n); err != nil || n < len(want) {
				t.Fatalf("storage migrate reported %d Secrets replaced (%v), want at least the test's %d:\n%s", n, err, len(want), out)
			}
		} else {
			if !strings.Contains(out, "secrets: StorageVersionMigration hwkms-secrets-") || !strings.Contains(out, " succeeded (") {
				t.Fatalf("storage migrate did not report a StorageVersionMigration for secrets that succeeded:\n%s", out)
			}
			c.checkSVMSucceeded("secrets")
		}
		if !strings.Contains(out, "no object is stored under any other KMS v2 key_id") {
			t.Errorf("storage migrate's audit does not say the old key_id is empty:\n%s", out)
		}
		ids := c.storedKeyIDs()
		if len(ids) != 1 || ids[newKey] == 0 {
			t.Fatalf("after storage migrate etcd holds key_ids %v, want only the new %s", ids, newKey)
		}
		t.Logf("after storage migrate etcd key_ids: %v", ids)
		if got := c.auditKeyIDs(encCfg); got[oldKey] != 0 || got[newKey] != int64(ids[newKey]) {
			t.Fatalf("storage audit after migration: key_ids %v, want none under the old %s and %d under the new", got, oldKey, ids[newKey])
		}

		// 6. Drop the old key (hwkms reloads the file), restart kube-apiserver so nothing
		// is cached, read all.
		reloads := len(c.kms.reloadResults())
		c.kms.dropOldKeys()
		c.kms.waitReload(reloads, 2*time.Minute, "dropping the old key from the config")
		if got, err := c.kms.status(); err != nil || got != newKey {
			t.Fatalf("after removing the old key hwkms Status reports %q (%v), want %q", got, err, newKey)
		}
		since := len(c.kms.logRecords(""))
		c.api.restart()
		for name, data := range want {
			c.mustReadSecret(name, data)
		}
		counts := c.kms.requestCounts(since)
		if counts["Decrypt OK"] == 0 {
			t.Errorf("all Secrets read after the restart but hwkms served no Decrypt")
		}
		for k, v := range counts {
			if !strings.HasSuffix(k, " OK") {
				t.Errorf("hwkms answered %d %s after the old key was removed", v, k)
			}
		}
		t.Logf("old key removed; after a kube-apiserver restart every Secret reads; hwkms served %v", counts)

		// 7. Data still under the removed key no longer reads, and hwkms says which key
		// it was (NotFound naming the key_id), as an operator who removed it too early sees.
		since = len(c.kms.logRecords(""))
		c.etcd.put(t, secretKey("default", "s4-2"), relic)
		if _, err := c.getSecret("s4-2"); err == nil {
			t.Fatalf("a value under the removed key %s still read", oldKey)
		} else if !strings.Contains(err.Error(), oldKey) {
			t.Errorf("reading a value under the removed key failed without naming the key_id %s: %v", oldKey, err)
		}
		if got := c.kms.requestCounts(since)["Decrypt NotFound"]; got == 0 {
			t.Errorf("hwkms did not answer NotFound for a seed under the removed key %s (served %v)", oldKey, c.kms.requestCounts(since))
		}

		// 8. key destroy, given etcd, refuses while an object is stored under the old
		// key_id (the relic), and destroys it once none is. (PKCS#11: key destroy finds
		// a key no longer in the config by key_id on the config's tokens; a retired TPM
		// blob is named by its own config, which this scenario does not keep.)
		if backend == "tpm" {
			return
		}
		if out, err := destroy(c.kms.Config); err == nil || !strings.Contains(out, "1 object(s) stored under key_id "+oldKey) {
			t.Fatalf("key destroy with the relic under the old key: %v\n%s", err, out)
		}
		if _, err := c.etcd.Client.Delete(c.ctx(), secretKey("default", "s4-2")); err != nil {
			t.Fatal(err)
		}
		if out, err := destroy(c.kms.Config); err != nil || !strings.Contains(out, "destroyed key_id "+oldKey) {
			t.Fatalf("key destroy with nothing under the old key: %v\n%s", err, out)
		}
		t.Logf("key destroy refused while 1 object was under %s, destroyed it once none was", oldKey)
	})
}

// auditKeyIDs runs `hwkms storage audit --json` against the cluster's etcd and returns
// the objects per KMS v2 key_id.
func (c *cluster) auditKeyIDs(encCfg string) map[string]int64 {
	c.t.Helper()
	out, errOut, err := runHwkms(c.t, nil, "storage", "audit", "--json", "--encryption-provider-config", encCfg, "--etcd-servers", c.etcd.URL)
	if err != nil {
		c.t.Fatalf("hwkms storage audit: %v\n%s", err, errOut)
	}
	var res auditJSON
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		c.t.Fatalf("storage audit --json: %v\n%s", err, out)
	}
	c.t.Logf("storage audit: %v", res.Totals.KeyIDs)
	return res.Totals.KeyIDs
}

// checkSVMSucceeded checks, through kube-apiserver, that a StorageVersionMigration
// hwkms created (label app.kubernetes.io/managed-by=hwkms) for resource exists and has
// its Succeeded condition: the controller ran it.
func (c *cluster) checkSVMSucceeded(resource string) {
	c.t.Helper()
	b := c.api.kubectl(nil, "get", "storageversionmigrations.storagemigration.k8s.io", "-l", "app.kubernetes.io/managed-by=hwkms", "-o", "json")
	var list struct {
		Items []struct {
			Metadata struct{ Name string } `json:"metadata"`
			Spec     struct {
				Resource struct{ Group, Resource string } `json:"resource"`
			} `json:"spec"`
			Status struct {
				Conditions []struct{ Type, Status, Message string } `json:"conditions"`
			} `json:"status"`
		} `json:"items"`
	}
	if err := json.Unmarshal(b, &list); err != nil {
		c.t.Fatalf("kubectl get storageversionmigrations: %v", err)
	}
	for _, it := range list.Items {
		if it.Spec.Resource.Group != "" || it.Spec.Resource.Resource != resource {
			continue
		}
		for _, cond := range it.Status.Conditions {
			if cond.Type == "Succeeded" && cond.Status == "True" {
				c.t.Logf("StorageVersionMigration %s: Succeeded (%s); conditions %+v", it.Metadata.Name, cond.Message, it.Status.Conditions)
				return
			}
		}
	}
	c.t.Fatalf("no StorageVersionMigration of hwkms for %s has Succeeded: %+v", resource, list.Items)
}

// replaceSecret runs `kubectl get secret NAME -o json | kubectl replace -f -` on
// Secret default/name and reports whether that rewrote it in etcd (kube-apiserver
// skips the write unless the stored data is stale).
func (c *cluster) replaceSecret(name string) bool {
	c.t.Helper()
	key := secretKey("default", name)
	before := c.etcd.modRevision(c.t, key)
	s := c.api.kubectl(nil, "get", "secret", name, "--namespace", "default", "-o", "json")
	c.api.kubectl(s, "replace", "-f", "-")
	return c.etcd.modRevision(c.t, key) != before
}

// updateSecretData replaces the data of Secret default/name.
func (c *cluster) updateSecretData(name string, data map[string][]byte) *corev1.Secret {
	c.t.Helper()
	s, err := c.getSecret(name)
	if err != nil {
		c.t.Fatalf("read Secret %s: %v", name, err)
	}
	s.Data = data
	s, err = c.api.Client.CoreV1().Secrets("default").Update(c.ctx(), s, metav1.UpdateOptions{})
	if err != nil {
		c.t.Fatalf("update Secret %s: %v", name, err)
	}
	return s
}

// storedKeyIDs reads every Secret straight from etcd and counts them by key_id.
func (c *cluster) storedKeyIDs() map[string]int {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := c.etcd.Client.Get(ctx, "/registry/secrets/", clientv3.WithPrefix())
	if err != nil {
		c.t.Fatalf("etcd list Secrets: %v", err)
	}
	ids := map[string]int{}
	for _, kv := range resp.Kvs {
		obj, err := parseStored(kv.Value)
		if err != nil {
			c.t.Fatalf("%s: %v", kv.Key, err)
		}
		ids[obj.KeyID]++
	}
	return ids
}
