package hsm

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/miekg/pkcs11"
)

var aad = []byte("k8s:enc:kms:v2 frame v1 key_id=p11:test")

// TestBodyLayout checks the PKCS#11 body version 1 of doc.go: 1+12+n+16 bytes,
// mechanism byte 0x01, and a fresh IV in every body. Round trips, limits, tampering
// and the other generic properties are in TestConformance.
func TestBodyLayout(t *testing.T) {
	fx, toks := newTokens(t, 1)
	cfg := cfgFor(fx, toks[0], "kek")
	createKey(t, cfg)
	k := openKEK(t, cfg)
	ctx := context.Background()

	for _, n := range []int{1, 32, kek.MaxPlaintext} {
		t.Run(fmt.Sprintf("size=%d", n), func(t *testing.T) {
			pt := bytes.Repeat([]byte{0xA5}, n)
			body := roundTrip(t, k, pt, aad)
			if want := 1 + 12 + n + 16; len(body) != want {
				t.Errorf("len(body) = %d, want %d", len(body), want)
			}
			if body[0] != 0x01 {
				t.Errorf("mech byte = %#x, want 0x01", body[0])
			}
		})
	}
	t.Run("fresh IV", func(t *testing.T) {
		pt := []byte("0123456789abcdef0123456789abcdef")
		a, err := k.Wrap(ctx, pt, aad)
		if err != nil {
			t.Fatal(err)
		}
		b, err := k.Wrap(ctx, pt, aad)
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Equal(a[1:13], b[1:13]) {
			t.Fatal("two wraps reused an IV")
		}
	})
}

func TestCreatedKeyAttributes(t *testing.T) {
	fx, toks := newTokens(t, 1)
	cfg := cfgFor(fx, toks[0], "kek")
	ki := createKey(t, cfg)

	id, err := hex.DecodeString(ki.CKAID)
	if err != nil || len(id) != 16 {
		t.Fatalf("CKAID = %q: want 16 random bytes in hex", ki.CKAID)
	}
	if want := KeyID("kek", id); ki.KeyID != want {
		t.Errorf("KeyID = %q, want %q", ki.KeyID, want)
	}
	if !ki.Sensitive || ki.Extractable || !ki.NeverExtractable || !ki.Safe() || ki.Label != "kek" {
		t.Errorf("CreateKey info = %+v, want a safe key", ki)
	}

	c, sh := rawSession(t, cfg)
	hs, err := findObjects(c, sh, keyTemplate("kek", id))
	if err != nil || len(hs) != 1 {
		t.Fatalf("find created key: %v, %d handles", err, len(hs))
	}
	_, err = c.GetAttributeValue(sh, hs[0], []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)})
	if !isRV(err, pkcs11.CKR_ATTRIBUTE_SENSITIVE) {
		t.Errorf("reading CKA_VALUE: err = %v, want CKR_ATTRIBUTE_SENSITIVE", err)
	}
	want := map[uint]bool{
		pkcs11.CKA_TOKEN: true, pkcs11.CKA_PRIVATE: true, pkcs11.CKA_SENSITIVE: true,
		pkcs11.CKA_EXTRACTABLE: false, pkcs11.CKA_NEVER_EXTRACTABLE: true,
		pkcs11.CKA_ENCRYPT: true, pkcs11.CKA_DECRYPT: true, pkcs11.CKA_WRAP: false, pkcs11.CKA_UNWRAP: false,
		pkcs11.CKA_LOCAL: true,
	}
	var tmpl []*pkcs11.Attribute
	for a := range want {
		tmpl = append(tmpl, pkcs11.NewAttribute(a, nil))
	}
	tmpl = append(tmpl, pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, nil))
	attrs, err := c.GetAttributeValue(sh, hs[0], tmpl)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range attrs {
		if a.Type == pkcs11.CKA_VALUE_LEN {
			if !bytes.Equal(a.Value[:1], []byte{32}) {
				t.Errorf("CKA_VALUE_LEN = %x, want 32", a.Value)
			}
			continue
		}
		if got := len(a.Value) == 1 && a.Value[0] != 0; got != want[a.Type] {
			t.Errorf("attribute %#x = %v, want %v", a.Type, got, want[a.Type])
		}
	}

	keys, err := ListKeys(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 1 || keys[0] != ki {
		t.Errorf("ListKeys = %+v, want [%+v]", keys, ki)
	}

	_, err = CreateKey(context.Background(), cfg)
	if !errors.Is(err, kek.ErrKeyExists) {
		t.Errorf("second CreateKey with the same label: %v, want kek.ErrKeyExists", err)
	}
	cfg.KeyCKAID = "00"
	if _, err := CreateKey(context.Background(), cfg); err == nil || !strings.Contains(err.Error(), "keyCKAID") {
		t.Errorf("CreateKey with keyCKAID: %v, want a refusal naming keyCKAID", err)
	}
}

