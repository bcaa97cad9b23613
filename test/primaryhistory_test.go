package test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hwkms/hwkms/plugin/config"
)

// TestPrimaryReuseAcrossRestarts: hwkms rotates A -> B (a reload of the running
// process), stops, and is started again with the config reverted to A first.
// kube-apiserver requires that a key_id never comes back after it was replaced, so the
// new process must refuse to serve A, naming both key_ids and the history file, with
// the exit status of a config error (1). The config with B first serves again, and a
// damaged history refuses to start instead of being reset.
func TestPrimaryReuseAcrossRestarts(t *testing.T) {
	d := startDev(t, "warn")
	env := softhsmEnv(d.Dir)
	cfgPath := filepath.Join(d.Dir, "hwkms.yaml")
	history := d.Socket + config.HistorySuffix
	keyA := mustStatus(t, d.Socket).KeyId
	configA, err := os.ReadFile(cfgPath)
	if err != nil {
		t.Fatal(err)
	}

	cmd := exec.Command(hwkmsBin, "key", "rotate", "--config", cfgPath, "--apply")
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("hwkms key rotate: %v", err)
	}
	keyB := strings.TrimSpace(string(out))
	waitFor(t, 15*time.Second, "the running hwkms to reload to the new key_id", func() bool {
		st, err := statusOnce(d.Socket)
		return err == nil && st.KeyId == keyB
	})
	configB, err := os.ReadFile(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	d.stop(t)

	// Restart with the config reverted to A first.
	if err := os.WriteFile(cfgPath, configA, 0o600); err != nil {
		t.Fatal(err)
	}
	p := launch(t, env, "serve", "--config", cfgPath)
	if code := p.wait(t, 60*time.Second); code != 1 {
		t.Fatalf("serve with the replaced key_id %s as primary exited %d, want 1\n%s", keyA, code, p.Stderr.String())
	}
	for _, want := range []string{keyA, keyB, history, "never reused"} {
		if !strings.Contains(p.Stderr.String(), want) {
			t.Fatalf("refusal does not name %q:\n%s", want, p.Stderr.String())
		}
	}
	recorded, err := os.ReadFile(history)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(recorded, []byte(keyA)) || !bytes.Contains(recorded, []byte(keyB)) {
		t.Fatalf("history %s does not hold both key_ids:\n%s", history, recorded)
	}

	// B, the latest primary, serves after a restart.
	if err := os.WriteFile(cfgPath, configB, 0o600); err != nil {
		t.Fatal(err)
	}
	s := startHwkms(t, d.Socket, env, "serve", "--config", cfgPath)
	if got := mustStatus(t, d.Socket).KeyId; got != keyB {
		t.Fatalf("restart with B first serves %s, want %s", got, keyB)
	}
	s.stop(t)

	// A damaged history is not silently reset.
	damaged := []byte(`{"version": 1, "primaries": [`)
	if err := os.WriteFile(history, damaged, 0o600); err != nil {
		t.Fatal(err)
	}
	p = launch(t, env, "serve", "--config", cfgPath)
	if code := p.wait(t, 60*time.Second); code != 1 {
		t.Fatalf("serve with a damaged history exited %d, want 1\n%s", code, p.Stderr.String())
	}
	if !strings.Contains(p.Stderr.String(), "primary-key history is unreadable") || !strings.Contains(p.Stderr.String(), history) {
		t.Fatalf("refusal does not say the history %s is unreadable:\n%s", history, p.Stderr.String())
	}
	if now, _ := os.ReadFile(history); !bytes.Equal(now, damaged) {
		t.Fatalf("the damaged history was rewritten:\n%s", now)
	}
}
