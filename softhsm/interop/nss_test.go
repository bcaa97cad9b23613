package interop

import (
	"testing"

	"github.com/miekg/pkcs11"
)

// TestNSSSameCKAIDReplacesKey documents an NSS softoken behaviour that matters to any
// KEK made of two token keys sharing a CKA_ID (aes-cbc-hmac's AES and HMAC keys): a
// second token secret key generated with the CKA_ID of an existing one, whatever its
// label and key type, replaces it. C_GenerateKey returns CKR_OK and the first key's
// object handle, and only the new key is left (docs/tokens.md).
func TestNSSSameCKAIDReplacesKey(t *testing.T) {
	tk := StartNSS(t)
	c := tk.Open(t)
	sh := session(t, c, tk)
	id := newID(t)
	gen := func(label string, mech, keyType uint) pkcs11.ObjectHandle {
		t.Helper()
		h, err := c.GenerateKey(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(mech, nil)}, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, keyType),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
			pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
			pkcs11.NewAttribute(pkcs11.CKA_ID, id),
		})
		if err != nil {
			t.Fatalf("C_GenerateKey %s: %v", label, err)
		}
		return h
	}
	aes := gen("kek-aes", pkcs11.CKM_AES_KEY_GEN, pkcs11.CKK_AES)
	mac := gen("kek-mac", pkcs11.CKM_GENERIC_SECRET_KEY_GEN, pkcs11.CKK_GENERIC_SECRET)
	hs, err := find(c, sh, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_ID, id)})
	if err != nil {
		t.Fatal(err)
	}
	aesLeft, err := find(c, sh, hwkmsSearch("kek-aes"))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("AES key handle %d, HMAC key handle %d; objects with the CKA_ID: %d; AES keys left: %d", aes, mac, len(hs), len(aesLeft))
	if mac != aes || len(hs) != 1 || len(aesLeft) != 0 {
		t.Fatal("NSS kept both keys with one CKA_ID: update docs/tokens.md")
	}
}
