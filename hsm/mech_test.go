package hsm

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/hwkms/hwkms/plugin/kek"
)

var mechAAD = []byte("hwkms\x00\x01\x01p11:mechanism-test")

// mechKEK makes a fresh token with mechTok in the seam, creates a key for mechanism
// and opens it.
func mechKEK(t *testing.T, mechanism string, setup func(m *mechTok)) (*mechTok, Config, *KEK) {
	t.Helper()
	fx, toks := newTokens(t, 1)
	m := installMechTok(t)
	if setup != nil {
		m.set(setup)
	}
	cfg := cfgFor(fx, toks[0], "kek")
	cfg.Mechanism = mechanism
	createKey(t, cfg)
	return m, cfg, openKEK(t, cfg)
}

// checkBody checks a body's version byte and that tampering with any byte, a wrong
// aad, a truncated or an extended body all give kek.ErrInvalidCiphertext.
func checkBody(t *testing.T, k *KEK, body []byte, version byte) {
	t.Helper()
	ctx := context.Background()
	if body[0] != version {
		t.Fatalf("body version 0x%02x, want 0x%02x", body[0], version)
	}
	for i := range body {
		bad := bytes.Clone(body)
		bad[i] ^= 0x01
		if _, err := k.Unwrap(ctx, bad, mechAAD); !errors.Is(err, kek.ErrInvalidCiphertext) {
			t.Fatalf("Unwrap with byte %d of %d flipped: %v, want ErrInvalidCiphertext", i, len(body), err)
		}
	}
	for _, bad := range [][]byte{body[:len(body)-1], append(bytes.Clone(body), 0), body[:1]} {
		if _, err := k.Unwrap(ctx, bad, mechAAD); !errors.Is(err, kek.ErrInvalidCiphertext) {
			t.Fatalf("Unwrap of a %d-byte body (valid: %d): %v, want ErrInvalidCiphertext", len(bad), len(body), err)
		}
	}
	if _, err := k.Unwrap(ctx, body, append(bytes.Clone(mechAAD), 'x')); !errors.Is(err, kek.ErrInvalidCiphertext) {
		t.Fatalf("Unwrap with a wrong aad: %v, want ErrInvalidCiphertext", err)
	}
}

func TestMechanismRoundTripOnSoftHSM(t *testing.T) {
	for _, tc := range []struct {
		mechanism string
		want      string
		version   byte
	}{
		{"", MechanismAESGCM, 0x01}, // auto picks aes-gcm on SoftHSM2
		{MechanismAuto, MechanismAESGCM, 0x01},
		{MechanismAESGCM, MechanismAESGCM, 0x01},
		{MechanismAESCBCHMAC, MechanismAESCBCHMAC, 0x03},
		{MechanismRSAOAEP, MechanismRSAOAEP, 0x04},
	} {
		t.Run(tc.want+"/"+tc.mechanism, func(t *testing.T) {
			_, _, k := mechKEK(t, tc.mechanism, nil)
			if got := k.Mechanism(); got != tc.want {
				t.Fatalf("Mechanism() = %q, want %q", got, tc.want)
			}
			for _, n := range []int{1, 15, 16, 17, 32, kek.MaxPlaintext} {
				pt := make([]byte, n)
				rand.Read(pt)
				body := roundTrip(t, k, pt, mechAAD)
				if n == 32 {
					checkBody(t, k, body, tc.version)
				}
			}
		})
	}
}

