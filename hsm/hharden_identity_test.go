package hsm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
	"google.golang.org/grpc/codes"

	"github.com/hwkms/hwkms/plugin"
	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/softhsm"
	"github.com/hwkms/hwkms/softhsm/softhsmtest"
)

// idRig is a rig (fault_test.go) that also keeps its SoftHSM fixture and token, so
// that a test can swap the token or the key under the running KEK.
type idRig struct {
	*rig
	fx  *softhsm.Fixture
	tok softhsmtest.TokenInfo
}

// newIDRig is newRig with a mechanism and an optional extra wrapper under chaos.
func newIDRig(t *testing.T, mech string, under func(p11) p11) *idRig {
	t.Helper()
	fx, toks := newTokens(t, 1)
	c := newChaos()
	seam(t, func(p p11) p11 {
		if under != nil {
			p = under(p)
		}
		c.p11 = p
		return c
	})
	cfg := cfgFor(fx, toks[0], "kek")
	cfg.Sessions = 2
	cfg.Mechanism = mech
	createKey(t, cfg)
	k := openKEK(t, cfg)
	ring, err := plugin.NewKeyring(k)
	if err != nil {
		t.Fatal(err)
	}
	svc := plugin.NewService(ring, plugin.Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	r := &rig{c: c, cfg: cfg, k: k, svc: svc, seed: bytes.Repeat([]byte{0x5a}, 32)}
	resp, err := svc.Encrypt(context.Background(), "setup", r.seed)
	if err != nil {
		t.Fatalf("Encrypt before the swap: %v", err)
	}
	r.ct = resp.Ciphertext
	t.Cleanup(c.clear)
	return &idRig{rig: r, fx: fx, tok: toks[0]}
}

// noKCV hides CKA_CHECK_VALUE, as a token that does not implement it: the same-key
// check must then rest on the probe body alone.
type noKCV struct{ p11 }

func (n noKCV) GetAttributeValue(sh pkcs11.SessionHandle, o pkcs11.ObjectHandle, a []*pkcs11.Attribute) ([]*pkcs11.Attribute, error) {
	for _, x := range a {
		if x.Type == pkcs11.CKA_CHECK_VALUE {
			return nil, pkcs11.Error(pkcs11.CKR_ATTRIBUTE_TYPE_INVALID)
		}
	}
	return n.p11.GetAttributeValue(sh, o, a)
}

// swapKey destroys the key (with mac, the HMAC key; with rsa, the RSA key pair)
// labelled cfg.KeyLabel with CKA_ID id and creates another with the same label and
// CKA_ID, on a session of its own that it closes again.
func swapKey(t *testing.T, cfg Config, id []byte, mac, rsa bool) {
	t.Helper()
	pin, err := cfg.readPIN()
	if err != nil {
		t.Fatal(err)
	}
	tok, err := acquireToken(context.Background(), cfg, pin)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := releaseToken(tok); err != nil {
			t.Error(err)
		}
	}()
	tok.mod.gate.RLock()
	defer tok.mod.gate.RUnlock()
	err = withSession(tok, true, func(tk *token, sh pkcs11.SessionHandle) error {
		if rsa {
			priv, pub, _, _, err := selectRSAKeys(tk.ctx, sh, tk.label, cfg.KeyLabel, id, false)
			if err != nil {
				return err
			}
			if err := destroyQuiet(tk, sh, priv, pub); err != nil {
				return err
			}
			return generateRSAPair(tk, sh, cfg.KeyLabel, id)
		}
		tmpl := keyTemplate(cfg.KeyLabel, id)
		if mac {
			tmpl = macKeyTemplate(pkcs11.CKK_GENERIC_SECRET, cfg.KeyLabel, id)
		}
		hs, err := findObjects(tk.ctx, sh, tmpl)
		if err != nil || len(hs) != 1 {
			return fmt.Errorf("finding the key to swap: %v, %d objects", err, len(hs))
		}
		if err := tk.ctx.DestroyObject(sh, hs[0]); err != nil {
			return err
		}
		_, err = generateKEKPart(tk, sh, cfg.KeyLabel, id, mac)
		return err
	})
	if err != nil {
		t.Fatalf("swapping the key: %v", err)
	}
}

