package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/hwkms/hwkms/hsm"
	"github.com/hwkms/hwkms/plugin/config"
	"github.com/hwkms/hwkms/softhsm/softhsmtest"
	"github.com/hwkms/hwkms/tpm"
	"github.com/hwkms/hwkms/tpm/swtpm/swtpmtest"
)

// doctorRun runs `hwkms doctor --config path` and returns its stdout and exit code.
func doctorRun(t *testing.T, path string) (string, int) {
	t.Helper()
	var out, errb bytes.Buffer
	err := run(context.Background(), []string{"doctor", "--config", path, "--timeout", "5s"}, strings.NewReader(""), &out, &errb)
	code := 0
	var ee exitError
	switch {
	case errors.As(err, &ee):
		code = int(ee)
	case err != nil:
		t.Fatalf("doctor: %v\n%s", err, errb.String())
	}
	t.Logf("doctor exit %d:\n%s", code, out.String())
	for _, l := range strings.Split(strings.TrimSpace(out.String()), "\n") {
		if !(strings.HasPrefix(l, "[ok] ") || strings.HasPrefix(l, "[FAIL] ") || strings.HasPrefix(l, "[warn] ")) {
			t.Errorf("line %q is not [ok|FAIL|warn] check: detail", l)
		}
	}
	return out.String(), code
}

func wantLine(t *testing.T, out, prefix, contains string) {
	t.Helper()
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, prefix) && strings.Contains(l, contains) {
			return
		}
	}
	t.Fatalf("no line starting %q containing %q in:\n%s", prefix, contains, out)
}

// createExtractableKey makes an AES key that could leave the token, with raw PKCS#11.
// No hsm KEK may be open in the process (SoftHSM2 finalisation is per process).
func createExtractableKey(t *testing.T, module string, tok softhsmtest.TokenInfo, label string) {
	t.Helper()
	c := pkcs11.New(module)
	if c == nil {
		t.Fatal("load module")
	}
	defer c.Destroy()
	if err := c.Initialize(); err != nil {
		t.Fatal(err)
	}
	defer c.Finalize()
	slots, err := c.GetSlotList(true)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range slots {
		info, err := c.GetTokenInfo(s)
		if err != nil || strings.TrimRight(info.Label, " \x00") != tok.Label {
			continue
		}
		sh, err := c.OpenSession(s, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
		if err != nil {
			t.Fatal(err)
		}
		defer c.CloseSession(sh)
		if err := c.Login(sh, pkcs11.CKU_USER, tok.PIN); err != nil {
			t.Fatal(err)
		}
		defer c.Logout(sh)
		id := make([]byte, 16)
		rand.Read(id)
		_, err = c.GenerateKey(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
			pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, true),
			pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
			pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
			pkcs11.NewAttribute(pkcs11.CKA_ID, id),
		})
		if err != nil {
			t.Fatal(err)
		}
		return
	}
	t.Fatalf("token %q not found", tok.Label)
}

