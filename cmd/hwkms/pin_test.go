package main

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hwkms/hwkms/hsm"
	"github.com/hwkms/hwkms/plugin/config"
	"github.com/hwkms/hwkms/softhsm/softhsmtest"
)

// TestServeWrongPINExitStatus: serve with a PIN the token refuses exits with status 78
// (the systemd unit's RestartPreventExitStatus), names the token, not the PIN, and a
// second start in the same process with the same PIN file makes no new C_Login.
func TestServeWrongPINExitStatus(t *testing.T) {
	fx := softhsmtest.New(t)
	tok := softhsmtest.NewToken(t, fx)
	dir := shortDir(t)
	key := hsm.Config{Module: fx.Module, TokenLabel: tok.Label, PINFile: tok.PINFile, KeyLabel: "kek"}
	if _, err := hsm.CreateKey(context.Background(), key); err != nil {
		t.Fatal(err)
	}
	const wrong = "wrong-pin-4711"
	key.PINFile = filepath.Join(dir, "wrong.pin")
	if err := os.WriteFile(key.PINFile, []byte(wrong+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "hwkms.yaml")
	writeYAML(t, path, &config.Config{Socket: config.Socket{Path: filepath.Join(dir, "kms.sock")}, Keys: []config.Key{{PKCS11: &key}}})
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	for i, want := range []string{"refused the user PIN", "already refused this user PIN"} {
		err := serve(context.Background(), cfg, path, log, nil)
		var ee exitError
		if !errors.As(err, &ee) || ee != exitPINRefused {
			t.Fatalf("start %d: serve = %v, want exit status %d", i+1, err, exitPINRefused)
		}
		var pe *hsm.PINError
		if !errors.As(err, &pe) || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), tok.Label) {
			t.Errorf("start %d: %v, want a *hsm.PINError saying %q and naming token %q", i+1, err, want, tok.Label)
		}
		if strings.Contains(err.Error(), wrong) || strings.Contains(err.Error(), tok.PIN) {
			t.Errorf("start %d: error contains a PIN: %v", i+1, err)
		}
		if _, err := os.Stat(cfg.Socket.Path); err == nil {
			t.Errorf("start %d: socket left behind", i+1)
		}
	}
}
