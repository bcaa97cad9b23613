package interop

import (
	"context"
	"errors"
	"os"
	"testing"

	"github.com/hwkms/hwkms/hsm"
	"github.com/hwkms/hwkms/plugin/kek"
)

// TestCreateKeyDetectsUnpersistedKey is the regression test of the opencryptoki
// failure in docs/tokens.md: with swtok/TOK_OBJ missing, the soft token accepts
// CKA_TOKEN=true and never stores the key. hsm.CreateKey must refuse to report such a
// key as created (hsm.ErrNotStored), and leave nothing that Open could find.
func TestCreateKeyDetectsUnpersistedKey(t *testing.T) {
	tk := StartOpencryptoki(t)
	if err := os.Remove(ockTokenDir + "/TOK_OBJ"); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	cfg := hsm.Config{Module: tk.Module, TokenLabel: tk.TokenLabel, PINFile: tk.PINFile, KeyLabel: "kek-interop"}
	info, err := hsm.CreateKey(ctx, cfg)
	if err == nil {
		t.Fatalf("hsm.CreateKey reported key %s as created, but the token did not store it: a new process will not find it", info.KeyID)
	}
	if !errors.Is(err, hsm.ErrNotStored) || !errors.Is(err, kek.ErrUnavailable) {
		t.Fatalf("hsm.CreateKey: %v, want hsm.ErrNotStored and kek.ErrUnavailable", err)
	}
	t.Logf("hsm.CreateKey refused: %v", err)
	keys, err := hsm.ListKeys(ctx, cfg)
	if err != nil {
		t.Fatalf("hsm.ListKeys: %v", err)
	}
	if len(keys) != 0 {
		t.Errorf("after the refused CreateKey the token lists %d keys: %+v", len(keys), keys)
	}

	// With TOK_OBJ back, the same CreateKey succeeds and the key is found by Open.
	if err := os.Mkdir(ockTokenDir+"/TOK_OBJ", 0o770); err != nil {
		t.Fatal(err)
	}
	if _, err := hsm.CreateKey(ctx, cfg); err != nil {
		t.Fatalf("hsm.CreateKey with TOK_OBJ present: %v", err)
	}
	k, err := hsm.Open(ctx, cfg)
	if err != nil {
		t.Fatalf("hsm.Open of the stored key: %v", err)
	}
	if err := k.Close(); err != nil {
		t.Fatal(err)
	}
	if err := hsm.DestroyKey(ctx, cfg); err != nil {
		t.Fatal(err)
	}
}