// rawKey creates an AES key with the raw module, with the given overrides of a safe
// template, and returns its CKA_ID.
func rawKey(t *testing.T, cfg Config, label string, overrides ...*pkcs11.Attribute) []byte {
	t.Helper()
	c, sh := rawSession(t, cfg)
	id := []byte(label + "-id")
	attrs := map[uint]*pkcs11.Attribute{}
	for _, a := range []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_ID, id),
	} {
		attrs[a.Type] = a
	}
	for _, a := range overrides {
		attrs[a.Type] = a
	}
	var tmpl []*pkcs11.Attribute
	for _, a := range attrs {
		tmpl = append(tmpl, a)
	}
	if _, err := c.GenerateKey(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}, tmpl); err != nil {
		t.Fatalf("GenerateKey: %v", err)
	}
	if a, ok := attrs[pkcs11.CKA_ID]; ok {
		return a.Value
	}
	return nil
}

func TestUnsafeKeyRefused(t *testing.T) {
	fx, toks := newTokens(t, 1)
	base := cfgFor(fx, toks[0], "")
	tests := []struct {
		label     string
		overrides []*pkcs11.Attribute
		wantAttr  string
	}{
		{"extractable", []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, true)}, "CKA_EXTRACTABLE"},
		{"not-sensitive", []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, false)}, "CKA_SENSITIVE"},
		{"no-ckaid", []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_ID, nil)}, "CKA_ID"},
		{"public", []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, false)}, "CKA_PRIVATE"},
	}
	for _, tt := range tests {
		t.Run(tt.label, func(t *testing.T) {
			cfg := base
			cfg.KeyLabel = tt.label
			rawKey(t, cfg, tt.label, tt.overrides...)
			_, err := Open(context.Background(), cfg)
			if !errors.Is(err, ErrUnsafeKey) || !strings.Contains(err.Error(), tt.wantAttr) {
				t.Fatalf("Open = %v, want ErrUnsafeKey naming %s", err, tt.wantAttr)
			}
			cfg.AllowExtractable = true
			if tt.wantAttr == "CKA_ID" || tt.wantAttr == "CKA_PRIVATE" {
				// Not about extraction: allowExtractable does not lift these.
				if _, err := Open(context.Background(), cfg); !errors.Is(err, ErrUnsafeKey) || !strings.Contains(err.Error(), "does not accept") {
					t.Fatalf("Open with allowExtractable = %v, want still ErrUnsafeKey", err)
				}
				return
			}
			k := openKEK(t, cfg)
			roundTrip(t, k, []byte("seed"), aad)
		})
	}

	// A key that was once extractable keeps CKA_NEVER_EXTRACTABLE false after
	// CKA_EXTRACTABLE is turned off.
	t.Run("was-extractable", func(t *testing.T) {
		cfg := base
		cfg.KeyLabel = "was-extractable"
		id := rawKey(t, cfg, cfg.KeyLabel, pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, true))
		c, sh := rawSession(t, cfg)
		hs, err := findObjects(c, sh, keyTemplate(cfg.KeyLabel, id))
		if err != nil || len(hs) != 1 {
			t.Fatal(err, len(hs))
		}
		if err := c.(interface {
			SetAttributeValue(pkcs11.SessionHandle, pkcs11.ObjectHandle, []*pkcs11.Attribute) error
		}).SetAttributeValue(sh, hs[0], []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false)}); err != nil {
			t.Skipf("token does not allow clearing CKA_EXTRACTABLE: %v", err)
		}
		_, err = Open(context.Background(), cfg)
		if !errors.Is(err, ErrUnsafeKey) || !strings.Contains(err.Error(), "CKA_NEVER_EXTRACTABLE") {
			t.Fatalf("Open = %v, want ErrUnsafeKey naming CKA_NEVER_EXTRACTABLE", err)
		}
	})
}