// A version 0x01 body made by raw PKCS#11 calls (not by Wrap) on the key still
// unwraps, under aes-gcm and under aes-cbc-hmac (the same AES key).
func TestMechanismOldBodiesStillDecrypt(t *testing.T) {
	for _, mech := range []string{MechanismAESGCM, MechanismAESCBCHMAC} {
		t.Run(mech, func(t *testing.T) {
			_, cfg, k := mechKEK(t, mech, nil)
			c, sh := rawSession(t, cfg)
			hs, err := findObjects(c, sh, keyTemplate("kek", nil))
			if err != nil || len(hs) != 1 {
				t.Fatalf("find key: %v, %d handles", err, len(hs))
			}
			iv := make([]byte, 12)
			rand.Read(iv)
			pt := bytes.Repeat([]byte{0xa5}, 32)
			p := pkcs11.NewGCMParams(iv, mechAAD, 128)
			defer p.Free()
			if err := c.EncryptInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, p)}, hs[0]); err != nil {
				t.Fatal(err)
			}
			ct, err := c.Encrypt(sh, pt)
			if err != nil {
				t.Fatal(err)
			}
			body := append(append([]byte{0x01}, iv...), ct...)
			got, err := k.Unwrap(context.Background(), body, mechAAD)
			if err != nil || !bytes.Equal(got, pt) {
				t.Fatalf("Unwrap of a raw 0x01 body = %x, %v; want %x", got, err, pt)
			}
		})
	}
}

// The MAC of a 0x03 body is checked before anything is decrypted.
func TestMechanismCBCHMACChecksMACBeforeDecrypt(t *testing.T) {
	m, _, k := mechKEK(t, MechanismAESCBCHMAC, nil)
	body := roundTrip(t, k, bytes.Repeat([]byte{1}, 32), mechAAD)
	dec := m.count("DecryptInit")
	bad := bytes.Clone(body)
	bad[20] ^= 0x80 // in the ciphertext
	if _, err := k.Unwrap(context.Background(), bad, mechAAD); !errors.Is(err, kek.ErrInvalidCiphertext) {
		t.Fatalf("Unwrap of a tampered 0x03 body: %v", err)
	}
	if n := m.count("DecryptInit") - dec; n != 0 {
		t.Fatalf("a body with a bad MAC reached C_DecryptInit %d times", n)
	}
}

// A failing token during the MAC check is a device failure (recovered, or
// kek.ErrUnavailable), never kek.ErrInvalidCiphertext.
func TestMechanismCBCHMACDeviceErrorIsNotBadData(t *testing.T) {
	m, _, k := mechKEK(t, MechanismAESCBCHMAC, nil)
	ctx := context.Background()
	pt := bytes.Repeat([]byte{2}, 32)
	body := roundTrip(t, k, pt, mechAAD)

	m.set(func(m *mechTok) { m.signFault = []error{pkcs11.Error(pkcs11.CKR_DEVICE_ERROR)} })
	ok0, _ := k.Reinits()
	got, err := k.Unwrap(ctx, body, mechAAD)
	if err != nil || !bytes.Equal(got, pt) {
		t.Fatalf("Unwrap after one CKR_DEVICE_ERROR from C_Sign = %x, %v; want recovery", got, err)
	}
	if ok1, _ := k.Reinits(); ok1 != ok0+1 {
		t.Fatalf("re-initialisations: %d, want %d", ok1, ok0+1)
	}

	m.set(func(m *mechTok) {
		m.signFault = []error{pkcs11.Error(pkcs11.CKR_DEVICE_ERROR), pkcs11.Error(pkcs11.CKR_DEVICE_ERROR)}
	})
	_, err = k.Unwrap(ctx, body, mechAAD)
	if !errors.Is(err, kek.ErrUnavailable) || errors.Is(err, kek.ErrInvalidCiphertext) {
		t.Fatalf("Unwrap while C_Sign fails twice: %v, want ErrUnavailable and not ErrInvalidCiphertext", err)
	}
	var pe pkcs11.Error
	if !errors.As(err, &pe) || pe != pkcs11.CKR_DEVICE_ERROR {
		t.Fatalf("error %v does not carry the pkcs11.Error", err)
	}
}

