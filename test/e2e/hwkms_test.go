package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"sigs.k8s.io/yaml"
)

// Backends the suite runs every scenario against.
var backends = []string{"pkcs11", "tpm"}

// device is where the KEKs live: one SoftHSM2 token, or one swtpm. The test owns it,
// so it outlives hwkms restarts, as a real HSM or TPM does.
//
// swtpm (like /dev/tpm0, unlike /dev/tpmrm0) serves one connection at a time: every
// key of one hwkms shares its connection, and a key command (`hwkms key create`)
// waits until hwkms stops.
type device struct {
	t    testing.TB
	kind string
	dir  string
	env  []string // for hwkms and the key commands: SOFTHSM2_CONF
	// pkcs11
	module, tokenLabel, pinFile string
	// tpm: started on first use
	sim *swtpmSim
}

// newDevice creates a SoftHSM2 token with a random PIN under dir, or prepares to start
// a swtpm (stopped by PID in t.Cleanup) with its state under dir.
func newDevice(t testing.TB, kind, dir string) *device {
	t.Helper()
	d := &device{t: t, kind: kind, dir: dir}
	switch kind {
	case "pkcs11":
		d.tokenLabel = "hwkms-e2e"
		pin := randomHex(t, 8)
		d.pinFile = filepath.Join(dir, "user.pin")
		if err := os.WriteFile(d.pinFile, []byte(pin+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		var confEnv string
		d.module, confEnv = softhsmToken(t, mkdir(t, filepath.Join(dir, "softhsm")), d.tokenLabel, randomHex(t, 8), pin)
		d.env = []string{confEnv}
	case "tpm":
	default:
		t.Fatalf("unknown backend %q", kind)
	}
	return d
}

// keyConfig returns the config block of KEK number n on this device.
func (d *device) keyConfig(t testing.TB, n int) map[string]any {
	t.Helper()
	switch d.kind {
	case "pkcs11":
		return map[string]any{"pkcs11": map[string]any{
			"module":     d.module,
			"tokenLabel": d.tokenLabel,
			"pinFile":    d.pinFile,
			"keyLabel":   fmt.Sprintf("e2e-kek-%d", n),
		}}
	default:
		if d.sim == nil {
			d.sim = startSwtpm(d.t, filepath.Join(d.dir, "swtpm"))
		}
		sim := d.sim
		auth := filepath.Join(d.dir, fmt.Sprintf("kek-%d.auth", n))
		if _, err := os.Stat(auth); os.IsNotExist(err) {
			if err := os.WriteFile(auth, []byte(randomHex(t, 16)), 0o600); err != nil {
				t.Fatal(err)
			}
		}
		return map[string]any{"tpm": map[string]any{
			"device":   sim.Device,
			"blobFile": filepath.Join(d.dir, fmt.Sprintf("kek-%d.blob", n)),
			"authFile": auth,
		}}
	}
}

// hwkms is the plugin under test, run as `hwkms serve --config FILE`.
type hwkms struct {
	t       testing.TB
	bin     string
	dev     *device
	dir     string
	Config  string // config file
	Socket  string
	logPath string
	proc    *proc
}

// newHwkms writes a config serving KEKs keys (numbers; the first is primary) of dev
// on a socket in a short private directory. It does not create keys or start hwkms.
func newHwkms(t testing.TB, dev *device, dir string, keys ...int) *hwkms {
	t.Helper()
	h := &hwkms{
		t:       t,
		bin:     binaryPath(t, "E2E_HWKMS"),
		dev:     dev,
		dir:     dir,
		Config:  filepath.Join(dir, "hwkms.yaml"),
		Socket:  filepath.Join(shortTempDir(t), "kms.sock"),
		logPath: filepath.Join(dir, "hwkms.log"),
	}
	h.writeConfig(keys...)
	t.Cleanup(h.stop)
	return h
}

// writeConfig rewrites the config file with KEKs keys, the first primary. A running
// hwkms reads it on its next SIGHUP.
func (h *hwkms) writeConfig(keys ...int) {
	t := h.t
	t.Helper()
	var ks []any
	for _, n := range keys {
		ks = append(ks, h.dev.keyConfig(t, n))
	}
	cfg := map[string]any{
		"socket": map[string]any{"path": h.Socket},
		"log":    map[string]any{"level": "debug", "format": "json"}, // one line per request
		"keys":   ks,
	}
	b, err := yaml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	h.writeConfigBytes(b)
}

// writeConfigBytes replaces the config file atomically (write, then rename), so a
// running hwkms, which watches the file, never reads half of it.
func (h *hwkms) writeConfigBytes(b []byte) {
	t := h.t
	t.Helper()
	tmp := h.Config + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, h.Config); err != nil {
		t.Fatal(err)
	}
}

// dropOldKeys rewrites the config file with only its first (primary) key, as an
// operator does after the storage migration (docs/rotation.md step 6).
func (h *hwkms) dropOldKeys() {
	h.t.Helper()
	h.writeConfigBytes(h.primaryOnlyConfig())
}

// primaryOnlyConfig returns the config file with only its first (primary) key.
func (h *hwkms) primaryOnlyConfig() []byte {
	t := h.t
	t.Helper()
	b, err := os.ReadFile(h.Config)
	if err != nil {
		t.Fatal(err)
	}
	var cfg map[string]any
	if err := yaml.Unmarshal(b, &cfg); err != nil {
		t.Fatalf("config %s: %v", h.Config, err)
	}
	keys, _ := cfg["keys"].([]any)
	if len(keys) < 2 {
		t.Fatalf("config %s lists %d key(s); nothing to drop", h.Config, len(keys))
	}
	cfg["keys"] = keys[:1]
	if b, err = yaml.Marshal(cfg); err != nil {
		t.Fatal(err)
	}
	return b
}

// rotate runs `hwkms key rotate --config FILE` with args (such as --apply), as
// docs/rotation.md step 1 does, and returns the new key's key_id and what the command
// printed on stdout: the key_id with --apply, the rotated config without.
func (h *hwkms) rotate(args ...string) (keyID string, stdout []byte) {
	t := h.t
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, h.bin, append([]string{"key", "rotate", "--config", h.Config}, args...)...)
	cmd.Env = append(os.Environ(), h.dev.env...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		t.Fatalf("hwkms key rotate %s: %v\n%s", strings.Join(args, " "), err, errOut.String())
	}
	// stderr: "created new primary key_id <id>; the previous primary ..."
	for _, line := range strings.Split(errOut.String(), "\n") {
		if rest, ok := strings.CutPrefix(line, "created new primary key_id "); ok {
			if id, _, ok := strings.Cut(rest, ";"); ok {
				return id, out.Bytes()
			}
		}
	}
	t.Fatalf("hwkms key rotate named no new key_id:\n%s", errOut.String())
	return "", nil
}