func TestKeySelection(t *testing.T) {
	fx, toks := newTokens(t, 1)
	cfg := cfgFor(fx, toks[0], "shared")
	idA := rawKey(t, cfg, "shared")
	idB := []byte("second-id")
	rawKey(t, cfg, "shared", pkcs11.NewAttribute(pkcs11.CKA_ID, idB))

	_, err := Open(context.Background(), cfg)
	if !errors.Is(err, ErrKeyAmbiguous) || !strings.Contains(err.Error(), "ambiguous") {
		t.Fatalf("Open with two keys labelled alike = %v, want ErrKeyAmbiguous", err)
	}
	cfg.KeyCKAID = hex.EncodeToString(idB)
	k := openKEK(t, cfg)
	if want := KeyID("shared", idB); k.ID() != want {
		t.Errorf("ID = %q, want %q", k.ID(), want)
	}
	if k.ID() == KeyID("shared", idA) {
		t.Error("two keys with one label share a key_id")
	}

	cfg.KeyCKAID = "ffff"
	if _, err := Open(context.Background(), cfg); !errors.Is(err, kek.ErrKeyNotFound) {
		t.Errorf("Open with an unknown CKA_ID = %v, want kek.ErrKeyNotFound", err)
	}
	cfg.KeyCKAID, cfg.KeyLabel = "", "missing"
	if _, err := Open(context.Background(), cfg); !errors.Is(err, kek.ErrKeyNotFound) {
		t.Errorf("Open with an unknown label = %v, want kek.ErrKeyNotFound", err)
	}
	bad := cfgFor(fx, toks[0], "shared")
	bad.TokenLabel = "no-such-token"
	if _, err := Open(context.Background(), bad); !errors.Is(err, ErrTokenNotFound) {
		t.Errorf("Open with an unknown token = %v, want ErrTokenNotFound", err)
	}
	if err := DestroyKey(context.Background(), cfgFor(fx, toks[0], "shared")); !errors.Is(err, ErrKeyAmbiguous) {
		t.Errorf("DestroyKey of an ambiguous label = %v, want ErrKeyAmbiguous", err)
	}
}

func TestWrongPIN(t *testing.T) {
	fx, toks := newTokens(t, 1)
	f := newFaulty(nil) // one counter across module loads
	seam(t, func(c p11) p11 { f.p11 = c; return f })
	cfg := cfgFor(fx, toks[0], "kek")
	createKey(t, cfg)
	logins := f.count("Login")

	const wrongPIN = "wrong-pin-0000"
	t.Setenv("HWKMS_TEST_PIN", wrongPIN)
	bad := cfg
	bad.PINFile, bad.PINEnv = "", "HWKMS_TEST_PIN"
	_, err := Open(context.Background(), bad)
	var rv pkcs11.Error
	if !errors.As(err, &rv) || rv != pkcs11.CKR_PIN_INCORRECT {
		t.Fatalf("Open with a wrong PIN = %v, want CKR_PIN_INCORRECT", err)
	}
	var pe *PINError
	if !errors.As(err, &pe) || pe.Token != toks[0].Label || !errors.Is(err, kek.ErrUnavailable) {
		t.Errorf("Open with a wrong PIN = %#v, want *PINError for token %q wrapping ErrUnavailable", err, toks[0].Label)
	}
	msg := err.Error()
	if strings.Contains(msg, wrongPIN) || strings.Contains(msg, toks[0].PIN) || !strings.Contains(msg, toks[0].Label) {
		t.Errorf("error %q must name the token and contain no PIN", msg)
	}
	if got := f.count("Login") - logins; got != 1 {
		t.Errorf("C_Login called %d times for one Open with a wrong PIN, want exactly 1", got)
	}
	if pe != nil && pe.Repeated {
		t.Errorf("first refusal marked Repeated")
	}

	// Opening again with the same refused PIN (a reload, a SIGHUP) makes no C_Login.
	for range 3 {
		_, err = Open(context.Background(), bad)
		if !errors.As(err, &pe) || !pe.Repeated || !errors.As(err, &rv) || rv != pkcs11.CKR_PIN_INCORRECT {
			t.Fatalf("Open again with the refused PIN = %v, want a Repeated *PINError wrapping CKR_PIN_INCORRECT", err)
		}
		if strings.Contains(err.Error(), wrongPIN) {
			t.Errorf("error %q contains the PIN", err)
		}
	}
	if got := f.count("Login") - logins; got != 1 {
		t.Errorf("C_Login called %d times for four Opens with the same wrong PIN, want exactly 1", got)
	}
	// Another PIN gets its one attempt.
	t.Setenv("HWKMS_TEST_PIN", wrongPIN+"1")
	if _, err := Open(context.Background(), bad); !errors.As(err, &pe) || pe.Repeated {
		t.Errorf("Open with a second wrong PIN = %v, want a new refusal", err)
	}
	if got := f.count("Login") - logins; got != 2 {
		t.Errorf("C_Login called %d times after a second wrong PIN, want 2", got)
	}
	// The token is not locked: the right PIN still works, and clears the memory.
	roundTrip(t, openKEK(t, cfg), []byte("seed"), aad)
	refusedPINs.Lock()
	for key := range refusedPINs.m {
		if strings.HasSuffix(key, "\x00"+toks[0].Label) {
			t.Errorf("token %q: refused PIN still remembered after a successful login", toks[0].Label)
		}
	}
	refusedPINs.Unlock()
}

