package config

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hwkms/hwkms/hsm"
	"github.com/hwkms/hwkms/plugin"
	"github.com/hwkms/hwkms/softhsm/softhsmtest"
)

// TestWatchReloadsOnFileChangeAndTrigger: Watch reloads when the config file is
// replaced (an editor's rename) and on every explicit trigger (SIGHUP), even when the
// bytes did not change; FindKey then finds a key that only the token knows.
func TestWatchReloadsOnFileChangeAndTrigger(t *testing.T) {
	fx := softhsmtest.New(t)
	tok := softhsmtest.NewToken(t, fx)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	mk := func(label string) hsm.Config {
		c := hsm.Config{Module: fx.Module, TokenLabel: tok.Label, PINFile: tok.PINFile, KeyLabel: label}
		if _, err := hsm.CreateKey(ctx, c); err != nil {
			t.Fatal(err)
		}
		return c
	}
	a, b := mk("kek-watch-a"), mk("kek-watch-b")
	dir := t.TempDir()
	path := filepath.Join(dir, "hwkms.yaml")
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
	rl := NewReloader(svc, cfg, path, discard(), nil)
	var reloads atomic.Int64
	rl.OnReload = func(error) { reloads.Add(1) }
	trigger := make(chan struct{})
	watchCtx, stopWatch := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { rl.Watch(watchCtx, trigger); close(done) }()
	t.Cleanup(func() { stopWatch(); <-done })
	idA := svc.Keyring().Primary().ID()

	// Replace the file the way an editor does: write a temp file, rename it over. Watch
	// adds its directory watch when it starts, which this goroutine cannot observe, so
	// the replacement is repeated until a reload shows (it never reloads without one:
	// the explicit trigger is not used before this point).
	tmp := filepath.Join(dir, ".hwkms.yaml.swp")
	replace := func() {
		writeConfig(t, tmp, b, a)
		if err := os.Rename(tmp, path); err != nil {
			t.Fatal(err)
		}
	}
	replace()
	last := time.Now()
	waitFor(t, "reload to B after the file changed", func() bool {
		if svc.Keyring().Primary().ID() != idA {
			return true
		}
		if time.Since(last) > time.Second {
			replace()
			last = time.Now()
		}
		return false
	})
	if rl.Config().Keys[0].PKCS11.KeyLabel != "kek-watch-b" {
		t.Fatalf("Config() after reload: primary %q", rl.Config().Keys[0].PKCS11.KeyLabel)
	}
	n := reloads.Load()

	// A trigger reloads even though the bytes are unchanged.
	trigger <- struct{}{}
	waitFor(t, "reload on trigger", func() bool { return reloads.Load() > n })

	// FindKey finds A by key_id through the tokens of a config that no longer lists it
	// as primary, and refuses a key_id no token has.
	k, d, err := FindKey(ctx, rl.Config(), idA)
	if err != nil || !d.Present || d.KeyID != idA || k.PKCS11 == nil || k.PKCS11.KeyLabel != "kek-watch-a" {
		t.Fatalf("FindKey(A) = %+v, %+v, %v", k, d, err)
	}
	if _, _, err := FindKey(ctx, rl.Config(), "p11:00000000000000000000000000000000"); err == nil {
		t.Fatal("FindKey of an unknown key_id succeeded")
	}
}

// TestPINRefusedAndRemembered: a wrong PIN is recognised as a refusal, and a config
// with a pkcs11 key records refusals in its state directory.
func TestPINRefusedAndRemembered(t *testing.T) {
	fx := softhsmtest.New(t)
	tok := softhsmtest.NewToken(t, fx)
	ctx := context.Background()
	good := hsm.Config{Module: fx.Module, TokenLabel: tok.Label, PINFile: tok.PINFile, KeyLabel: "kek-pin"}
	if _, err := hsm.CreateKey(ctx, good); err != nil {
		t.Fatal(err)
	}
	state := t.TempDir()
	wrongPIN := filepath.Join(t.TempDir(), "pin")
	if err := os.WriteFile(wrongPIN, []byte("not-the-pin\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	bad := good
	bad.PINFile = wrongPIN
	cfg := &Config{StateDir: state, Socket: Socket{Path: filepath.Join(state, "kms.sock")}, Keys: []Key{{PKCS11: &bad}}}
	if err := cfg.RememberRefusedPINs(true); err != nil {
		t.Fatalf("RememberRefusedPINs: %v", err)
	}
	t.Cleanup(func() { _ = hsm.RememberRefusals("") })
	_, err := OpenKey(ctx, cfg.Keys[0])
	if err == nil || !PINRefused(err) {
		t.Fatalf("open with a wrong PIN: %v, want a PIN refusal", err)
	}
	if PINRefused(errors.New("CKR_DEVICE_ERROR")) {
		t.Fatal("a device error counted as a PIN refusal")
	}
	if ents, err := os.ReadDir(state); err != nil || len(ents) == 0 {
		t.Fatalf("no refused-PIN record in stateDir %s: %v %v", state, ents, err)
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
