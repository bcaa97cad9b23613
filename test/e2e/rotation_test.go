package e2e

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Scenario 4: KEK rotation with kube-apiserver, as DESIGN.md section 5 describes it:
// create the new key first in the config with `hwkms key create --key 0`, reload
// hwkms, wait for kube-apiserver to see the new key_id on its Status poll (up to
// 60 s), see old Secrets read as stale, migrate them with a read and unchanged update
// of each (what `kubectl get secrets -A -o json | kubectl replace -f -` does), check
// etcd holds only the new key_id, drop the old key from the config, reload, and read
// everything again, after a kube-apiserver restart so every seed goes through hwkms.
//
// Both keys live in one device and both reloads are SIGHUPs. On swtpm, which serves
// one connection at a time (as /dev/tpm0 does), `hwkms key create` cannot reach the
// TPM while hwkms serves, so the new key is created during a short hwkms stop with
// the old config, and the rotation itself is the SIGHUP reload after it: the reloaded
// keyring shares the running one's TPM connection.
func TestKeyRotation(t *testing.T) {
	forEachBackend(t, func(t *testing.T, backend string) {
		c := newCluster(t, backend, clusterOptions{})
		oldKey := c.KeyID
		reload := func(keys ...int) {
			t.Helper()
			c.kms.writeConfig(keys...)
			c.kms.reload(2 * time.Minute)
		}

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

		// 1. New key first in the config, created on the device, then reload.
		var newKey string
		if backend == "tpm" {
			c.kms.stop()
			c.kms.writeConfig(2, 1)
			newKey = c.kms.createKey(0)
			c.kms.writeConfig(1)
			c.kms.start()
		} else {
			c.kms.writeConfig(2, 1)
			newKey = c.kms.createKey(0)
		}
		reload(2, 1)
		if newKey == oldKey {
			t.Fatalf("the new key has the old key's key_id %q", newKey)
		}
		if got, err := c.kms.status(); err != nil || got != newKey {
			t.Fatalf("after the reload hwkms Status reports key_id %q (%v), want the new key's %q", got, err, newKey)
		}

		// 2. kube-apiserver polls Status every 60 s; wait until new writes use the new key.
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

		// 3. Old Secrets still read (hwkms decrypts with the old, decrypt-only key) and
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

		// 4. Migrate everything: read every Secret in every namespace and update it unchanged.
		list, err := c.api.Client.CoreV1().Secrets("").List(c.ctx(), metav1.ListOptions{})
		if err != nil {
			t.Fatalf("list Secrets: %v", err)
		}
		for i := range list.Items {
			s := &list.Items[i]
			if _, err := c.api.Client.CoreV1().Secrets(s.Namespace).Update(c.ctx(), s, metav1.UpdateOptions{}); err != nil {
				t.Fatalf("migrate Secret %s/%s: %v", s.Namespace, s.Name, err)
			}
		}
		ids := c.storedKeyIDs()
		if len(ids) != 1 || ids[newKey] == 0 {
			t.Fatalf("after migrating %d Secrets etcd holds key_ids %v, want only the new %s", len(list.Items), ids, newKey)
		}
		t.Logf("migrated %d Secrets; etcd key_ids: %v", len(list.Items), ids)

		// 5. Drop the old key, reload, restart kube-apiserver so nothing is cached, read all.
		reload(2)
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

		// 6. Data still under the removed key no longer reads, and hwkms says which key
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
	})
}

// replaceSecret reads Secret default/name and updates it unchanged, as `kubectl
// replace` does, and reports whether that rewrote it in etcd (kube-apiserver skips
// the write unless the stored data is stale).
func (c *cluster) replaceSecret(name string) bool {
	c.t.Helper()
	key := secretKey("default", name)
	before := c.etcd.modRevision(c.t, key)
	s, err := c.getSecret(name)
	if err != nil {
		c.t.Fatalf("read Secret %s: %v", name, err)
	}
	if _, err := c.api.Client.CoreV1().Secrets("default").Update(c.ctx(), s, metav1.UpdateOptions{}); err != nil {
		c.t.Fatalf("update Secret %s unchanged: %v", name, err)
	}
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