// TestWrongPINRememberedAcrossRestarts: with RememberRefusals, a PIN the token refused
// is not presented again by the next process either (a static pod restarted by kubelet
// after exit 78), until the PIN changes; a successful login erases the record. The
// record never holds the PIN.
func TestWrongPINRememberedAcrossRestarts(t *testing.T) {
	fx, toks := newTokens(t, 1)
	f := newFaulty(nil)
	seam(t, func(c p11) p11 { f.p11 = c; return f })
	cfg := cfgFor(fx, toks[0], "kek")
	createKey(t, cfg)
	record := filepath.Join(t.TempDir(), "run", "hwkms-refused-pins.json")
	restart := func() {
		t.Helper()
		refusedPINs.Lock()
		clear(refusedPINs.m) // a new process remembers nothing in memory
		refusedPINs.Unlock()
		if err := RememberRefusals(record); err != nil {
			t.Fatal(err)
		}
	}
	restart()
	t.Cleanup(func() { RememberRefusals("") })
	logins := f.count("Login")

	const wrongPIN = "wrong-pin-4711"
	t.Setenv("HWKMS_TEST_PIN", wrongPIN)
	bad := cfg
	bad.PINFile, bad.PINEnv = "", "HWKMS_TEST_PIN"
	var pe *PINError
	if _, err := Open(context.Background(), bad); !errors.As(err, &pe) || pe.Repeated {
		t.Fatalf("first Open with a wrong PIN = %v, want a new refusal", err)
	}
	for i := range 3 {
		restart()
		_, err := Open(context.Background(), bad)
		var rv pkcs11.Error
		if !errors.As(err, &pe) || !pe.Repeated || pe.Record != record || !errors.As(err, &rv) || rv != pkcs11.CKR_PIN_INCORRECT {
			t.Fatalf("Open after restart %d with the refused PIN = %v, want a Repeated *PINError from %s wrapping CKR_PIN_INCORRECT", i+1, err, record)
		}
		if strings.Contains(err.Error(), wrongPIN) || !strings.Contains(err.Error(), record) {
			t.Fatalf("error %q must name the record and contain no PIN", err)
		}
	}
	if got := f.count("Login") - logins; got != 1 {
		t.Fatalf("C_Login called %d times over four processes with the same wrong PIN, want 1", got)
	}
	fi, err := os.Stat(record)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("record %s: %v, mode %v; want 0600", record, err, fi.Mode())
	}
	if data, _ := os.ReadFile(record); strings.Contains(string(data), wrongPIN) || strings.Contains(string(data), toks[0].PIN) {
		t.Fatal("the record holds a PIN")
	}
	// The operator fixes the PIN file: one attempt, success, and the record is erased.
	restart()
	roundTrip(t, openKEK(t, cfg), []byte("seed"), []byte("aad"))
	if got := f.count("Login") - logins; got != 2 {
		t.Fatalf("C_Login called %d times in all after the fix, want 2", got)
	}
	var rf refusalFile
	data, _ := os.ReadFile(record)
	if err := json.Unmarshal(data, &rf); err != nil || len(rf.Refused) != 0 {
		t.Fatalf("record after a successful login: %s (%v), want no refusals", data, err)
	}
	// A damaged record stops the start with a clear error instead of being ignored.
	if err := os.WriteFile(record, []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := RememberRefusals(record); err == nil || !strings.Contains(err.Error(), "damaged") {
		t.Fatalf("RememberRefusals on a damaged record = %v", err)
	}
}

