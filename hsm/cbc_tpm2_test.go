package hsm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/softhsm/interop"
)

// TestCBCTPM2PKCS11Measure measures, on a real tpm2-pkcs11 with a tpm2_ptool AES key,
// which CBC decrypt calls work for 32..112 bytes of ciphertext: one C_Decrypt of
// CKM_AES_CBC_PAD, one of CKM_AES_CBC, and CKM_AES_CBC one 16-byte block per
// C_DecryptInit/C_Decrypt (IV = previous ciphertext block). The findings are in
// docs/tokens.md; CKM_AES_CBC in one call is what the KEK falls back to, so it must
// work.
func TestCBCTPM2PKCS11Measure(t *testing.T) {
	tk := interop.StartTPM2PKCS11(t)
	cmd := exec.Command("tpm2_ptool", "addkey", "--label", tk.TokenLabel, "--key-label", "kek-cbc",
		"--userpin", tk.PIN, "--algorithm", "aes256", "--path", tk.Env["TPM2_PKCS11_STORE"])
	cmd.Env = append(os.Environ(), "TPM2TOOLS_TCTI=tabrmd:bus_type=session")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("tpm2_ptool addkey: %v: %s", err, bytes.ReplaceAll(out, []byte(tk.PIN), []byte("***")))
	}
	tok := rawToken(t, Config{Module: tk.Module, TokenLabel: tk.TokenLabel, PINFile: tk.PINFile, KeyLabel: "kek-cbc"})
	hs, err := findObjects(tok.ctx, newSession(t, tok), keyTemplate("kek-cbc", nil))
	if err != nil || len(hs) != 1 {
		t.Fatalf("finding the tpm2_ptool key: %d keys, %v", len(hs), err)
	}
	key := hs[0]
	for _, n := range []int{32, 48, 64, 112} {
		pt := random(t, n-1) // n bytes of CBC-PAD ciphertext
		iv := random(t, 16)
		ct, err := once(t, tok, key, cbcPad(iv), false, pt, n)
		if err != nil || len(ct) != n {
			t.Fatalf("EncryptOnce CBC-PAD of %d bytes: %d bytes, %v", len(pt), len(ct), err)
		}
		padded := append(append([]byte{}, pt...), 1)
		res := map[string]string{}
		got, err := once(t, tok, key, cbcPad(iv), true, ct, n)
		res["cbc-pad one call"] = verdict(got, pt, err)
		got, err = once(t, tok, key, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_CBC, iv)}, true, ct, n)
		res["cbc one call"] = verdict(got, padded, err)
		var blk []byte
		prev := iv
		err = nil
		for i := 0; i < n && err == nil; i += 16 {
			var b []byte
			b, err = once(t, tok, key, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_CBC, prev)}, true, ct[i:i+16], 16)
			blk = append(blk, b...)
			prev = ct[i : i+16]
		}
		res["cbc blockwise"] = verdict(blk, padded, err)
		t.Logf("%d bytes of ciphertext: %v", n, res)
		// CKM_AES_CBC in one call is what the KEK falls back to (cbcDecryptRaw).
		if res["cbc one call"] != "ok" {
			t.Errorf("one C_Decrypt of CKM_AES_CBC of %d bytes on tpm2-pkcs11: %s", n, res["cbc one call"])
		}
		if n > 32 && res["cbc-pad one call"] == "ok" {
			t.Logf("CKM_AES_CBC_PAD decrypts %d bytes in one call on this tpm2-pkcs11: update docs/tokens.md", n)
		}
	}
}

// TestCBCTPM2PKCS11KEK: a KEK opened on a tpm2_ptool-made aes-cbc-hmac key pair (an
// AES-256 key and an HMAC-SHA256 key with one CKA_ID) decrypts with CKM_AES_CBC and
// round-trips a 32-byte seed and the largest plaintext, and refuses a changed body.
func TestCBCTPM2PKCS11KEK(t *testing.T) {
	tk := interop.StartTPM2PKCS11(t)
	id := "6877686b6d732d636263"
	for _, alg := range []string{"aes256", "hmac:sha256"} {
		cmd := exec.Command("tpm2_ptool", "addkey", "--label", tk.TokenLabel, "--key-label", "kek-cbc", "--id", id,
			"--userpin", tk.PIN, "--algorithm", alg, "--path", tk.Env["TPM2_PKCS11_STORE"])
		cmd.Env = append(os.Environ(), "TPM2TOOLS_TCTI=tabrmd:bus_type=session")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("tpm2_ptool addkey --algorithm %s: %v: %s", alg, err, bytes.ReplaceAll(out, []byte(tk.PIN), []byte("***")))
		}
	}
	for _, mech := range []string{MechanismAESCBCHMAC, MechanismAuto} {
		t.Run(mech, func(t *testing.T) {
			k := openKEK(t, Config{Module: tk.Module, TokenLabel: tk.TokenLabel, PINFile: tk.PINFile, KeyLabel: "kek-cbc",
				Mechanism: mech})
			if k.Mechanism() != MechanismAESCBCHMAC || k.mech.cbc != cbcDecryptRaw {
				t.Fatalf("KEK on tpm2-pkcs11: %s decrypting with %s, want %s with %s", k.Mechanism(), k.mech.cbc, MechanismAESCBCHMAC, cbcDecryptRaw)
			}
			ctx := context.Background()
			aad := []byte("key id and frame header")
			for _, n := range []int{1, 15, 16, 32, kek.MaxPlaintext} {
				seed := random(t, n)
				body, err := k.Wrap(ctx, seed, aad)
				if err != nil {
					t.Fatalf("Wrap of %d bytes: %v", n, err)
				}
				if body[0] != mechAESCBCHMAC {
					t.Fatalf("Wrap made body version 0x%02x", body[0])
				}
				got, err := k.Unwrap(ctx, body, aad)
				if err != nil || !bytes.Equal(got, seed) {
					t.Fatalf("Unwrap of a %d-byte plaintext's body: %d bytes, %v", n, len(got), err)
				}
				bad := bytes.Clone(body)
				bad[20] ^= 1
				if _, err := k.Unwrap(ctx, bad, aad); !errors.Is(err, kek.ErrInvalidCiphertext) {
					t.Fatalf("Unwrap of a changed body: %v, want kek.ErrInvalidCiphertext", err)
				}
			}
		})
	}
}

func verdict(got, want []byte, err error) string {
	switch {
	case err != nil:
		return err.Error()
	case !bytes.Equal(got, want):
		return fmt.Sprintf("wrong plaintext (%d bytes)", len(got))
	}
	return "ok"
}
