package interop

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/hwkms/hwkms/hsm"
	"github.com/hwkms/hwkms/plugin/kek"
)

// hwkmsResult is what hsm (as `hwkms key create` and `hwkms serve` use it) does on a
// token today.
type hwkmsResult struct {
	impl, create, open, wrap string
}

func errText(err error) string {
	if err == nil {
		return "ok"
	}
	return err.Error()
}

// runHWKMS creates a KEK with hsm.CreateKey, opens it with hsm.Open, wraps and
// unwraps with it, and destroys it again. Device errors must stay typed.
func runHWKMS(t *testing.T, tk *Token, label string) hwkmsResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cfg := hsm.Config{Module: tk.Module, TokenLabel: tk.TokenLabel, PINFile: tk.PINFile, KeyLabel: label, InitArgs: tk.InitArgs}
	res := hwkmsResult{impl: tk.Impl, open: "-", wrap: "-"}
	typed := func(op string, err error) {
		var rv pkcs11.Error
		if err != nil && strings.Contains(err.Error(), "CKR_") && !errors.As(err, &rv) {
			t.Errorf("%s: %s error names a CK_RV but does not unwrap to pkcs11.Error: %v", tk.Impl, op, err)
		}
	}
	_, err := hsm.CreateKey(ctx, cfg)
	res.create = errText(err)
	typed("CreateKey", err)
	if err != nil {
		return res
	}
	t.Cleanup(func() {
		if err := hsm.DestroyKey(context.Background(), cfg); err != nil && !errors.Is(err, kek.ErrKeyNotFound) {
			t.Errorf("%s: DestroyKey: %v", tk.Impl, err)
		}
	})
	k, err := hsm.Open(ctx, cfg)
	res.open = errText(err)
	typed("Open", err)
	if err != nil {
		return res
	}
	defer k.Close()
	res.open = "ok (" + k.Mechanism() + ")"
	body, err := k.Wrap(ctx, []byte("a DEK seed of thirty-two bytes!!"), []byte("aad"))
	if err == nil {
		_, err = k.Unwrap(ctx, body, []byte("aad"))
	}
	res.wrap = errText(err)
	typed("Wrap/Unwrap", err)
	return res
}

