package config

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hwkms/hwkms/hsm"
	"github.com/hwkms/hwkms/plugin"
	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/plugin/kek/kektest"
	"github.com/hwkms/hwkms/softhsm/softhsmtest"
	"k8s.io/kms/pkg/service"
)

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// lockedBuffer is a bytes.Buffer for a logger that may write from several goroutines.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func TestMain(m *testing.M) { softhsmtest.Main(m) }

const validYAML = `
socket:
  path: /run/hwkms/kms.sock
keys:
  - pkcs11:
      module: /usr/lib/softhsm/libsofthsm2.so
      tokenLabel: t
      pinFile: /etc/hwkms/pin
      keyLabel: k
`

func TestParseDefaults(t *testing.T) {
	c, err := Parse([]byte(validYAML))
	if err != nil {
		t.Fatal(err)
	}
	if c.Timeout.D() != 3*time.Second || c.Health.Interval.D() != 10*time.Second || c.Socket.Mode != "0600" || c.Log.Format != "text" {
		t.Fatalf("defaults not applied: %+v", c)
	}
	if m, _ := c.SocketMode(); m != 0o600 {
		t.Fatalf("mode %o", m)
	}
	if c.Keys[0].Backend() != "pkcs11" {
		t.Fatalf("backend %q", c.Keys[0].Backend())
	}
}

func TestParseErrorsNameTheField(t *testing.T) {
	for _, tc := range []struct {
		name, yaml, want string
	}{
		{"unknown top-level field", validYAML + "bogus: 1\n", "bogus: unknown field"},
		{"unknown nested field", strings.Replace(validYAML, "keyLabel: k", "keyLabel: k\n      keyLable: k", 1), "keys[0].pkcs11.keyLable: unknown field"},
		{"field in the wrong case", strings.Replace(validYAML, "pinFile: /etc/hwkms/pin", "pinFile: /etc/hwkms/pin\n      pinfile: /tmp/other", 1), "keys[0].pkcs11.pinfile: unknown field"},
		{"bare number duration", validYAML + "timeout: 3\n", `timeout: invalid duration "3"`},
		{"bare number nested duration", validYAML + "health:\n  interval: 10\n", `health.interval: invalid duration "10"`},
		{"not yaml", "socket: [\n", "parse"},
		{"no socket", strings.Replace(validYAML, "path: /run/hwkms/kms.sock", "mode: \"0600\"", 1), "socket.path: is required"},
		{"relative socket", strings.Replace(validYAML, "/run/hwkms/kms.sock", "kms.sock", 1), "socket.path: must be an absolute path"},
		{"world-readable socket", validYAML + "  mode: \"0666\"\n", ""},
		{"bad timeout", validYAML + "timeout: soon\n", "timeout"},
		{"negative timeout", validYAML + "timeout: -1s\n", "timeout: must be at least 1ms"},
		{"fast health", validYAML + "health:\n  interval: 10ms\n", "health.interval: must be at least 1s"},
		{"bad log level", validYAML + "log:\n  level: loud\n", "log.level"},
		{"bad log format", validYAML + "log:\n  format: xml\n", "log.format"},
		{"no keys", "socket:\n  path: /run/k.sock\n", "keys: at least one key"},
		{"empty key", validYAML + "  - {}\n", "keys[1]: exactly one backend block"},
		{"two token selectors", strings.Replace(validYAML, "tokenLabel: t", "tokenLabel: t\n      tokenSerial: \"123\"", 1), "keys[0].pkcs11"},
		{"no pin", strings.Replace(validYAML, "pinFile: /etc/hwkms/pin", "sessions: 2", 1), "keys[0].pkcs11"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.yaml))
			if err == nil {
				t.Fatal("no error")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not contain %q", err, tc.want)
			}
		})
	}
}

func TestSocketModeRules(t *testing.T) {
	for mode, ok := range map[string]bool{"0600": true, "0660": true, "0640": true, "0666": false, "0400": false, "600x": false, "01600": false} {
		c := Config{Socket: Socket{Mode: mode}}
		if _, err := c.SocketMode(); (err == nil) != ok {
			t.Errorf("mode %s: err %v, want ok=%v", mode, err, ok)
		}
	}
}

