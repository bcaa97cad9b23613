package test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/yaml"
)

// TestWrongPINRestartLoop is kubelet restarting a static pod whose PIN file is wrong:
// kubelet restarts it whatever the exit status, so each start is a new process. Only
// the first makes a C_Login; later ones find the refusal recorded next to the socket
// and exit 78 without presenting the PIN again, so the token's failed-login counter
// does not run down. Once the PIN file is fixed, hwkms serves and the record is cleared.
func TestWrongPINRestartLoop(t *testing.T) {
	dev := startDev(t, "warn")
	env := softhsmEnv(dev.Dir)
	base, err := os.ReadFile(filepath.Join(dev.Dir, "hwkms.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	sock := socketPath(t)
	var cfg map[string]any
	if err := yaml.Unmarshal(withSocket(t, base, sock), &cfg); err != nil {
		t.Fatal(err)
	}
	p11 := cfg["keys"].([]any)[0].(map[string]any)["pkcs11"].(map[string]any)
	goodPIN := p11["pinFile"].(string)
	wrongPIN := filepath.Join(t.TempDir(), "wrong.pin")
	if err := os.WriteFile(wrongPIN, []byte("not-the-pin-0000\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "hwkms.yaml")
	write := func(pinFile string) {
		t.Helper()
		p11["pinFile"] = pinFile
		b, err := yaml.Marshal(cfg)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(wrongPIN)
	for i, want := range []string{"refused the user PIN at C_Login", "in an earlier run (recorded in", "in an earlier run (recorded in"} {
		p := launch(t, env, "serve", "--config", path)
		if code := p.wait(t, 60*time.Second); code != 78 {
			t.Fatalf("start %d with a wrong PIN exited %d, want 78\n%s", i+1, code, p.Stderr.String())
		}
		if !strings.Contains(p.Stderr.String(), want) {
			t.Fatalf("start %d: stderr does not say %q:\n%s", i+1, want, p.Stderr.String())
		}
	}
	record := filepath.Join(filepath.Dir(sock), "hwkms-refused-pins.json")
	write(goodPIN)
	startHwkms(t, sock, env, "serve", "--config", path)
	data, err := os.ReadFile(record)
	if err != nil {
		t.Fatal(err)
	}
	var rf struct {
		Refused map[string]any `json:"refused"`
	}
	if err := json.Unmarshal(data, &rf); err != nil || len(rf.Refused) != 0 {
		t.Fatalf("record after a successful start: %s (%v), want no refusals", data, err)
	}
}