// TestHWKMS runs hsm's create, open, wrap and unwrap on each implementation and logs
// where it fails today (docs/tokens.md). SoftHSM2, the reference, must pass.
func TestHWKMS(t *testing.T) {
	var rows []hwkmsResult
	for _, st := range Starters {
		t.Run(strings.ReplaceAll(st.Name, " ", "_"), func(t *testing.T) {
			tk := st.Start(t)
			r := runHWKMS(t, tk, "kek-interop")
			rows = append(rows, r)
			// SoftHSM2 is the reference; opencryptoki (aes-cbc-hmac) and the NSS softoken
			// (aes-gcm through a single C_Encrypt, initArgs) work since hsm handles them.
			if tk.Impl != "tpm2-pkcs11" && (r.create != "ok" || !strings.HasPrefix(r.open, "ok") || r.wrap != "ok") {
				t.Errorf("%s: create %s, open %s, wrap %s; want ok", tk.Impl, r.create, r.open, r.wrap)
			}
		})
	}
	var b strings.Builder
	b.WriteString("| implementation | hsm.CreateKey | hsm.Open | Wrap+Unwrap |\n| --- | --- | --- | --- |\n")
	for _, r := range rows {
		fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", r.impl, r.create, r.open, r.wrap)
	}
	t.Log("\n" + b.String())
	if p := os.Getenv("INTEROP_HWKMS_TABLE"); p != "" {
		if err := os.WriteFile(p, []byte(b.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// TestOpencryptokiKeyLostWithoutTOKOBJ documents the opencryptoki 3.8 soft token
// behaviour behind "hwkms key create" succeeding and "hwkms serve" then reporting
// key not found (before hsm.CreateKey looked for the key again; now it fails with
// hsm.ErrNotStored, TestCreateKeyDetectsUnpersistedKey): when
// /var/lib/opencryptoki/swtok/TOK_OBJ is missing (C_InitToken does not create it; a
// token wiped by removing the directory's contents has none), C_GenerateKey with
// CKA_TOKEN=true returns CKR_OK, the key reads back CKA_TOKEN=true and is found in the
// creating process, but it is never written, so after C_Finalize/C_Initialize it is
// gone. Raw PKCS#11 calls with hwkms's template, as hsm makes them.
func TestOpencryptokiKeyLostWithoutTOKOBJ(t *testing.T) {
	tk := StartOpencryptoki(t)
	if err := os.Remove(ockTokenDir + "/TOK_OBJ"); err != nil {
		t.Fatal(err)
	}
	c := pkcs11.New(tk.Module)
	if c == nil {
		t.Fatalf("cannot load %s", tk.Module)
	}
	defer c.Destroy()
	if err := tk.Initialize(c); err != nil {
		t.Fatal(err)
	}
	sh := session(t, c, tk)
	h, err := c.GenerateKey(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)},
		attrs(hwkmsTemplate("kek-interop", newID(t))))
	if err != nil {
		t.Fatalf("C_GenerateKey: %v (expected the token to accept the key)", err)
	}
	got, err := c.GetAttributeValue(sh, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_TOKEN, nil)})
	if err != nil || len(got) != 1 || len(got[0].Value) != 1 || got[0].Value[0] == 0 {
		t.Fatalf("CKA_TOKEN of the new key: %v, %v; want true", got, err)
	}
	sh2 := session(t, c, tk)
	if hs, err := find(c, sh2, hwkmsSearch("kek-interop")); err != nil || len(hs) != 1 {
		t.Fatalf("another session of the creating process finds %d keys (%v), want 1 (served from memory)", len(hs), err)
	}
	if err := c.Finalize(); err != nil {
		t.Fatal(err)
	}
	if err := tk.Initialize(c); err != nil {
		t.Fatalf("C_Initialize again: %v", err)
	}
	defer c.Finalize() //nolint:errcheck // test
	sh = session(t, c, tk)
	hs, err := find(c, sh, hwkmsSearch("kek-interop"))
	if err != nil {
		t.Fatal(err)
	}
	if len(hs) != 0 {
		t.Fatal("the key survived C_Finalize/C_Initialize: opencryptoki persisted it after all; update docs/tokens.md")
	}
	t.Log("reproduced: C_GenerateKey CKR_OK with CKA_TOKEN=true, key gone after C_Finalize/C_Initialize")
	if _, err := os.Stat(ockTokenDir + "/TOK_OBJ"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("TOK_OBJ exists again (%v): opencryptoki recreates it; update docs/tokens.md", err)
	}
}