// Token-generated IVs (body version 0x02) under emulations of the tokens that make
// them, through the p11 seam.
func TestMechanismTokenIVEmulations(t *testing.T) {
	for _, tc := range []struct {
		name  string
		emu   ivEmulation
		ivLen int
	}{
		{"EmulatedCloudHSM", ivAsCloudHSM, 12},
		{"EmulatedLunaBefore7.9.3", ivAsLunaBefore793, 16},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, cfg, k := mechKEK(t, MechanismAESGCMTokenIV, func(m *mechTok) { m.iv = tc.emu })
			if got := k.Mechanism(); got != MechanismAESGCMTokenIV {
				t.Fatalf("Mechanism() = %q", got)
			}
			pt := bytes.Repeat([]byte{3}, 32)
			body := roundTrip(t, k, pt, mechAAD)
			if mt := binary.BigEndian.Uint32(body[1:5]); mt != pkcs11.CKM_AES_GCM || int(body[5]) != tc.ivLen {
				t.Fatalf("0x02 body names mechanism 0x%x and a %d-byte IV, want CKM_AES_GCM and %d", mt, body[5], tc.ivLen)
			}
			if len(body) != tokenIVHeader+tc.ivLen+len(pt)+gcmTagSize {
				t.Fatalf("0x02 body is %d bytes", len(body))
			}
			body2 := roundTrip(t, k, pt, mechAAD)
			if bytes.Equal(body[6:6+tc.ivLen], body2[6:6+tc.ivLen]) {
				t.Fatal("two wraps got the same token IV")
			}
			checkBody(t, k, body, 0x02)

			// A token that stops generating IVs (leaves the buffer zero) is refused.
			m.set(func(m *mechTok) { m.iv = ivAsSoftHSM })
			if b, err := k.Wrap(context.Background(), pt, mechAAD); !errors.Is(err, ErrIVNotKept) {
				t.Fatalf("Wrap on a token that left the IV zero = %x, %v; want ErrIVNotKept", b, err)
			}
			// Stored 0x02 bodies stay readable on the plain token, by an aes-gcm KEK too.
			cfg.Mechanism = MechanismAESGCM
			k2 := openKEK(t, cfg)
			if got, err := k2.Unwrap(context.Background(), body, mechAAD); err != nil || !bytes.Equal(got, pt) {
				t.Fatalf("aes-gcm KEK Unwrap of a 0x02 body = %x, %v", got, err)
			}
		})
	}
}

// Under the CloudHSM emulation aes-gcm (hwkms's IV) is refused by its round trip,
// since the token replaces the IV, and auto picks aes-gcm-token-iv.
func TestMechanismAutoPicksTokenIVOnEmulatedCloudHSM(t *testing.T) {
	_, _, k := mechKEK(t, MechanismAuto, func(m *mechTok) { m.iv = ivAsCloudHSM })
	if got := k.Mechanism(); got != MechanismAESGCMTokenIV {
		t.Fatalf("Mechanism() = %q, want %q", got, MechanismAESGCMTokenIV)
	}
	roundTrip(t, k, []byte("seed"), mechAAD)
}

// SoftHSM2 leaves a zeroed GCM IV buffer zero and encrypts with it: aes-gcm-token-iv
// must be refused there, with one clear error, and no key left behind.
func TestMechanismTokenIVRefusedWhenTokenLeavesIVZero(t *testing.T) {
	fx, toks := newTokens(t, 1)
	cfg := cfgFor(fx, toks[0], "kek")
	cfg.Mechanism = MechanismAESGCMTokenIV
	_, err := CreateKey(context.Background(), cfg)
	if !errors.Is(err, ErrNoMechanism) || !errors.Is(err, ErrIVNotKept) && !strings.Contains(err.Error(), "zero") {
		t.Fatalf("CreateKey(aes-gcm-token-iv) on SoftHSM2: %v, want ErrNoMechanism about the zero IV", err)
	}
	t.Log(err)
	cfg.Mechanism = ""
	keys, err := ListKeys(context.Background(), cfg)
	if err != nil || len(keys) != 0 {
		t.Fatalf("after the refused CreateKey ListKeys = %v, %v; want none", keys, err)
	}
}