// writeConfig writes a config serving the given keys and returns its path.
func writeConfig(t *testing.T, path string, keys ...hsm.Config) {
	t.Helper()
	var b strings.Builder
	b.WriteString("socket:\n  path: /tmp/unused.sock\nkeys:\n")
	for _, k := range keys {
		b.WriteString("  - pkcs11:\n")
		b.WriteString("      module: " + k.Module + "\n")
		b.WriteString("      tokenLabel: " + k.TokenLabel + "\n")
		b.WriteString("      pinFile: " + k.PINFile + "\n")
		b.WriteString("      keyLabel: " + k.KeyLabel + "\n")
	}
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestReloadKeepsOldKeyringOnError rotates A -> B by reload, then checks that broken
// configs (bad YAML, missing key, wrong PIN) leave the B keyring serving.
func TestReloadKeepsOldKeyringOnError(t *testing.T) {
	fx := softhsmtest.New(t)
	tok := softhsmtest.NewToken(t, fx)
	ctx := context.Background()
	mk := func(label string) hsm.Config {
		c := hsm.Config{Module: fx.Module, TokenLabel: tok.Label, PINFile: tok.PINFile, KeyLabel: label}
		if _, err := hsm.CreateKey(ctx, c); err != nil {
			t.Fatal(err)
		}
		return c
	}
	a, b := mk("kek-a"), mk("kek-b")
	path := filepath.Join(t.TempDir(), "hwkms.yaml")
	writeConfig(t, path, a)
	cfg, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	ring, err := OpenKeyring(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	svc := plugin.NewService(ring, plugin.Options{})
	t.Cleanup(func() { svc.Keyring().Close() })
	logs := &lockedBuffer{}
	rl := NewReloader(svc, cfg, path, slog.New(slog.NewTextHandler(logs, nil)), nil)
	idA := ring.Primary().ID()
	encA, err := svc.Encrypt(ctx, "", []byte("0123456789abcdef0123456789abcdef"))
	if err != nil {
		t.Fatal(err)
	}

	writeConfig(t, path, b, a)
	if err := rl.Reload(ctx, false); err != nil {
		t.Fatalf("reload to B: %v", err)
	}
	// Each reloaded pkcs11 key logs the mechanism it was opened with.
	for i, id := range []string{svc.Keyring().Primary().ID(), idA} {
		want := fmt.Sprintf("msg=\"key opened\" index=%d key_id=%s backend=pkcs11 mechanism=aes-gcm", i, id)
		if !strings.Contains(logs.String(), want) {
			t.Errorf("reload log lacks %q:\n%s", want, logs.String())
		}
	}
	if err := rl.Reload(ctx, false); !errors.Is(err, ErrUnchanged) {
		t.Fatalf("reload of an unchanged file: %v", err)
	}
	idB := svc.Keyring().Primary().ID()
	if idB == idA {
		t.Fatal("primary did not change")
	}

	wrongPIN := filepath.Join(t.TempDir(), "wrong.pin")
	os.WriteFile(wrongPIN, []byte("not-the-pin\n"), 0o600)
	missing := b
	missing.KeyLabel = "no-such-key"
	badPIN := b
	badPIN.PINFile = wrongPIN
	for name, write := range map[string]func(){
		"bad yaml":    func() { os.WriteFile(path, []byte("keys: [\n"), 0o600) },
		"missing key": func() { writeConfig(t, path, missing, a) },
		"wrong pin":   func() { writeConfig(t, path, badPIN, a) },
		"duplicate":   func() { writeConfig(t, path, b, a, b) },
		"reuse A":     func() { writeConfig(t, path, a, b) },
	} {
		t.Run(name, func(t *testing.T) {
			write()
			err := rl.Reload(ctx, false)
			if err == nil {
				t.Fatal("reload of a broken config succeeded")
			}
			t.Logf("refused: %v", err)
			if got := svc.Keyring().Primary().ID(); got != idB {
				t.Fatalf("primary changed to %s", got)
			}
			if _, err := svc.Decrypt(ctx, "", &service.DecryptRequest{Ciphertext: encA.Ciphertext, KeyID: idA}); err != nil {
				t.Fatalf("old data no longer decrypts: %v", err)
			}
			if svc.ReloadError() == "" {
				t.Fatal("a failed reload left no reload error for Status to quote")
			}
		})
	}
	// The operator puts the serving file back byte for byte: nothing to reload, and
	// the failed reload's error no longer applies.
	writeConfig(t, path, b, a)
	if err := rl.Reload(ctx, false); !errors.Is(err, ErrUnchanged) {
		t.Fatalf("reload of the file being served: %v", err)
	}
	if e := svc.ReloadError(); e != "" {
		t.Fatalf("after the file went back to the serving config, Status would still quote %q", e)
	}
}

// TestReloadOpenHangs: a device that stops answering while a reload opens the new
// keys fails that reload after the open timeout, keeps the old keys serving, and the
// keyring the stuck open produces later is closed; the next reload works.
func TestReloadOpenHangs(t *testing.T) {
	ctx := context.Background()
	a := kektest.NewFake("A")
	ring, err := plugin.NewKeyring(a)
	if err != nil {
		t.Fatal(err)
	}
	svc := plugin.NewService(ring, plugin.Options{})
	t.Cleanup(func() { svc.Keyring().Close() })
	path := filepath.Join(t.TempDir(), "hwkms.yaml")
	if err := os.WriteFile(path, []byte("socket: {path: /run/x.sock}\nkeys: [{tpm: {device: /dev/tpmrm0, blobFile: /a.blob}}]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	rl := NewReloader(svc, cfg, path, discard(), nil)
	rl.openTimeout = 200 * time.Millisecond

	release := make(chan struct{})
	late := kektest.NewFake("B")
	opened := make(chan struct{})
	openKeyring = func(context.Context, *Config) (*plugin.Keyring, error) {
		<-release // the device answers only when the test says so
		defer close(opened)
		return plugin.NewKeyring(late)
	}
	t.Cleanup(func() { openKeyring = OpenKeyring })

	if err := os.WriteFile(path, []byte("socket: {path: /run/x.sock}\nkeys: [{tpm: {device: /dev/tpmrm0, blobFile: /b.blob}}]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	err = rl.Reload(ctx, false)
	if !errors.Is(err, kek.ErrUnavailable) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("reload with a hung open = %v, want ErrUnavailable and DeadlineExceeded", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("reload returned after %v, want about the 200 ms open timeout", d)
	}
	if svc.Keyring().Primary() != kek.KEK(a) || svc.ReloadError() == "" {
		t.Fatalf("after the failed reload: primary %s, reload error %q", svc.Keyring().Primary().ID(), svc.ReloadError())
	}
	close(release)
	<-opened
	deadline := time.Now().Add(5 * time.Second)
	for !late.Closed() {
		if time.Now().After(deadline) {
			t.Fatal("the keyring the stuck open produced was never closed")
		}
		time.Sleep(5 * time.Millisecond)
	}
}