// TestTPM2PKCS11PtoolAESKey makes the AES-256 key with tpm2_ptool addkey, as
// tpm2-pkcs11 has no C_GenerateKey, and checks what hsm.Open and Wrap do with it.
func TestTPM2PKCS11PtoolAESKey(t *testing.T) {
	tk := StartTPM2PKCS11(t)
	env := []string{"TPM2TOOLS_TCTI=" + tpm2TCTI}
	for k, v := range tk.Env {
		env = append(env, k+"="+v)
	}
	out, err := run(env, "", []string{tk.PIN}, "tpm2_ptool", "addkey", "--label", tk.TokenLabel,
		"--key-label", "kek-interop", "--userpin", tk.PIN, "--algorithm", "aes256", "--path", tk.Env["TPM2_PKCS11_STORE"])
	if err != nil {
		t.Fatalf("tpm2_ptool addkey: %v", err)
	}
	t.Logf("tpm2_ptool addkey: %s", strings.TrimSpace(out))
	cfg := hsm.Config{Module: tk.Module, TokenLabel: tk.TokenLabel, PINFile: tk.PINFile, KeyLabel: "kek-interop"}
	keys, err := hsm.ListKeys(context.Background(), cfg)
	if err != nil {
		t.Fatalf("hsm.ListKeys: %v", err)
	}
	if len(keys) != 1 {
		t.Fatalf("hsm.ListKeys found %d keys, want the one tpm2_ptool made: %+v", len(keys), keys)
	}
	t.Logf("key attributes as hsm reads them: %+v", keys[0])
	if !keys[0].Safe() {
		t.Errorf("the tpm2_ptool key is not one hsm accepts without allowExtractable: %+v", keys[0])
	}
	// hsm.Open chooses a mechanism by a round trip: the token has no CKM_AES_GCM,
	// and aes-cbc-hmac needs an HMAC key, which tpm2_ptool did not make.
	k, err := hsm.Open(context.Background(), cfg)
	if err == nil {
		_, err = k.Wrap(context.Background(), []byte("a DEK seed of thirty-two bytes!!"), []byte("aad"))
		t.Logf("hsm Open ok, mechanism %s; Wrap: %v", k.Mechanism(), err)
		if err := k.Close(); err != nil {
			t.Fatal(err)
		}
	} else {
		t.Logf("hsm.Open: %v", err)
		if !errors.Is(err, hsm.ErrNoMechanism) {
			t.Errorf("hsm.Open of the tpm2_ptool key: %v, want hsm.ErrNoMechanism", err)
		}
	}

	// The mechanism the token does have for it, each operation in a session of its
	// own (a failed operation may stay active).
	c := tk.Open(t)
	sh := session(t, c, tk)
	hs, err := find(c, sh, hwkmsSearch("kek-interop"))
	if err != nil || len(hs) != 1 {
		t.Fatalf("find the key: %d, %v", len(hs), err)
	}
	results := map[string]string{}
	for name, f := range map[string]func(*pkcs11.Ctx, pkcs11.SessionHandle, pkcs11.ObjectHandle) string{
		"gcm": hwkmsGCM, "cbc-pad": cbcPadRoundTrip, "cbc-pad-multipart": cbcPadMultiPart,
	} {
		s2, err := c.OpenSession(tk.Slot, pkcs11.CKF_SERIAL_SESSION)
		if err != nil {
			t.Fatal(err)
		}
		results[name] = f(c, s2, hs[0])
		c.CloseSession(s2) //nolint:errcheck // test
	}
	t.Logf("on the tpm2_ptool key: CKM_AES_GCM %s; CKM_AES_CBC_PAD C_Encrypt/C_Decrypt %s; multi-part %s",
		results["gcm"], results["cbc-pad"], results["cbc-pad-multipart"])
	if results["gcm"] == "CKR_OK" {
		t.Errorf("CKM_AES_GCM on the tpm2_ptool key works: update docs/tokens.md")
	}
	// tpm2-pkcs11 1.9 lists CKM_AES_CBC_PAD, but with miekg/pkcs11's length query
	// (a NULL output buffer, then a buffer of the size returned) C_Decrypt and
	// C_EncryptUpdate answer CKR_BUFFER_TOO_SMALL (docs/tokens.md).
	if results["cbc-pad"] == "CKR_OK" {
		t.Logf("CKM_AES_CBC_PAD single-part now works on tpm2-pkcs11: update docs/tokens.md")
	}
}

// cbcPadMultiPart is cbcPadRoundTrip with C_EncryptUpdate/Final and
// C_DecryptUpdate/Final.
func cbcPadMultiPart(c *pkcs11.Ctx, sh pkcs11.SessionHandle, h pkcs11.ObjectHandle) string {
	iv := make([]byte, 16)
	if _, err := rand.Read(iv); err != nil {
		return err.Error()
	}
	pt := []byte("hwkms interop probe plaintext")
	m := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_CBC_PAD, iv)}
	if err := c.EncryptInit(sh, m, h); err != nil {
		return "C_EncryptInit " + rvName(err)
	}
	ct, err := c.EncryptUpdate(sh, pt)
	if err != nil {
		return "C_EncryptUpdate " + rvName(err)
	}
	tail, err := c.EncryptFinal(sh)
	if err != nil {
		return "C_EncryptFinal " + rvName(err)
	}
	ct = append(ct, tail...)
	if err := c.DecryptInit(sh, m, h); err != nil {
		return "C_DecryptInit " + rvName(err)
	}
	back, err := c.DecryptUpdate(sh, ct)
	if err != nil {
		return "C_DecryptUpdate " + rvName(err)
	}
	tail, err = c.DecryptFinal(sh)
	if err != nil {
		return "C_DecryptFinal " + rvName(err)
	}
	if back = append(back, tail...); !bytes.Equal(back, pt) {
		return fmt.Sprintf("wrong plaintext (%d bytes)", len(back))
	}
	return "CKR_OK"
}
