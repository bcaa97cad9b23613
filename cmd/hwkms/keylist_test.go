package main

import (
	"bytes"
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hwkms/hwkms/hsm"
	"github.com/hwkms/hwkms/plugin/config"
	"github.com/hwkms/hwkms/softhsm/softhsmtest"
)

// TestKeyListMechanism: key list shows, per pkcs11 key, the mechanism serve would use
// (an AES key alone: aes-gcm on SoftHSM2; a key made with mechanism aes-cbc-hmac: its
// pair), and for a key whose configured mechanism the token or key cannot give, the
// one ErrNoMechanism error naming what is missing.
func TestKeyListMechanism(t *testing.T) {
	fx := softhsmtest.New(t)
	tok := softhsmtest.NewToken(t, fx)
	ctx := context.Background()
	gcm := hsm.Config{Module: fx.Module, TokenLabel: tok.Label, PINFile: tok.PINFile, KeyLabel: "kek-gcm"}
	cbc := gcm
	cbc.KeyLabel, cbc.Mechanism = "kek-cbc", hsm.MechanismAESCBCHMAC
	for _, c := range []hsm.Config{gcm, cbc} {
		if _, err := hsm.CreateKey(ctx, c); err != nil {
			t.Fatal(err)
		}
	}
	lacking := gcm
	lacking.Mechanism = hsm.MechanismAESCBCHMAC // an AES key without an HMAC key

	dir := shortDir(t)
	path := filepath.Join(dir, "hwkms.yaml")
	writeYAML(t, path, &config.Config{Socket: config.Socket{Path: filepath.Join(dir, "kms.sock")},
		Keys: []config.Key{{PKCS11: &gcm}, {PKCS11: &cbc}, {PKCS11: &lacking}}})
	var out, errb bytes.Buffer
	if err := run(ctx, []string{"key", "list", "--config", path}, strings.NewReader(""), &out, &errb); err != nil {
		t.Fatalf("key list: %v\n%s%s", err, out.String(), errb.String())
	}
	t.Logf("key list:\n%s", out.String())
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 4 {
		t.Fatalf("key list printed %d lines, want a header and 3 keys", len(lines))
	}
	for i, want := range []string{"mechanism aes-gcm", "mechanism aes-cbc-hmac",
		"mechanism: none: hsm: token " + `"` + tok.Label + `" has no usable mechanism for key "kek-gcm": aes-cbc-hmac: no HMAC key`} {
		if !strings.Contains(lines[i+1], want) {
			t.Errorf("keys[%d] line %q does not contain %q", i, lines[i+1], want)
		}
	}
	if strings.Contains(out.String()+errb.String(), tok.PIN) {
		t.Fatal("key list output contains the PIN")
	}
}