// wantRefused checks that err refuses the operation as another key or token would be
// used: kek.ErrUnavailable with the given sentinel, never ErrInvalidCiphertext (the
// stored data is not at fault).
func wantRefused(t *testing.T, what string, err, sentinel error) {
	t.Helper()
	if !errors.Is(err, sentinel) || !errors.Is(err, kek.ErrUnavailable) || errors.Is(err, kek.ErrInvalidCiphertext) {
		t.Fatalf("%s = %v, want an error wrapping %v and ErrUnavailable, not ErrInvalidCiphertext", what, err, sentinel)
	}
}

// TestKeySwapped: the KEK's key is destroyed and another one is created with the same
// label and CKA_ID (same key_id) under the running KEK. Whether the stale handle or a
// re-initialisation makes the KEK find the key again, it is refused (ErrKeyChanged):
// nothing is wrapped under it, old data is reported Unavailable (not bad), and the
// health probe fails. Both the CKA_CHECK_VALUE comparison and, for a token without it,
// the probe body alone catch it; for aes-cbc-hmac a swapped HMAC key alone is caught.
func TestKeySwapped(t *testing.T) {
	for _, tc := range []struct {
		name  string
		mech  string
		under func(p11) p11
		mac   bool // swap the HMAC key instead of the AES key
		kcv   bool // the token gives CKA_CHECK_VALUE
		after string
	}{
		{name: "aes-gcm/check-value/stale-handle", kcv: true},
		{name: "aes-gcm/check-value/reinit", kcv: true, after: "reinit"},
		{name: "aes-gcm/probe-only/stale-handle", under: func(p p11) p11 { return noKCV{p} }},
		{name: "aes-gcm/probe-only/reinit", under: func(p p11) p11 { return noKCV{p} }, after: "reinit"},
		{name: "aes-cbc-hmac/hmac-key/probe-only", mech: MechanismAESCBCHMAC, mac: true, under: func(p p11) p11 { return noKCV{p} }},
		{name: "aes-cbc-hmac/aes-key/reinit", mech: MechanismAESCBCHMAC, kcv: true, after: "reinit"},
		{name: "rsa-oaep/key-pair/stale-handle", mech: MechanismRSAOAEP},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newIDRig(t, tc.mech, tc.under)
			if got := r.k.kcv != nil; got != tc.kcv {
				t.Fatalf("CKA_CHECK_VALUE read at Open: %v, want %v", got, tc.kcv)
			}
			ctx := context.Background()
			oldBody := roundTrip(t, r.k, []byte("seed"), aad)
			swapKey(t, r.cfg, r.k.ckaID, tc.mac, tc.mech == MechanismRSAOAEP)
			encrypts := r.c.count("EncryptInit")
			if tc.after == "reinit" {
				r.c.set(func(c *chaos) { c.once["EncryptInit"] = []error{pkcs11.Error(pkcs11.CKR_DEVICE_REMOVED)} })
			}
			_, err := r.k.Wrap(ctx, []byte("seed"), aad)
			wantRefused(t, "Wrap after the key was swapped", err, ErrKeyChanged)
			// The only C_EncryptInit allowed is the one that found the handle stale
			// (or hit the armed device error): none with the impostor key.
			if n := r.c.count("EncryptInit") - encrypts; n > 1 {
				t.Errorf("%d C_EncryptInit calls after the swap, want at most the 1 that found the old handle gone", n)
			}
			_, err = r.k.Unwrap(ctx, oldBody, aad)
			wantRefused(t, "Unwrap of an old body after the key was swapped", err, ErrKeyChanged)
			if code := r.call(t, time.Second); code != codes.Unavailable {
				t.Errorf("Encrypt/Decrypt through the plugin after the swap: %v, want Unavailable", code)
			}
			h := r.svc.ProbeNow(ctx)
			if h.OK || !errors.Is(h.Err, ErrKeyChanged) {
				t.Errorf("health probe after the swap = %+v, want a failure wrapping ErrKeyChanged", h)
			}
			t.Logf("refused: %v", err)
		})
	}
}