func TestPINSources(t *testing.T) {
	fx, toks := newTokens(t, 1)
	cfg := cfgFor(fx, toks[0], "kek")
	createKey(t, cfg)
	dir := t.TempDir()
	write := func(name, content string) string {
		p := dir + "/" + name
		if err := writeFile(p, content); err != nil {
			t.Fatal(err)
		}
		return p
	}
	t.Setenv("HWKMS_TEST_PIN_OK", toks[0].PIN)
	t.Setenv("HWKMS_TEST_PIN_EMPTY", "")
	tests := []struct {
		name    string
		file    string
		env     string
		wantErr string
	}{
		{"file no newline", write("a", toks[0].PIN), "", ""},
		{"file LF", write("b", toks[0].PIN+"\n"), "", ""},
		{"file CRLF", write("c", toks[0].PIN+"\r\n"), "", ""},
		{"file two newlines", write("d", toks[0].PIN+"\n\n"), "", "CKR_PIN_INCORRECT"},
		{"file empty", write("e", ""), "", "PIN is empty"},
		{"file newline only", write("f", "\n"), "", "PIN is empty"},
		{"file missing", dir + "/missing", "", "pinFile"},
		{"env", "", "HWKMS_TEST_PIN_OK", ""},
		{"env empty", "", "HWKMS_TEST_PIN_EMPTY", "unset or empty"},
		{"env unset", "", "HWKMS_TEST_PIN_UNSET", "unset or empty"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := cfg
			c.PINFile, c.PINEnv = tt.file, tt.env
			k, err := Open(context.Background(), c)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("Open: %v", err)
				}
				if err := k.Close(); err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil {
				k.Close()
				t.Fatalf("Open succeeded, want error containing %q", tt.wantErr)
			}
			if !strings.Contains(err.Error(), tt.wantErr) || strings.Contains(err.Error(), toks[0].PIN) {
				t.Fatalf("Open = %q, want it to contain %q and no PIN", err, tt.wantErr)
			}
		})
	}
}

