package hsm

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"sync"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/plugin/kek/kektest"
)

// cbcPadLimit is a p11 that decrypts CKM_AES_CBC_PAD as tpm2-pkcs11 1.9.0 does: a
// single C_Decrypt of more than 32 bytes of ciphertext fails CKR_GENERAL_ERROR
// whatever the output buffer (the real call is made, so the operation ends, and its
// output dropped). Everything else goes to the real module.
type cbcPadLimit struct {
	p11
	mu    sync.Mutex
	mech  map[pkcs11.SessionHandle]uint // the mechanism of the session's C_DecryptInit
	calls map[string]int                // "pad-refused", "pad", "cbc": DecryptOnce calls
}

func installCBCPadLimit(t *testing.T) *cbcPadLimit {
	t.Helper()
	l := &cbcPadLimit{mech: map[pkcs11.SessionHandle]uint{}, calls: map[string]int{}}
	seam(t, func(p p11) p11 { l.p11 = p; return l })
	return l
}

func (l *cbcPadLimit) DecryptInit(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error {
	l.mu.Lock()
	l.mech[sh] = m[0].Mechanism
	l.mu.Unlock()
	return l.p11.DecryptInit(sh, m, o)
}

func (l *cbcPadLimit) DecryptOnce(sh pkcs11.SessionHandle, in []byte, outLen int) ([]byte, error) {
	l.mu.Lock()
	mt := l.mech[sh]
	l.mu.Unlock()
	out, err := l.p11.DecryptOnce(sh, in, outLen)
	l.mu.Lock()
	defer l.mu.Unlock()
	switch {
	case mt == pkcs11.CKM_AES_CBC_PAD && len(in) > 32:
		l.calls["pad-refused"]++
		clear(out)
		return nil, pkcs11.Error(pkcs11.CKR_GENERAL_ERROR)
	case mt == pkcs11.CKM_AES_CBC_PAD:
		l.calls["pad"]++
	case mt == pkcs11.CKM_AES_CBC:
		l.calls["cbc"]++
	}
	return out, err
}

// CreateObject passes through, for the golden key import.
func (l *cbcPadLimit) CreateObject(sh pkcs11.SessionHandle, a []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	co, ok := l.p11.(interface {
		CreateObject(pkcs11.SessionHandle, []*pkcs11.Attribute) (pkcs11.ObjectHandle, error)
	})
	if !ok {
		return 0, pkcs11.Error(pkcs11.CKR_FUNCTION_NOT_SUPPORTED)
	}
	return co.CreateObject(sh, a)
}

func (l *cbcPadLimit) count(name string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.calls[name]
}

// TestCBCRawConformance: on SoftHSM2 with CKM_AES_CBC_PAD decryption limited as on
// tpm2-pkcs11, Open's round trip falls back to CKM_AES_CBC with the padding removed by
// hsm, and the KEK passes the kek.KEK conformance suite.
func TestCBCRawConformance(t *testing.T) {
	fx, toks := newTokens(t, 1)
	l := installCBCPadLimit(t)
	opener := func(label string) func(t *testing.T) kek.KEK {
		cfg := cfgFor(fx, toks[0], label)
		cfg.Mechanism = MechanismAESCBCHMAC
		createKey(t, cfg)
		return func(t *testing.T) kek.KEK {
			t.Helper()
			k, err := Open(context.Background(), cfg)
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			if k.Mechanism() != MechanismAESCBCHMAC || k.mech.cbc != cbcDecryptRaw {
				t.Fatalf("Open chose %s decrypting with %s, want %s with %s", k.Mechanism(), k.mech.cbc, MechanismAESCBCHMAC, cbcDecryptRaw)
			}
			return k
		}
	}
	kektest.Run(t, opener("kek"), kektest.WithOther(opener("other")))
	if l.count("pad-refused") == 0 || l.count("cbc") == 0 {
		t.Fatalf("the emulation saw %d refused CKM_AES_CBC_PAD and %d CKM_AES_CBC decryptions, want both > 0", l.count("pad-refused"), l.count("cbc"))
	}
}

// TestCBCPadStaysDefault: on the token as it is, the round trip keeps CKM_AES_CBC_PAD.
func TestCBCPadStaysDefault(t *testing.T) {
	fx, toks := newTokens(t, 1)
	cfg := cfgFor(fx, toks[0], "kek")
	cfg.Mechanism = MechanismAESCBCHMAC
	createKey(t, cfg)
	k := openKEK(t, cfg)
	if k.mech.cbc != cbcDecryptPad {
		t.Fatalf("SoftHSM2 KEK decrypts 0x03 with %s, want %s", k.mech.cbc, cbcDecryptPad)
	}
}

// TestCBCRawGoldenV3 reads the committed body 0x03 golden ciphertext under a KEK
// that decrypts with CKM_AES_CBC (the emulated tpm2-pkcs11 limit), and refuses, as
// kek.ErrInvalidCiphertext, bodies with a valid MAC and bad padding, made with the
// golden key values.
func TestCBCRawGoldenV3(t *testing.T) {
	ctx := context.Background()
	in := goldenBodyV3Inputs()
	g := readGoldenMech(t, goldenBodyV3File, in)
	fx, toks := newTokens(t, 1)
	l := installCBCPadLimit(t)
	cfg := cfgFor(fx, toks[0], in.KeyLabel)
	cfg.KeyCKAID = hex.EncodeToString(in.KeyCKAID)
	cfg.AllowExtractable = true
	cfg.Mechanism = MechanismAESCBCHMAC
	importCBCHMACKeys(t, cfg, in.KeyValue, in.MACKeyValue, in.KeyLabel, in.KeyCKAID)
	k := openKEK(t, cfg)
	if k.mech.cbc != cbcDecryptRaw {
		t.Fatalf("KEK decrypts 0x03 with %s, want %s", k.mech.cbc, cbcDecryptRaw)
	}
	before := l.count("cbc")
	checkGoldenMech(t, goldenService(t, k), k, g, 0x03, 17)
	if l.count("cbc") == before {
		t.Fatal("the golden body was not decrypted with CKM_AES_CBC")
	}

	aad := goldenFrameAAD(g.KeyID)
	// body makes a 0x03 body of 32 bytes of already padded plaintext under the golden keys.
	body := func(padded []byte) []byte {
		iv := bytes.Repeat([]byte{0x5a}, 16)
		blk, err := aes.NewCipher(in.KeyValue)
		if err != nil {
			t.Fatal(err)
		}
		ct := make([]byte, len(padded))
		cipher.NewCBCEncrypter(blk, iv).CryptBlocks(ct, padded)
		m := hmac.New(sha256.New, in.MACKeyValue)
		m.Write(cbcMACInput(iv, ct, aad))
		return append(append(append([]byte{mechAESCBCHMAC}, iv...), ct...), m.Sum(nil)...)
	}
	pt := bytes.Repeat([]byte{'p'}, 16)
	good := body(append(bytes.Clone(pt), bytes.Repeat([]byte{16}, 16)...))
	if got, err := k.Unwrap(ctx, good, aad); err != nil || !bytes.Equal(got, pt) {
		t.Fatalf("Unwrap of a well-padded body: %q, %v", got, err)
	}
	for _, tc := range []struct {
		name string
		last []byte // the last block
	}{
		{"zero", make([]byte, 16)},
		{"17", bytes.Repeat([]byte{17}, 16)},
		{"255", bytes.Repeat([]byte{255}, 16)},
		{"2 over 1", append(bytes.Repeat([]byte{'x'}, 14), 1, 2)},
		{"16 with one 15", append([]byte{15}, bytes.Repeat([]byte{16}, 15)...)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := body(append(bytes.Clone(pt), tc.last...))
			got, err := k.Unwrap(ctx, b, aad)
			if !errors.Is(err, kek.ErrInvalidCiphertext) || errors.Is(err, kek.ErrUnavailable) || got != nil {
				t.Errorf("Unwrap of a body with a valid MAC and bad padding: %d bytes, %v; want kek.ErrInvalidCiphertext", len(got), err)
			}
		})
	}
	if _, err := k.Unwrap(ctx, good, aad); err != nil {
		t.Fatalf("Unwrap after the bad bodies: %v", err)
	}
}

