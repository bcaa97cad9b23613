package test

import (
	"bytes"
	"fmt"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"

	"sigs.k8s.io/yaml"

	"github.com/hwkms/hwkms/plugin/config"
)

// TestRotationWithAPIServer follows docs/rotation.md with kube-apiserver's own KMS v2
// client: data written under key A reads as stale once hwkms rotates to B, is rewritten
// under B, and then A can be removed from the config while everything still reads.
func TestRotationWithAPIServer(t *testing.T) {
	p := startDev(t, "debug")
	cfgPath := filepath.Join(p.Dir, "hwkms.yaml")
	keyA := mustStatus(t, p.Socket).KeyId
	encCfg := writeEncryptionConfig(t, p.Socket)
	api := loadAPIServer(t, encCfg)

	type stored struct {
		key        string
		plain, out []byte
	}
	var data []stored
	for i := range 4 {
		key := fmt.Sprintf("/registry/secrets/rot/s%d", i)
		plain := secretPayload(t, key, 500)
		data = append(data, stored{key, plain, api.write(t, key, plain)})
	}

	// Step 1-2: `hwkms key rotate --apply`; the running hwkms reloads the file.
	cmd := exec.Command(hwkmsBin, "key", "rotate", "--config", cfgPath, "--apply")
	cmd.Env = append(os.Environ(), softhsmEnv(p.Dir)...)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("hwkms key rotate: %v", err)
	}
	keyB := strings.TrimSpace(string(out))
	if keyB == keyA || !strings.HasPrefix(keyB, "p11:") {
		t.Fatalf("rotate printed key_id %q (old %q)", keyB, keyA)
	}
	waitFor(t, 15*time.Second, "Status to report the new key_id", func() bool {
		st, err := statusOnce(p.Socket)
		return err == nil && st.KeyId == keyB && st.Healthz == "ok"
	})

	// Step 3: the apiserver notices on its own Status polling (its health check
	// re-asks Status when the cached answer is over 20 s old) and writes under B.
	waitFor(t, 60*time.Second, "the apiserver to write under the new key_id", func() bool {
		api.Health.Check(httptest.NewRequest("GET", "/readyz", nil))
		probe := api.write(t, "/registry/secrets/rot/probe", []byte(`{"kind":"Secret"}`))
		return decodeStored(t, probe).KeyID == keyB
	})
	for _, d := range data {
		got, stale, err := api.read(d.key, d.out)
		if err != nil || !bytes.Equal(got, d.plain) {
			t.Fatalf("%s under the old key no longer reads after rotation: %v", d.key, err)
		}
		if !stale {
			t.Fatalf("%s written under %s is not stale after rotation to %s", d.key, keyA, keyB)
		}
	}

	// Step 4: storage migration rewrites every object under B.
	oldOut := data[0].out
	for i, d := range data {
		data[i].out = api.write(t, d.key, d.plain)
		if id := decodeStored(t, data[i].out).KeyID; id != keyB {
			t.Fatalf("%s rewritten under %s, want %s", d.key, id, keyB)
		}
		api.mustRead(t, d.key, data[i].out, d.plain)
	}

	// Step 6: remove A from the config; hwkms reloads; A's data is gone from use.
	cfg, err := config.Load(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.Keys) != 2 {
		t.Fatalf("config after rotate has %d keys, want 2", len(cfg.Keys))
	}
	cfg.Keys = cfg.Keys[:1]
	writeConfigFile(t, cfgPath, cfg)
	oldCT := decodeStored(t, oldOut).EncryptedDEKSource
	client := dial(t, p.Socket)
	waitFor(t, 15*time.Second, "Decrypt under the removed key to give NotFound", func() bool {
		_, err := client.Decrypt(rpcCtx(t), &kmsapi.DecryptRequest{Ciphertext: oldCT, KeyId: keyA})
		return status.Code(err) == codes.NotFound && strings.Contains(err.Error(), keyA)
	})
	fresh := loadAPIServer(t, encCfg) // an apiserver restart after the migration
	for _, d := range data {
		fresh.mustRead(t, d.key, d.out, d.plain)
	}
}

func writeConfigFile(t *testing.T, path string, cfg *config.Config) {
	t.Helper()
	data, err := yaml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