func TestTwoTokens(t *testing.T) {
	fx, toks := newTokens(t, 2)
	cfgA, cfgB := cfgFor(fx, toks[0], "kek"), cfgFor(fx, toks[1], "kek")
	createKey(t, cfgA)
	createKey(t, cfgB)
	a, err := Open(context.Background(), cfgA)
	if err != nil {
		t.Fatal(err)
	}
	b := openKEK(t, cfgB)
	if a.ID() == b.ID() {
		t.Fatal("keys with the same label on two tokens share a key_id")
	}
	bodyA := roundTrip(t, a, []byte("seed-a"), aad)
	roundTrip(t, b, []byte("seed-b"), aad)
	if _, err := b.Unwrap(context.Background(), bodyA, aad); !errors.Is(err, kek.ErrInvalidCiphertext) {
		t.Errorf("unwrap of A's body under B = %v, want ErrInvalidCiphertext", err)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	roundTrip(t, b, []byte("seed-b"), aad)
}

func TestTwoKEKsOneToken(t *testing.T) {
	fx, toks := newTokens(t, 1)
	cfg1, cfg2 := cfgFor(fx, toks[0], "kek-1"), cfgFor(fx, toks[0], "kek-2")
	createKey(t, cfg1)
	createKey(t, cfg2)
	k1, err := Open(context.Background(), cfg1)
	if err != nil {
		t.Fatal(err)
	}
	k2 := openKEK(t, cfg2)
	k1again := openKEK(t, cfg1) // the same key twice
	body := roundTrip(t, k1, []byte("seed"), aad)
	roundTrip(t, k2, []byte("seed"), aad)
	if k1.ID() != k1again.ID() {
		t.Errorf("two KEKs on one key: IDs %q and %q", k1.ID(), k1again.ID())
	}
	if err := k1.Close(); err != nil {
		t.Fatal(err)
	}
	roundTrip(t, k2, []byte("seed"), aad)
	if got, err := k1again.Unwrap(context.Background(), body, aad); err != nil || string(got) != "seed" {
		t.Fatalf("second KEK on the same key after closing the first: %q, %v", got, err)
	}

	// A second configuration of the logged-in token with another PIN is refused
	// rather than riding on the existing login.
	other := cfg2
	other.PINFile = ""
	other.PINEnv = "HWKMS_TEST_OTHER_PIN"
	t.Setenv(other.PINEnv, "not-the-pin")
	if _, err := Open(context.Background(), other); err == nil || !strings.Contains(err.Error(), "different PIN") {
		t.Errorf("Open with another PIN while logged in = %v, want a refusal", err)
	}
}

func TestKeyID(t *testing.T) {
	fx, toks := newTokens(t, 1)
	cfg := cfgFor(fx, toks[0], "kek")
	ki := createKey(t, cfg)

	k, err := Open(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	id := k.ID()
	if id != ki.KeyID {
		t.Errorf("Open ID %q != CreateKey KeyID %q", id, ki.KeyID)
	}
	if !strings.HasPrefix(id, "p11:") || len(id) != 4+32 {
		t.Errorf("ID = %q, want p11: + 32 hex digits", id)
	}
	body := roundTrip(t, k, []byte("seed"), aad)
	slot := k.tok.slot
	if err := k.Close(); err != nil {
		t.Fatal(err)
	}
	if k.ID() != id {
		t.Error("ID changed after Close")
	}

	selectors := map[string]func(*Config){
		"label":  func(c *Config) {},
		"serial": func(c *Config) { c.TokenLabel, c.TokenSerial = "", toks[0].Serial },
		"slot":   func(c *Config) { c.TokenLabel, c.Slot = "", &slot },
		"ckaid":  func(c *Config) { c.KeyCKAID = ki.CKAID },
	}
	for name, sel := range selectors {
		t.Run(name, func(t *testing.T) {
			c := cfg
			sel(&c)
			k := openKEK(t, c)
			if k.ID() != id {
				t.Errorf("ID = %q, want %q", k.ID(), id)
			}
			if got, err := k.Unwrap(context.Background(), body, aad); err != nil || string(got) != "seed" {
				t.Errorf("Unwrap after reopen = %q, %v", got, err)
			}
		})
	}

	t.Run("recreated", func(t *testing.T) {
		if err := DestroyKey(context.Background(), cfg); err != nil {
			t.Fatal(err)
		}
		if _, err := Open(context.Background(), cfg); !errors.Is(err, kek.ErrKeyNotFound) {
			t.Fatalf("Open after DestroyKey = %v, want kek.ErrKeyNotFound", err)
		}
		ki2 := createKey(t, cfg)
		k2 := openKEK(t, cfg)
		if ki2.KeyID == id || k2.ID() == id {
			t.Fatalf("re-created key reuses key_id %q", id)
		}
		if _, err := k2.Unwrap(context.Background(), body, aad); !errors.Is(err, kek.ErrInvalidCiphertext) {
			t.Errorf("old body under the re-created key = %v, want ErrInvalidCiphertext", err)
		}
	})
}

func TestKeyIDDerivation(t *testing.T) {
	// Pinned: a change here changes every deployed key_id.
	if got, want := KeyID("kek", []byte{1, 2, 3}), "p11:"+keyIDFor("kek", []byte{1, 2, 3}); got != want {
		t.Errorf("KeyID = %q, want %q", got, want)
	}
	if KeyID("a", []byte("b")) == KeyID("ab", nil) || KeyID("kek", []byte{1}) == KeyID("kek", []byte{2}) {
		t.Error("KeyID collides")
	}
	if got, want := KeyID("kek", []byte{0x01, 0x02}), "p11:b7b7993c43adbb2a5a3de1bf0ffc04a1"; got != want {
		t.Errorf("KeyID = %q, want %q", got, want)
	}
}

func TestConcurrency(t *testing.T) {
	fx, toks := newTokens(t, 1)
	cfg := cfgFor(fx, toks[0], "kek")
	cfg.Sessions = 4
	createKey(t, cfg)
	k := openKEK(t, cfg)

	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for g := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx := context.Background()
			for i := range 50 {
				pt := []byte(fmt.Sprintf("goroutine %d op %d", g, i))
				body, err := k.Wrap(ctx, pt, aad)
				if err != nil {
					errs <- err
					return
				}
				got, err := k.Unwrap(ctx, body, aad)
				if err != nil || !bytes.Equal(got, pt) {
					errs <- fmt.Errorf("unwrap: %q, %v", got, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestWaitForSessionHonoursContext(t *testing.T) {
	fx, toks := newTokens(t, 1)
	cfg := cfgFor(fx, toks[0], "kek")
	cfg.Sessions = 1
	createKey(t, cfg)
	k := openKEK(t, cfg)
	body := roundTrip(t, k, []byte("seed"), aad)

	s, err := k.pool.acquire(context.Background()) // hold the only session
	if err != nil {
		t.Fatal(err)
	}
	t.Run("deadline", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		start := time.Now()
		_, err := k.Wrap(ctx, []byte("seed"), aad)
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Wrap = %v, want DeadlineExceeded", err)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Fatalf("Wrap returned after %v", d)
		}
	})
	t.Run("cancel", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { _, err := k.Unwrap(ctx, body, aad); done <- err }()
		time.AfterFunc(20*time.Millisecond, cancel)
		select {
		case err := <-done:
			if !errors.Is(err, context.Canceled) {
				t.Fatalf("Unwrap = %v, want Canceled", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Unwrap did not return after cancel")
		}
	})
	t.Run("already cancelled", func(t *testing.T) {
		k.pool.release(s, k.tok.mod.gen.Load()) // a session is free, but a dead context must not use it
		s = nil
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if _, err := k.Wrap(ctx, []byte("seed"), aad); !errors.Is(err, context.Canceled) {
			t.Fatalf("Wrap = %v, want Canceled", err)
		}
	})
	if s != nil {
		k.pool.release(s, k.tok.mod.gen.Load())
	}
	roundTrip(t, k, []byte("seed"), aad)
}

func TestClose(t *testing.T) {
	fx, toks := newTokens(t, 1)
	cfg := cfgFor(fx, toks[0], "kek")
	cfg.Sessions = 1
	createKey(t, cfg)
	k, err := Open(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	body := roundTrip(t, k, []byte("seed"), aad)

	// Close waits for an operation that holds a session (simulated: the test holds the
	// read lock and the only session), and wakes an operation waiting for a session with
	// ErrClosed.
	k.mu.RLock()
	s, err := k.pool.acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	isWaiting := make(chan struct{})
	k.pool.onWait = func() { close(isWaiting) }
	waiting := make(chan error, 1)
	go func() {
		k.mu.RLock() // a second reader, admitted before Close asks for the write lock
		defer k.mu.RUnlock()
		_, err := k.pool.acquire(context.Background())
		waiting <- err
	}()
	<-isWaiting
	closed := make(chan error, 1)
	go func() { closed <- k.Close() }()
	if err := <-waiting; !errors.Is(err, kek.ErrClosed) {
		t.Errorf("waiting acquire = %v, want ErrClosed", err)
	}
	select {
	case <-closed:
		t.Fatal("Close returned while an operation held a session")
	case <-time.After(20 * time.Millisecond): // Close must still be waiting
	}
	k.pool.release(s, k.tok.mod.gen.Load())
	k.mu.RUnlock()
	if err := <-closed; err != nil {
		t.Fatalf("Close: %v", err)
	}
	// A Close that had to wait closes like any other (the rest of what a closed KEK
	// answers is in TestConformance).
	if _, err := k.Unwrap(context.Background(), body, aad); !errors.Is(err, kek.ErrClosed) {
		t.Errorf("Unwrap after Close = %v, want ErrClosed", err)
	}
}

func TestRecovery(t *testing.T) {
	fx, toks := newTokens(t, 1)
	f := newFaulty(nil) // one counter across module loads
	seam(t, func(c p11) p11 { f.p11 = c; return f })
	cfg := cfgFor(fx, toks[0], "kek")
	cfg.Sessions = 1
	createKey(t, cfg)
	k := openKEK(t, cfg)
	ctx := context.Background()

	t.Run("session lost", func(t *testing.T) {
		opens := f.count("OpenSession")
		f.inject("EncryptInit", pkcs11.Error(pkcs11.CKR_SESSION_HANDLE_INVALID))
		roundTrip(t, k, []byte("seed"), aad)
		if got := f.count("OpenSession") - opens; got != 1 {
			t.Errorf("opened %d sessions after CKR_SESSION_HANDLE_INVALID, want 1", got)
		}
	})
	t.Run("session lost twice", func(t *testing.T) {
		f.inject("EncryptInit", pkcs11.Error(pkcs11.CKR_SESSION_CLOSED), pkcs11.Error(pkcs11.CKR_SESSION_CLOSED))
		_, err := k.Wrap(ctx, []byte("seed"), aad)
		var rv pkcs11.Error
		if !errors.Is(err, kek.ErrUnavailable) || !errors.As(err, &rv) || rv != pkcs11.CKR_SESSION_CLOSED {
			t.Fatalf("Wrap = %v, want ErrUnavailable with CKR_SESSION_CLOSED", err)
		}
		roundTrip(t, k, []byte("seed"), aad)
	})
	t.Run("object handle stale", func(t *testing.T) {
		finds := f.count("FindObjectsInit")
		f.inject("EncryptInit", pkcs11.Error(pkcs11.CKR_OBJECT_HANDLE_INVALID))
		roundTrip(t, k, []byte("seed"), aad)
		if got := f.count("FindObjectsInit") - finds; got != 1 {
			t.Errorf("searched %d times after CKR_OBJECT_HANDLE_INVALID, want 1", got)
		}
	})
	t.Run("refind hits a device error", func(t *testing.T) {
		inits := f.count("Initialize")
		f.inject("EncryptInit", pkcs11.Error(pkcs11.CKR_OBJECT_HANDLE_INVALID))
		f.inject("FindObjectsInit", pkcs11.Error(pkcs11.CKR_DEVICE_ERROR))
		roundTrip(t, k, []byte("seed"), aad)
		if got := f.count("Initialize") - inits; got != 1 {
			t.Errorf("C_Initialize called %d times, want 1 re-initialisation", got)
		}
	})
	for _, rv := range []uint{pkcs11.CKR_DEVICE_REMOVED, pkcs11.CKR_TOKEN_NOT_PRESENT, pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED, pkcs11.CKR_DEVICE_ERROR} {
		t.Run(pkcs11.Error(rv).Error(), func(t *testing.T) {
			inits, logins := f.count("Initialize"), f.count("Login")
			f.inject("EncryptInit", pkcs11.Error(rv))
			roundTrip(t, k, []byte("seed"), aad) // re-initialised and retried within the call
			if got := f.count("Initialize") - inits; got != 1 {
				t.Errorf("C_Initialize called %d times, want 1", got)
			}
			if got := f.count("Login") - logins; got != 1 {
				t.Errorf("C_Login called %d times, want 1", got)
			}
		})
	}
	t.Run("device fails twice", func(t *testing.T) {
		f.inject("EncryptInit", pkcs11.Error(pkcs11.CKR_DEVICE_ERROR), pkcs11.Error(pkcs11.CKR_DEVICE_ERROR))
		_, err := k.Wrap(ctx, []byte("seed"), aad)
		var got pkcs11.Error
		if !errors.Is(err, kek.ErrUnavailable) || !errors.As(err, &got) || got != pkcs11.CKR_DEVICE_ERROR {
			t.Fatalf("Wrap = %v, want ErrUnavailable with CKR_DEVICE_ERROR", err)
		}
		roundTrip(t, k, []byte("seed"), aad)
	})
	t.Run("reinit fails then backs off", func(t *testing.T) {
		f.inject("EncryptInit", pkcs11.Error(pkcs11.CKR_DEVICE_REMOVED))
		f.inject("Initialize", pkcs11.Error(pkcs11.CKR_DEVICE_REMOVED))
		if _, err := k.Wrap(ctx, []byte("seed"), aad); !errors.Is(err, kek.ErrUnavailable) {
			t.Fatalf("Wrap = %v, want ErrUnavailable", err)
		}
		inits := f.count("Initialize")
		_, err := k.Wrap(ctx, []byte("seed"), aad)
		if !errors.Is(err, kek.ErrUnavailable) || !errors.Is(err, errBackoff) {
			t.Fatalf("Wrap right after a failed re-init = %v, want ErrUnavailable while backing off", err)
		}
		if got := f.count("Initialize") - inits; got != 0 {
			t.Errorf("C_Initialize called %d times during the backoff, want 0", got)
		}
		deadline := time.Now().Add(5 * time.Second)
		for {
			_, err := k.Wrap(ctx, []byte("seed"), aad)
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("no recovery after the backoff: %v", err)
			}
			time.Sleep(10 * time.Millisecond)
		}
		roundTrip(t, k, []byte("seed"), aad)
	})
}

func TestModuleSharedAcrossPaths(t *testing.T) {
	fx, toks := newTokens(t, 1)
	cfg := cfgFor(fx, toks[0], "kek")
	createKey(t, cfg)
	link := t.TempDir() + "/libalias.so"
	if err := os.Symlink(fx.Module, link); err != nil {
		t.Fatal(err)
	}
	a := openKEK(t, cfg)
	aliased := cfg
	aliased.Module = link
	b := openKEK(t, aliased)
	registry.Lock()
	n := len(registry.modules)
	registry.Unlock()
	if n != 1 {
		t.Errorf("%d modules loaded for one library reached by two paths, want 1", n)
	}
	if a.tok != b.tok {
		t.Error("two KEKs on one token do not share the token login")
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	roundTrip(t, b, []byte("seed"), aad)
}

// TestRecoverStaleGeneration: a caller whose device error happened in a module
// generation that is no longer current (another caller already re-initialised the
// module) gets nil at once, without a re-initialisation, and retries in the new one.
func TestRecoverStaleGeneration(t *testing.T) {
	fx, toks := newTokens(t, 1)
	cfg := cfgFor(fx, toks[0], "kek")
	createKey(t, cfg)
	k := openKEK(t, cfg)
	m := k.tok.mod
	gen := m.gen.Load()
	okBefore, failedBefore := k.Reinits()
	if err := m.recoverDevice(context.Background(), k.tok, gen+1, errors.New("device error of another generation")); err != nil {
		t.Fatalf("recoverDevice for a generation that is not current = %v, want nil", err)
	}
	if ok, failed := k.Reinits(); ok != okBefore || failed != failedBefore || m.gen.Load() != gen {
		t.Fatalf("recoverDevice of a stale generation re-initialised: reinits %d/%d -> %d/%d, generation %d -> %d", okBefore, failedBefore, ok, failed, gen, m.gen.Load())
	}
	roundTrip(t, k, []byte("seed"), aad)
}
