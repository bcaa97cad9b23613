package hsm

import (
	"context"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/hwkms/hwkms/softhsm/interop"
)

// refuseAttrs is a token that refuses any key template holding one of its attribute
// types (CKR_ATTRIBUTE_TYPE_INVALID), as tokens older than PKCS#11 v2.40 do for
// CKA_COPYABLE.
type refuseAttrs struct {
	p11
	types map[uint]bool
}

func (r refuseAttrs) refuses(tmpls ...[]*pkcs11.Attribute) bool {
	for _, tmpl := range tmpls {
		for _, a := range tmpl {
			if r.types[a.Type] {
				return true
			}
		}
	}
	return false
}

func (r refuseAttrs) GenerateKey(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, temp []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	if r.refuses(temp) {
		return 0, pkcs11.Error(pkcs11.CKR_ATTRIBUTE_TYPE_INVALID)
	}
	return r.p11.GenerateKey(sh, m, temp)
}

func (r refuseAttrs) GenerateKeyPair(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, pub, priv []*pkcs11.Attribute) (pkcs11.ObjectHandle, pkcs11.ObjectHandle, error) {
	if r.refuses(pub, priv) {
		return 0, 0, pkcs11.Error(pkcs11.CKR_ATTRIBUTE_TYPE_INVALID)
	}
	return r.p11.GenerateKeyPair(sh, m, pub, priv)
}

// locksOf reads CKA_MODIFIABLE and CKA_COPYABLE of every object labelled label, raw.
func locksOf(t *testing.T, cfg Config, label string) (n int, modifiable, copyable []bool) {
	t.Helper()
	c, sh := rawSession(t, cfg)
	hs, err := findObjects(c, sh, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, label)})
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range hs {
		m, cp := readLocks(c, sh, h)
		modifiable, copyable = append(modifiable, m), append(copyable, cp)
	}
	return len(hs), modifiable, copyable
}

// TestCreateKeyLocksAttributes: every object CreateKey makes (the AES key, the HMAC
// key of aes-cbc-hmac, both halves of rsa-oaep) has CKA_MODIFIABLE and CKA_COPYABLE
// false on a token that allows it (SoftHSM2 does): nobody logged in can relabel it,
// change its CKA_ID or usage, or copy it under another name.
func TestCreateKeyLocksAttributes(t *testing.T) {
	fx, toks := newTokens(t, 1)
	for _, tc := range []struct{ label, mech string }{{"gcm", ""}, {"cbc", MechanismAESCBCHMAC}, {"rsa", MechanismRSAOAEP}} {
		cfg := cfgFor(fx, toks[0], tc.label)
		cfg.Mechanism = tc.mech
		createKey(t, cfg)
		n, mod, cp := locksOf(t, cfg, tc.label)
		if n < 1 {
			t.Fatalf("%s: no objects found", tc.label)
		}
		for i := range n {
			if mod[i] || cp[i] {
				t.Errorf("%s: object %d of %d: CKA_MODIFIABLE %v, CKA_COPYABLE %v; want both false", tc.label, i+1, n, mod[i], cp[i])
			}
		}
	}
}

// TestCreateKeyLockFallback: a token that refuses CKA_COPYABLE (or both attributes)
// still gets its key, made without what it refuses; KeyInfo reports it (Copyable,
// Modifiable, AttributeWarning) at creation and in ListKeys, and the key works.
func TestCreateKeyLockFallback(t *testing.T) {
	for _, tc := range []struct {
		name                 string
		refuse               []uint
		modifiable, copyable bool
	}{
		{"accepts both", nil, false, false},
		{"refuses CKA_COPYABLE", []uint{pkcs11.CKA_COPYABLE}, false, true},
		{"refuses both", []uint{pkcs11.CKA_COPYABLE, pkcs11.CKA_MODIFIABLE}, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fx, toks := newTokens(t, 1)
			types := map[uint]bool{}
			for _, a := range tc.refuse {
				types[a] = true
			}
			seam(t, func(p p11) p11 { return refuseAttrs{p11: p, types: types} })
			for _, mech := range []string{"", MechanismRSAOAEP} {
				cfg := cfgFor(fx, toks[0], "kek-"+mech)
				cfg.Mechanism = mech
				ki := createKey(t, cfg)
				if ki.Modifiable != tc.modifiable || ki.Copyable != tc.copyable {
					t.Errorf("%s: CreateKey: Modifiable %v, Copyable %v; want %v, %v", mech, ki.Modifiable, ki.Copyable, tc.modifiable, tc.copyable)
				}
				warn := ki.AttributeWarning()
				if (warn == "") != (!tc.modifiable && !tc.copyable) ||
					strings.Contains(warn, "CKA_COPYABLE") != tc.copyable || strings.Contains(warn, "CKA_MODIFIABLE") != tc.modifiable {
					t.Errorf("%s: AttributeWarning() = %q for Modifiable %v, Copyable %v", mech, warn, ki.Modifiable, ki.Copyable)
				}
				roundTrip(t, openKEK(t, cfg), []byte("seed"), aad)
			}
			keys, err := ListKeys(context.Background(), cfgFor(fx, toks[0], ""))
			if err != nil || len(keys) != 2 {
				t.Fatalf("ListKeys = %d keys, %v; want 2", len(keys), err)
			}
			for _, ki := range keys {
				if ki.Modifiable != tc.modifiable || ki.Copyable != tc.copyable {
					t.Errorf("ListKeys %s: Modifiable %v, Copyable %v; want %v, %v", ki.Label, ki.Modifiable, ki.Copyable, tc.modifiable, tc.copyable)
				}
			}
		})
	}
}

// TestCreateKeyLockFallbackNSS: the NSS softoken refuses CKA_COPYABLE in a
// C_GenerateKey template (with CKR_GENERAL_ERROR): CreateKey makes the key without it,
// keeps CKA_MODIFIABLE false, and KeyInfo warns about CKA_COPYABLE only.
func TestCreateKeyLockFallbackNSS(t *testing.T) {
	tk := interop.StartNSS(t)
	cfg := Config{Module: tk.Module, TokenLabel: tk.TokenLabel, PINFile: tk.PINFile, KeyLabel: "kek-locks", InitArgs: tk.InitArgs}
	ki, err := CreateKey(context.Background(), cfg)
	if err != nil {
		t.Fatalf("CreateKey on NSS: %v", err)
	}
	if ki.Modifiable || !ki.Copyable {
		t.Errorf("NSS key: Modifiable %v, Copyable %v; want false, true (CKA_COPYABLE refused)", ki.Modifiable, ki.Copyable)
	}
	if w := ki.AttributeWarning(); !strings.Contains(w, "CKA_COPYABLE") || strings.Contains(w, "CKA_MODIFIABLE") {
		t.Errorf("AttributeWarning() = %q, want CKA_COPYABLE only", w)
	}
	roundTrip(t, openKEK(t, cfg), []byte("seed"), aad)
}
