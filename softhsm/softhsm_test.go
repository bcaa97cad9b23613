package softhsm

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestModule(t *testing.T) {
	t.Run("env override", func(t *testing.T) {
		p := filepath.Join(t.TempDir(), "lib.so")
		if err := os.WriteFile(p, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		t.Setenv(ModuleEnv, p)
		if got, err := Module(); err != nil || got != p {
			t.Errorf("Module = %q, %v; want %q", got, err, p)
		}
	})
	t.Run("env override missing", func(t *testing.T) {
		t.Setenv(ModuleEnv, "/nonexistent/libsofthsm2.so")
		if _, err := Module(); err == nil || !strings.Contains(err.Error(), ModuleEnv) {
			t.Errorf("Module = %v, want an error naming %s", err, ModuleEnv)
		}
	})
}

func TestInitToken(t *testing.T) {
	if _, err := Util(); err != nil {
		skipOrFail(t, err)
	}
	if _, err := Module(); err != nil {
		skipOrFail(t, err)
	}
	fx, err := New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	serial, err := fx.InitToken("fixture-test", "so-secret-1", "user-secret-1")
	if err != nil {
		t.Fatal(err)
	}
	if len(serial) != 16 {
		t.Errorf("serial = %q, want 16 hex digits", serial)
	}
	serial2, err := fx.InitToken("fixture-test-2", "so-secret-2", "user-secret-2")
	if err != nil || serial2 == serial {
		t.Errorf("second token: serial %q, %v", serial2, err)
	}
	entries, err := os.ReadDir(fx.TokenDir)
	if err != nil || len(entries) != 2 {
		t.Errorf("token dir holds %d entries, %v; want 2", len(entries), err)
	}
	for _, bad := range []struct{ label, so, user string }{
		{"", "so", "user"},
		{strings.Repeat("x", 33), "so", "user"},
		{"ok", "", "user"},
	} {
		if _, err := fx.InitToken(bad.label, bad.so, bad.user); err == nil {
			t.Errorf("InitToken(%q, %q, %q) succeeded", bad.label, bad.so, bad.user)
		}
	}
}

// skipOrFail mirrors softhsmtest: skip without SoftHSM2, unless CI is set.
func skipOrFail(t *testing.T, err error) {
	t.Helper()
	if os.Getenv("CI") != "" {
		t.Fatalf("SoftHSM2 is required when CI is set: %v", err)
	}
	t.Skipf("SoftHSM2 not available: %v", err)
}