// Tokens that lack mechanisms (emulated: C_GetMechanismInfo answers
// CKR_MECHANISM_INVALID) get one clear error, or the fallback auto allows.
func TestMechanismMissingOnToken(t *testing.T) {
	for _, tc := range []struct {
		name      string
		mechanism string
		missing   []uint
		want      []string // substrings of the error; nil: success with wantMech
		wantMech  string
	}{
		{"named aes-gcm without GCM", MechanismAESGCM, []uint{pkcs11.CKM_AES_GCM}, []string{"CKM_AES_GCM missing"}, ""},
		{"named aes-cbc-hmac without HMAC", MechanismAESCBCHMAC, []uint{pkcs11.CKM_SHA256_HMAC},
			[]string{"CKM_SHA256_HMAC missing", "CKM_AES_CBC_PAD present"}, ""},
		{"auto without GCM or HMAC", MechanismAuto, []uint{pkcs11.CKM_AES_GCM, pkcs11.CKM_SHA256_HMAC},
			[]string{"aes-gcm: CKM_AES_GCM missing", "aes-gcm-token-iv: CKM_AES_GCM missing", "aes-cbc-hmac: ", "CKM_SHA256_HMAC missing, CKM_AES_CBC_PAD present"}, ""},
		{"auto without GCM", MechanismAuto, []uint{pkcs11.CKM_AES_GCM}, nil, MechanismAESCBCHMAC},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fx, toks := newTokens(t, 1)
			m := installMechTok(t)
			m.set(func(m *mechTok) {
				for _, mt := range tc.missing {
					m.missing[mt] = true
				}
			})
			cfg := cfgFor(fx, toks[0], "kek")
			cfg.Mechanism = tc.mechanism
			ki, err := CreateKey(context.Background(), cfg)
			if tc.want != nil {
				if !errors.Is(err, ErrNoMechanism) {
					t.Fatalf("CreateKey: %v, want ErrNoMechanism", err)
				}
				for _, w := range tc.want {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("error %q does not say %q", err, w)
					}
				}
				cfg.Mechanism = ""
				if keys, err := ListKeys(context.Background(), cfg); err != nil || len(keys) != 0 {
					t.Fatalf("after the refused CreateKey ListKeys = %v, %v; want none", keys, err)
				}
				return
			}
			if err != nil {
				t.Fatalf("CreateKey: %v", err)
			}
			if ki.Mechanism != tc.wantMech {
				t.Fatalf("CreateKey KeyInfo.Mechanism = %q, want %q", ki.Mechanism, tc.wantMech)
			}
			k := openKEK(t, cfg)
			if k.Mechanism() != tc.wantMech {
				t.Fatalf("Mechanism() = %q, want %q", k.Mechanism(), tc.wantMech)
			}
			body := roundTrip(t, k, []byte("seed"), mechAAD)
			if body[0] != 0x03 {
				t.Fatalf("body version 0x%02x", body[0])
			}
			keys, err := ListKeys(context.Background(), cfg)
			if err != nil || len(keys) != 1 || keys[0] != ki {
				t.Fatalf("ListKeys = %+v, %v; want [%+v]", keys, err, ki)
			}
			if err := k.Close(); err != nil {
				t.Fatal(err)
			}
			if err := DestroyKey(context.Background(), cfg); err != nil {
				t.Fatal(err)
			}
			c, sh := rawSession(t, cfg)
			left, err := findObjects(c, sh, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, "kek")})
			if err != nil || len(left) != 0 {
				t.Fatalf("after DestroyKey %d objects labelled kek remain (%v): the HMAC key must go too", len(left), err)
			}
		})
	}
}

// A 0x03 body needs the HMAC key: an AES-only KEK refuses it as bad data; a 0x02
// body naming a mechanism other than CKM_AES_GCM or the configured one is refused
// before the token sees it.
func TestMechanismBodiesTheKeyCannotRead(t *testing.T) {
	m, _, k := mechKEK(t, MechanismAESGCM, nil)
	ctx := context.Background()
	cbc := append([]byte{0x03}, make([]byte, cbcIVSize+cbcBlock+macSize)...)
	if _, err := k.Unwrap(ctx, cbc, mechAAD); !errors.Is(err, kek.ErrInvalidCiphertext) {
		t.Fatalf("aes-gcm KEK Unwrap of a 0x03 body: %v", err)
	}
	dec := m.count("DecryptInit")
	iv := bytes.Repeat([]byte{9}, 12)
	for _, mt := range []uint32{pkcs11.CKM_AES_CBC_PAD, pkcs11.CKM_AES_ECB, pkcs11.CKM_VENDOR_DEFINED | 1} {
		body := binary.BigEndian.AppendUint32([]byte{0x02}, mt)
		body = append(append(append(body, 12), iv...), make([]byte, 32+gcmTagSize)...)
		if _, err := k.Unwrap(ctx, body, mechAAD); !errors.Is(err, kek.ErrInvalidCiphertext) {
			t.Fatalf("Unwrap of a 0x02 body naming mechanism 0x%x: %v", mt, err)
		}
	}
	if n := m.count("DecryptInit") - dec; n != 0 {
		t.Fatalf("bodies naming a foreign mechanism reached C_DecryptInit %d times", n)
	}
}