// createKey runs `hwkms key create --config FILE --key idx` and returns the key_id it
// prints.
func (h *hwkms) createKey(idx int) string {
	t := h.t
	t.Helper()
	out := h.run(2*time.Minute, "key", "create", "--config", h.Config, "--key", fmt.Sprint(idx))
	for _, line := range strings.Split(out, "\n") {
		if id, ok := strings.CutPrefix(line, "key_id: "); ok {
			return strings.TrimSpace(id)
		}
	}
	t.Fatalf("hwkms key create printed no key_id:\n%s", out)
	return ""
}

// run runs the hwkms CLI and returns its combined output, failing the test on error.
func (h *hwkms) run(timeout time.Duration, args ...string) string {
	t := h.t
	t.Helper()
	out, err := h.tryRun(timeout, args...)
	if err != nil {
		t.Fatalf("hwkms %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func (h *hwkms) tryRun(timeout time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, h.bin, args...)
	cmd.Env = append(os.Environ(), h.dev.env...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// start runs `hwkms serve` and waits until `hwkms status` reports healthz ok. It
// returns the key_id Status reports.
func (h *hwkms) start() string {
	t := h.t
	t.Helper()
	h.proc = startProc(t, "hwkms", h.logPath, h.bin, []string{"serve", "--config", h.Config}, h.dev.env)
	// Registered per start, so hwkms stops before any device started since the last one.
	t.Cleanup(h.stop)
	var keyID string
	err := waitFor(context.Background(), 60*time.Second, 50*time.Millisecond, h.proc, func(context.Context) error {
		id, err := h.status()
		keyID = id
		return err
	})
	if err != nil {
		t.Fatalf("hwkms serve did not become healthy: %v\n%s", err, h.proc.logTail(20))
	}
	return keyID
}

// status runs `hwkms status --socket` and returns the key_id when healthz is ok.
func (h *hwkms) status() (string, error) {
	out, err := h.tryRun(10*time.Second, "status", "--socket", h.Socket, "--timeout", "3s")
	if err != nil {
		return "", fmt.Errorf("hwkms status: %v: %s", err, strings.TrimSpace(out))
	}
	for _, line := range strings.Split(out, "\n") {
		if id, ok := strings.CutPrefix(line, "key_id: "); ok {
			return strings.TrimSpace(id), nil
		}
	}
	return "", fmt.Errorf("hwkms status: no key_id in %q", out)
}

// stop terminates hwkms by PID (SIGTERM, SIGKILL after 15 s).
func (h *hwkms) stop() {
	if h.proc != nil {
		h.proc.stop(syscall.SIGTERM, 15*time.Second)
	}
}

// kill kills hwkms by PID with SIGKILL, as a crash would, leaving its socket file.
func (h *hwkms) kill() {
	h.proc.stop(syscall.SIGKILL, 0)
}

// Log messages of a config reload, from cmd/hwkms and plugin/config.
const (
	msgReloaded     = "config reloaded"
	msgReloadFailed = "config reload failed; still serving the previous keys"
)

// reload sends SIGHUP and waits until the log says the config was reloaded; a failed
// reload fails the test with hwkms's error.
func (h *hwkms) reload(timeout time.Duration) {
	h.t.Helper()
	before := len(h.reloadResults())
	h.proc.signal(h.t, syscall.SIGHUP)
	h.waitReload(before, timeout, "SIGHUP")
}

// reloadResults returns the log records of every config reload, done or failed.
func (h *hwkms) reloadResults() []logRecord {
	var rs []logRecord
	for _, r := range h.logRecords("") {
		if r["msg"] == msgReloaded || r["msg"] == msgReloadFailed {
			rs = append(rs, r)
		}
	}
	return rs
}

// waitReload waits until hwkms logs a reload result after the first `before` ones
// and fails the test if that reload failed. why names what triggered the reload.
func (h *hwkms) waitReload(before int, timeout time.Duration, why string) {
	t := h.t
	t.Helper()
	err := waitFor(context.Background(), timeout, 100*time.Millisecond, h.proc, func(context.Context) error {
		if len(h.reloadResults()) > before {
			return nil
		}
		return fmt.Errorf("hwkms logged no reload result yet")
	})
	if err != nil {
		t.Fatalf("hwkms reload after %s: %v", why, err)
	}
	if r := h.reloadResults()[before]; r["msg"] == msgReloadFailed {
		t.Fatalf("hwkms reload after %s failed: %v", why, r["err"])
	}
}

// logRecord is one JSON log line of hwkms.
type logRecord map[string]any

// logRecords returns the JSON log records whose msg is msg ("" for all), across every
// run of hwkms in this test.
func (h *hwkms) logRecords(msg string) []logRecord {
	b, err := os.ReadFile(h.logPath)
	if err != nil {
		return nil
	}
	var recs []logRecord
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Bytes()
		if len(line) == 0 || line[0] != '{' {
			continue
		}
		var r logRecord
		if json.Unmarshal(line, &r) != nil {
			continue
		}
		if msg == "" || r["msg"] == msg {
			recs = append(recs, r)
		}
	}
	return recs
}

// requestCounts counts the requests hwkms logged since the log had `since` records
// (from logRecords("")), by "Method code", e.g. "Decrypt OK".
func (h *hwkms) requestCounts(since int) map[string]int {
	recs := h.logRecords("")
	counts := map[string]int{}
	for i := since; i < len(recs); i++ {
		r := recs[i]
		m, ok := r["method"].(string)
		if !ok {
			continue
		}
		counts[fmt.Sprintf("%s %v", m, r["code"])]++
	}
	return counts
}

func mkdir(t testing.TB, p string) string {
	t.Helper()
	if err := os.MkdirAll(p, 0o700); err != nil {
		t.Fatal(err)
	}
	return p
}