// TestTokenSwapped: the token under a running KEK is replaced by another one with the
// same label (and here even the same PINs): its directory is moved away and a new
// token initialised, so the module sees a new serial number after the next
// re-initialisation. hwkms refuses it (ErrTokenChanged): no C_Login is made on it (the
// PIN is never sent to it), requests get Unavailable, the health probe says why. When
// the original token comes back, the KEK recovers by itself.
func TestTokenSwapped(t *testing.T) {
	r := newIDRig(t, "", nil)
	dirs, err := os.ReadDir(r.fx.TokenDir)
	if err != nil {
		t.Fatal(err)
	}
	var orig string // SoftHSM2 keeps each token in a directory of its own
	for _, d := range dirs {
		data, err := os.ReadFile(filepath.Join(r.fx.TokenDir, d.Name(), "token.object"))
		if err == nil && bytes.Contains(data, []byte(r.tok.Label)) {
			orig = filepath.Join(r.fx.TokenDir, d.Name())
		}
	}
	if orig == "" {
		t.Fatalf("no directory of token %q in %s", r.tok.Label, r.fx.TokenDir)
	}
	before := map[string]bool{}
	for _, d := range dirs {
		before[d.Name()] = true
	}
	aside := filepath.Join(r.fx.Dir, "aside")
	if err := os.Rename(orig, aside); err != nil {
		t.Fatal(err)
	}
	serial, err := r.fx.InitToken(r.tok.Label, r.tok.SOPIN, r.tok.PIN)
	if err != nil {
		t.Fatal(err)
	}
	if serial == r.tok.Serial {
		t.Fatalf("the new token has the old serial %q", serial)
	}
	logins := r.c.count("Login")
	r.c.set(func(c *chaos) { c.once["DecryptInit"] = []error{pkcs11.Error(pkcs11.CKR_DEVICE_REMOVED)} })
	seen := r.during(t, 1500*time.Millisecond, 500*time.Millisecond, codes.Unavailable)
	if n := r.c.count("Login") - logins; n != 0 {
		t.Fatalf("%d C_Login calls on the substituted token, want 0", n)
	}
	h := r.svc.ProbeNow(context.Background())
	if h.OK || !errors.Is(h.Err, ErrTokenChanged) || !errors.Is(h.Err, kek.ErrUnavailable) {
		t.Fatalf("health probe with the substituted token = %+v, want a failure wrapping ErrTokenChanged", h)
	}
	_, err = r.k.Wrap(context.Background(), []byte("seed"), aad)
	wantRefused(t, "Wrap with the substituted token", err, ErrTokenChanged)
	// A config reload while the old keys still hold the token: refused as well, and
	// still no C_Login (the PIN is not sent to the substituted token).
	if k2, err := Open(context.Background(), r.cfg); err == nil {
		k2.Close()
		t.Fatal("Open (a reload) on the substituted token succeeded")
	} else {
		wantRefused(t, "Open (a reload) on the substituted token", err, ErrTokenChanged)
	}
	if n := r.c.count("Login") - logins; n != 0 {
		t.Fatalf("%d C_Login calls on the substituted token after a reload, want 0", n)
	}
	t.Logf("%v; refused: %v", seen, h.Err)

	// The original token comes back.
	entries, err := os.ReadDir(r.fx.TokenDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if before[e.Name()] {
			continue
		}
		if err := os.RemoveAll(filepath.Join(r.fx.TokenDir, e.Name())); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Rename(aside, orig); err != nil {
		t.Fatal(err)
	}
	r.untilOK(t)
	if n := r.c.count("Login") - logins; n != 1 {
		t.Errorf("%d C_Login calls in all, want 1 (on the original token once it is back)", n)
	}
}