func TestMechanismConfigValidate(t *testing.T) {
	base := Config{Module: "/m.so", TokenLabel: "t", PINEnv: "P", KeyLabel: "k"}
	for _, tc := range []struct {
		mech   string
		vendor uint
		want   string // "" valid
	}{
		{"", 0, ""},
		{MechanismAuto, 0, ""},
		{MechanismAESGCM, 0, ""},
		{MechanismAESGCMTokenIV, 0, ""},
		{MechanismAESGCMTokenIV, ckmCloudKMSAESGCM, ""},
		{MechanismAESCBCHMAC, 0, ""},
		{"aes", 0, "mechanism: must be one of"},
		{MechanismAESGCMTokenIV, 0x1087, "gcmMechanism: must be a vendor-defined"},
		{MechanismAESGCM, pkcs11.CKM_VENDOR_DEFINED | 1, "gcmMechanism: applies only"},
	} {
		c := base
		c.Mechanism, c.GCMMechanism = tc.mech, tc.vendor
		err := c.Validate("")
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("Validate(mechanism %q, gcmMechanism 0x%x) = %v, want %q", tc.mech, tc.vendor, err, tc.want)
		}
	}
}

// rsa-oaep on SoftHSM2 2.6.1, which has OAEP with SHA-1 only: the body records
// SHA-1, an AES KEK refuses 0x04 bodies and an RSA KEK refuses AES bodies as bad
// data, auto never picks it, and ListKeys and DestroyKey handle the key pair.
func TestMechanismRSAOAEP(t *testing.T) {
	m, cfg, k := mechKEK(t, MechanismRSAOAEP, nil)
	ctx := context.Background()
	pt := bytes.Repeat([]byte{4}, 32)
	body := roundTrip(t, k, pt, mechAAD)
	if body[1] != oaepSHA1 || len(body) != rsaHeader+rsaBits/8 {
		t.Fatalf("0x04 body: hash 0x%02x, %d bytes; want SHA-1 (SoftHSM2 has no SHA-256 OAEP) and %d", body[1], len(body), rsaHeader+rsaBits/8)
	}
	gcm := append([]byte{0x01}, make([]byte, 12+32+16)...)
	if _, err := k.Unwrap(ctx, gcm, mechAAD); !errors.Is(err, kek.ErrInvalidCiphertext) {
		t.Fatalf("RSA KEK Unwrap of a 0x01 body: %v", err)
	}
	keys, err := ListKeys(ctx, cfg)
	if err != nil || len(keys) != 1 || keys[0].Mechanism != MechanismRSAOAEP || keys[0].KeyID != k.ID() || !keys[0].Safe() {
		t.Fatalf("ListKeys = %+v, %v", keys, err)
	}

	aesCfg := cfg
	aesCfg.KeyLabel, aesCfg.Mechanism = "aes", MechanismAuto
	createKey(t, aesCfg)
	ka := openKEK(t, aesCfg)
	if _, err := ka.Unwrap(ctx, body, mechAAD); !errors.Is(err, kek.ErrInvalidCiphertext) {
		t.Fatalf("AES KEK Unwrap of a 0x04 body: %v", err)
	}
	// auto on a token without AES names rsa-oaep as available but not chosen.
	m.set(func(m *mechTok) { m.missing[pkcs11.CKM_AES_GCM], m.missing[pkcs11.CKM_AES_CBC_PAD] = true, true })
	auto := cfg
	auto.KeyLabel, auto.Mechanism = "auto", ""
	if _, err := CreateKey(ctx, auto); !errors.Is(err, ErrNoMechanism) || !strings.Contains(err.Error(), "rsa-oaep: CKM_RSA_PKCS_OAEP available, but auto never chooses it") {
		t.Fatalf("CreateKey(auto) on a token without AES mechanisms: %v", err)
	}
	m.set(func(m *mechTok) { clear(m.missing) })

	if err := k.Close(); err != nil {
		t.Fatal(err)
	}
	if err := DestroyKey(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	c, sh := rawSession(t, cfg)
	left, err := findObjects(c, sh, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, "kek")})
	if err != nil || len(left) != 0 {
		t.Fatalf("after DestroyKey %d objects labelled kek remain (%v)", len(left), err)
	}
}