func TestUnpadPKCS7(t *testing.T) {
	blk := func(tail ...byte) []byte { return append(bytes.Repeat([]byte{'a'}, 16-len(tail)), tail...) }
	for _, tc := range []struct {
		name string
		in   []byte
		want int // plaintext length, -1: refused
	}{
		{"one", blk(1), 15},
		{"two", blk(2, 2), 14},
		{"full block", append(blk(), bytes.Repeat([]byte{16}, 16)...), 16},
		{"zero", blk(0), -1},
		{"17", append(blk(), bytes.Repeat([]byte{17}, 16)...), -1},
		{"mismatch", blk(1, 2), -1},
		{"empty", nil, -1},
		{"not whole blocks", []byte{1}, -1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := bytes.Clone(tc.in)
			got, err := unpadPKCS7(in)
			if tc.want < 0 {
				if !errors.Is(err, kek.ErrInvalidCiphertext) || got != nil || !allZero(in) {
					t.Fatalf("unpadPKCS7 = %q, %v; want kek.ErrInvalidCiphertext and the input cleared", got, err)
				}
				return
			}
			if err != nil || !bytes.Equal(got, tc.in[:tc.want]) {
				t.Fatalf("unpadPKCS7 = %q, %v; want %q", got, err, tc.in[:tc.want])
			}
		})
	}
}
