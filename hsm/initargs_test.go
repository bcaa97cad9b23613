package hsm

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/hwkms/hwkms/softhsm/interop"
)

// TestInitArgsNSS: the NSS softoken, whose C_Initialize needs pReserved naming its
// database, works through CreateKey, ListKeys and Open with Config.InitArgs; without
// them its C_Initialize fails CKR_ARGUMENTS_BAD; and while it is loaded a config with
// other initArgs is refused, since the module is initialised once per process.
func TestInitArgsNSS(t *testing.T) {
	tk := interop.StartNSS(t)
	ctx := context.Background()
	cfg := Config{Module: tk.Module, TokenLabel: tk.TokenLabel, PINFile: tk.PINFile, KeyLabel: "kek-nss", InitArgs: tk.InitArgs}

	noArgs := cfg
	noArgs.InitArgs = ""
	_, err := CreateKey(ctx, noArgs)
	wantRV(t, "CreateKey on NSS without initArgs", err, pkcs11.CKR_ARGUMENTS_BAD)
	if !errors.Is(err, ErrModule) {
		t.Fatalf("CreateKey without initArgs: %v, want ErrModule", err)
	}
	requireNoModules(t)

	ki, err := CreateKey(ctx, cfg)
	if err != nil {
		t.Fatalf("CreateKey on NSS with initArgs: %v", err)
	}
	keys, err := ListKeys(ctx, cfg)
	if err != nil || len(keys) != 1 || keys[0].KeyID != ki.KeyID {
		t.Fatalf("ListKeys = %+v, %v; want the key %s", keys, err, ki.KeyID)
	}
	k, err := Open(ctx, cfg)
	if err != nil {
		t.Fatalf("Open on NSS with initArgs: %v", err)
	}
	if k.ID() != ki.KeyID {
		t.Fatalf("Open found key %s, CreateKey made %s", k.ID(), ki.KeyID)
	}

	// A re-initialisation (recover.go) passes the initArgs again: without them the
	// softoken's C_Initialize fails and the re-init would count as failed.
	if err := k.tok.mod.recoverDevice(ctx, k.tok, k.tok.mod.gen.Load(), errors.New("test")); err != nil {
		t.Fatalf("re-initialisation of the NSS module: %v", err)
	}
	if ok, failed := k.Reinits(); ok != 1 || failed != 0 {
		t.Fatalf("Reinits = %d ok, %d failed; want 1, 0", ok, failed)
	}
	if keys, err := ListKeys(ctx, cfg); err != nil || len(keys) != 1 {
		t.Fatalf("ListKeys after the re-initialisation = %+v, %v", keys, err)
	}

	other := cfg
	other.InitArgs = tk.InitArgs + " "
	_, err = Open(ctx, other)
	if err == nil || !errors.Is(err, ErrModule) || !strings.Contains(err.Error(), "initArgs") {
		t.Fatalf("Open with other initArgs while the module is loaded: %v, want ErrModule naming initArgs", err)
	}
	if err := k.Close(); err != nil {
		t.Fatal(err)
	}
	if err := DestroyKey(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	requireNoModules(t)
}

func TestInitArgsValidate(t *testing.T) {
	base := Config{Module: "/usr/lib/x.so", TokenLabel: "t", PINFile: "/p", KeyLabel: "k"}
	for _, tc := range []struct {
		name, args, want string
	}{
		{"ok", "configdir='sql:/var/lib/nssdb' flags=", ""},
		{"nul", "a\x00b", "keys[0].pkcs11.initArgs: must not contain a NUL byte"},
		{"long", strings.Repeat("a", maxInitArgs+1), "keys[0].pkcs11.initArgs: longer than"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := base
			c.InitArgs = tc.args
			err := c.Validate("keys[0].pkcs11")
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("Validate: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("Validate = %v, want %q", err, tc.want)
			}
		})
	}
}