// Emulated Cloud KMS: no CKM_AES_GCM, only its vendor mechanism
// CKM_CLOUDKMS_AES_GCM (0x8001e101), which writes its IV back. mechanism
// aes-gcm-token-iv with gcmMechanism uses it; the body records the number; auto
// (without gcmMechanism) finds no GCM.
func TestMechanismTokenIVEmulatedCloudKMSVendorMechanism(t *testing.T) {
	setup := func(m *mechTok) {
		m.iv, m.vendorGCM = ivAsCloudHSM, ckmCloudKMSAESGCM
		m.missing[pkcs11.CKM_AES_GCM] = true
	}
	fx, toks := newTokens(t, 1)
	m := installMechTok(t)
	m.set(setup)
	cfg := cfgFor(fx, toks[0], "kek")
	cfg.Mechanism, cfg.GCMMechanism = MechanismAESGCMTokenIV, ckmCloudKMSAESGCM
	createKey(t, cfg)
	k := openKEK(t, cfg)
	pt := bytes.Repeat([]byte{5}, 32)
	body := roundTrip(t, k, pt, mechAAD)
	if mt := binary.BigEndian.Uint32(body[1:5]); mt != ckmCloudKMSAESGCM || body[5] != 12 {
		t.Fatalf("0x02 body names mechanism 0x%08x with a %d-byte IV, want 0x%08x and 12", mt, body[5], ckmCloudKMSAESGCM)
	}
	checkBody(t, k, body, 0x02)
	// A KEK without gcmMechanism refuses the vendor body before the token sees it.
	plain := cfg
	plain.Mechanism, plain.GCMMechanism = MechanismAESCBCHMAC, 0
	plain.KeyLabel = "other"
	createKey(t, plain)
	k2 := openKEK(t, plain)
	dec := m.count("DecryptInit")
	if _, err := k2.Unwrap(context.Background(), body, mechAAD); !errors.Is(err, kek.ErrInvalidCiphertext) {
		t.Fatalf("KEK without gcmMechanism Unwrap of a vendor 0x02 body: %v", err)
	}
	if n := m.count("DecryptInit") - dec; n != 0 {
		t.Fatalf("a body naming an unconfigured mechanism reached C_DecryptInit %d times", n)
	}
	auto := cfg
	auto.Mechanism, auto.GCMMechanism, auto.KeyLabel = MechanismAuto, 0, "auto"
	ki := createKey(t, auto)
	if ki.Mechanism != MechanismAESCBCHMAC {
		t.Fatalf("auto without gcmMechanism on Cloud KMS chose %q, want %q (GCM only through the vendor mechanism)", ki.Mechanism, MechanismAESCBCHMAC)
	}
}

// Open (not only CreateKey) with a named mechanism the token lacks gives one clear
// error naming what is missing.
func TestMechanismOpenNamedMissing(t *testing.T) {
	fx, toks := newTokens(t, 1)
	m := installMechTok(t)
	cfg := cfgFor(fx, toks[0], "kek")
	createKey(t, cfg)
	m.set(func(m *mechTok) { m.missing[pkcs11.CKM_AES_GCM] = true })
	for _, mech := range []string{MechanismAESGCM, MechanismAESGCMTokenIV} {
		cfg.Mechanism = mech
		_, err := Open(context.Background(), cfg)
		if !errors.Is(err, ErrNoMechanism) || !strings.Contains(err.Error(), mech+": CKM_AES_GCM missing") {
			t.Fatalf("Open(%s) on a token without CKM_AES_GCM: %v", mech, err)
		}
	}
	cfg.Mechanism = MechanismAESCBCHMAC
	if _, err := Open(context.Background(), cfg); !errors.Is(err, ErrNoMechanism) || !strings.Contains(err.Error(), "no HMAC key") {
		t.Fatalf("Open(aes-cbc-hmac) of a key without an HMAC key: %v", err)
	}
}