func TestDoctorPKCS11(t *testing.T) {
	fx := softhsmtest.New(t)
	// SoftHSM2 sees only tokens that exist when the module initialises: make them all first.
	good := softhsmtest.NewToken(t, fx)
	unsafe := softhsmtest.NewToken(t, fx)
	ctx := context.Background()
	goodKey := hsm.Config{Module: fx.Module, TokenLabel: good.Label, PINFile: good.PINFile, KeyLabel: "kek"}
	info, err := hsm.CreateKey(ctx, goodKey)
	if err != nil {
		t.Fatal(err)
	}
	createExtractableKey(t, fx.Module, unsafe, "leaky")

	wrongPIN := filepath.Join(t.TempDir(), "wrong.pin")
	if err := os.WriteFile(wrongPIN, []byte("not-the-pin\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name     string
		edit     func(c *hsm.Config)
		wantCode int
		prefix   string
		contains string
	}{
		{"healthy", func(c *hsm.Config) {}, 0, "[ok] keys[0] (pkcs11, primary) round trip", "wrap+unwrap"},
		{"wrong module path", func(c *hsm.Config) { c.Module = "/nonexistent/libpkcs11.so" }, 1, "[FAIL] keys[0] (pkcs11, primary) module loads", "/nonexistent/libpkcs11.so"},
		{"module is not a PKCS#11 library", func(c *hsm.Config) { c.Module = "/etc/hostname" }, 1, "[FAIL] keys[0] (pkcs11, primary) module loads", "cannot load"},
		{"unknown token", func(c *hsm.Config) { c.TokenLabel = "no-such-token" }, 1, "[FAIL] keys[0] (pkcs11, primary) token found", "no-such-token"},
		{"wrong PIN", func(c *hsm.Config) { c.PINFile = wrongPIN }, 78, "[FAIL] keys[0] (pkcs11, primary) PIN works", "CKR_PIN_INCORRECT"},
		{"unreadable PIN file", func(c *hsm.Config) { c.PINFile = "/nonexistent/pin" }, 1, "[FAIL] keys[0] (pkcs11, primary) PIN works", "pinFile"},
		{"missing key", func(c *hsm.Config) { c.KeyLabel = "absent" }, 1, "[FAIL] keys[0] (pkcs11, primary) key present", "hwkms key create"},
		{"extractable key", func(c *hsm.Config) {
			c.TokenLabel, c.PINFile, c.KeyLabel = unsafe.Label, unsafe.PINFile, "leaky"
		}, 1, "[FAIL] keys[0] (pkcs11, primary) key present", "CKA_EXTRACTABLE=true"},
		{"extractable key allowed", func(c *hsm.Config) {
			c.TokenLabel, c.PINFile, c.KeyLabel, c.AllowExtractable = unsafe.Label, unsafe.PINFile, "leaky", true
		}, 0, "[warn] keys[0] (pkcs11, primary) key present", "allowExtractable"},
		// An AES key alone cannot be used with aes-cbc-hmac: one FAIL naming what is missing.
		{"mechanism the key lacks", func(c *hsm.Config) { c.Mechanism = hsm.MechanismAESCBCHMAC }, 1,
			"[FAIL] keys[0] (pkcs11, primary) mechanism", "no HMAC key (CKK_GENERIC_SECRET or CKK_SHA256_HMAC) labelled \"kek\""},
		{"mechanism named", func(c *hsm.Config) { c.Mechanism = hsm.MechanismAESGCM }, 0,
			"[ok] keys[0] (pkcs11, primary) mechanism", "aes-gcm (named in config)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := shortDir(t)
			key := goodKey
			tc.edit(&key)
			path := filepath.Join(dir, "hwkms.yaml")
			writeYAML(t, path, &config.Config{Socket: config.Socket{Path: filepath.Join(dir, "kms.sock")}, Keys: []config.Key{{PKCS11: &key}}})
			out, code := doctorRun(t, path)
			if code != tc.wantCode {
				t.Fatalf("exit %d, want %d", code, tc.wantCode)
			}
			wantLine(t, out, tc.prefix, tc.contains)
			if tc.name == "mechanism the key lacks" && strings.Contains(out, "round trip") {
				t.Errorf("doctor went on to a round trip after the mechanism failed:\n%s", out)
			}
			if tc.name == "healthy" {
				wantLine(t, out, "[ok] keys[0] (pkcs11, primary) key present", info.KeyID)
				wantLine(t, out, "[ok] keys[0] (pkcs11, primary) mechanism", "aes-gcm (chosen by auto)")
				wantLine(t, out, "[ok] socket directory", "writable")
				wantLine(t, out, "[ok] config", "parses")
			}
			for _, secret := range []string{good.PIN, unsafe.PIN, good.SOPIN} {
				if strings.Contains(out, secret) {
					t.Fatal("doctor output contains a PIN")
				}
			}
		})
	}

	t.Run("socket served by another process", func(t *testing.T) {
		dir := shortDir(t)
		sock := filepath.Join(dir, "kms.sock")
		ln, err := net.Listen("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		path := filepath.Join(dir, "hwkms.yaml")
		writeYAML(t, path, &config.Config{Socket: config.Socket{Path: sock}, Keys: []config.Key{{PKCS11: &goodKey}}})
		out, code := doctorRun(t, path)
		if code != 1 {
			t.Fatalf("exit %d, want 1", code)
		}
		wantLine(t, out, "[FAIL] socket", "served by another process")
	})

	t.Run("broken config", func(t *testing.T) {
		path := filepath.Join(shortDir(t), "hwkms.yaml")
		if err := os.WriteFile(path, []byte("socket:\n  path: relative.sock\nkeys: []\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		out, code := doctorRun(t, path)
		if code != 1 {
			t.Fatalf("exit %d, want 1", code)
		}
		wantLine(t, out, "[FAIL] config", "socket.path")
	})
}

func TestDoctorTPM(t *testing.T) {
	ctx := context.Background()
	t.Run("TPM absent", func(t *testing.T) {
		dir := shortDir(t)
		key := tpm.Config{Device: "unix://" + filepath.Join(dir, "no-swtpm.sock"), BlobFile: filepath.Join(dir, "kek.blob")}
		path := filepath.Join(dir, "hwkms.yaml")
		writeYAML(t, path, &config.Config{Socket: config.Socket{Path: filepath.Join(dir, "kms.sock")}, Keys: []config.Key{{TPM: &key}}})
		out, code := doctorRun(t, path)
		if code != 1 {
			t.Fatalf("exit %d, want 1", code)
		}
		wantLine(t, out, "[FAIL] keys[0] (tpm, primary) TPM reachable", "no-swtpm.sock")
	})

	sim := swtpmtest.New(t)
	dir := shortDir(t)
	auth := filepath.Join(dir, "kek.auth")
	if err := os.WriteFile(auth, []byte("0123456789abcdef0123"), 0o600); err != nil {
		t.Fatal(err)
	}
	key := tpm.Config{Device: sim.Device, BlobFile: filepath.Join(dir, "kek.blob"), AuthFile: auth, PCRs: []int{16}, AllowVolatilePCRs: true}
	info, err := tpm.CreateKey(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name     string
		edit     func(c *tpm.Config)
		wantCode int
		prefix   string
		contains string
	}{
		{"healthy", func(c *tpm.Config) {}, 0, "[ok] keys[0] (tpm, primary) round trip", "wrap+unwrap"},
		{"missing key", func(c *tpm.Config) { c.BlobFile = filepath.Join(dir, "other.blob") }, 1, "[FAIL] keys[0] (tpm, primary) key present", "hwkms key create"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k := key
			tc.edit(&k)
			path := filepath.Join(dir, tc.name+".yaml")
			writeYAML(t, path, &config.Config{Socket: config.Socket{Path: filepath.Join(dir, "kms.sock")}, Keys: []config.Key{{TPM: &k}}})
			out, code := doctorRun(t, path)
			if code != tc.wantCode {
				t.Fatalf("exit %d, want %d", code, tc.wantCode)
			}
			wantLine(t, out, tc.prefix, tc.contains)
			if tc.name == "mechanism the key lacks" && strings.Contains(out, "round trip") {
				t.Errorf("doctor went on to a round trip after the mechanism failed:\n%s", out)
			}
			if tc.name == "healthy" {
				wantLine(t, out, "[ok] keys[0] (tpm, primary) key present", info.KeyID)
				wantLine(t, out, "[ok] keys[0] (tpm, primary) PCRs readable", "16")
				wantLine(t, out, "[ok] keys[0] (tpm, primary) TPM reachable", sim.Device)
			}
			if strings.Contains(out, "0123456789abcdef0123") {
				t.Fatal("doctor output contains the auth value")
			}
		})
	}
}
