//go:build interop_bugs

package interop

import (
	"context"
	"os"
	"testing"

	"github.com/hwkms/hwkms/hsm"
)

// TestCreateKeyDetectsUnpersistedKey fails until hsm.CreateKey checks that the key
// it made survives a re-initialisation of the module (docs/tokens.md, "opencryptoki:
// key not found after key create"). Run it with: go test -tags interop_bugs.
func TestCreateKeyDetectsUnpersistedKey(t *testing.T) {
	tk := StartOpencryptoki(t)
	if err := os.Remove(ockTokenDir + "/TOK_OBJ"); err != nil {
		t.Fatal(err)
	}
	cfg := hsm.Config{Module: tk.Module, TokenLabel: tk.TokenLabel, PINFile: tk.PINFile, KeyLabel: "kek-interop"}
	info, err := hsm.CreateKey(context.Background(), cfg)
	if err == nil {
		t.Fatalf("hsm.CreateKey reported key %s as created, but the token did not store it: a new process will not find it", info.KeyID)
	}
	t.Logf("hsm.CreateKey refused: %v", err)
}