func TestMechanismSplitTokenIV(t *testing.T) {
	iv12 := bytes.Repeat([]byte{7}, 12)
	iv16 := bytes.Repeat([]byte{8}, 16)
	ct := bytes.Repeat([]byte{9}, 32+gcmTagSize)
	for _, tc := range []struct {
		name    string
		written []byte
		out     []byte
		wantIV  []byte // nil: refused with ErrIVNotKept
	}{
		{"written back (CloudHSM)", iv12, ct, iv12},
		{"appended 16 (Luna before 7.9.3)", make([]byte, 12), append(bytes.Clone(ct), iv16...), iv16},
		{"appended 16, buffer not marshalled", nil, append(bytes.Clone(ct), iv16...), iv16},
		{"appended 12", make([]byte, 12), append(bytes.Clone(ct), iv12...), iv12},
		{"buffer left zero, nothing appended (SoftHSM2)", make([]byte, 12), ct, nil},
		{"appended all-zero IV", make([]byte, 12), append(bytes.Clone(ct), make([]byte, 16)...), nil},
		{"written back and appended", iv12, append(bytes.Clone(ct), iv16...), nil},
		{"output too short", iv12, ct[:20], nil},
		{"output 5 bytes long", make([]byte, 12), append(bytes.Clone(ct), 1, 2, 3, 4, 5), nil},
	} {
		iv, gotCT, err := splitTokenIV(tc.written, tc.out, 32)
		if tc.wantIV == nil {
			if !errors.Is(err, ErrIVNotKept) {
				t.Errorf("%s: splitTokenIV = %x, %v; want ErrIVNotKept", tc.name, iv, err)
			}
			continue
		}
		if err != nil || !bytes.Equal(iv, tc.wantIV) || !bytes.Equal(gotCT, ct) {
			t.Errorf("%s: splitTokenIV = %x, %d bytes, %v; want IV %x", tc.name, iv, len(gotCT), err, tc.wantIV)
		}
	}
}

// Emulated Luna 7.9.3+ in FIPS mode refuses a caller's 12-byte IV buffer, so neither
// GCM mechanism works through miekg/pkcs11 v1.1.2: auto falls back, at CreateKey, to
// aes-cbc-hmac (the token has CKM_AES_CBC_PAD and CKM_SHA256_HMAC), and a named
// aes-gcm-token-iv fails with one clear error.
func TestMechanismEmulatedLuna793FIPSFallsBackToCBCHMAC(t *testing.T) {
	fx, toks := newTokens(t, 1)
	m := installMechTok(t)
	m.set(func(m *mechTok) { m.iv = ivAsLuna793FIPS })
	cfg := cfgFor(fx, toks[0], "kek")
	ki := createKey(t, cfg)
	if ki.Mechanism != MechanismAESCBCHMAC {
		t.Fatalf("CreateKey(auto) chose %q, want %q", ki.Mechanism, MechanismAESCBCHMAC)
	}
	k := openKEK(t, cfg)
	if k.Mechanism() != MechanismAESCBCHMAC {
		t.Fatalf("Mechanism() = %q", k.Mechanism())
	}
	roundTrip(t, k, []byte("seed"), mechAAD)
	cfg.Mechanism = MechanismAESGCMTokenIV
	_, err := Open(context.Background(), cfg)
	if !errors.Is(err, ErrNoMechanism) || !strings.Contains(err.Error(), "CKR_MECHANISM_PARAM_INVALID") {
		t.Fatalf("Open(aes-gcm-token-iv) on emulated Luna 7.9.3 FIPS: %v", err)
	}
}
