package hsm

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"sort"
	"strings"

	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/miekg/pkcs11"
)

// Errors about key selection and attributes, wrapped by Open, CreateKey and DestroyKey.
var (
	// ErrKeyAmbiguous means several AES secret keys have the configured label and no
	// keyCKAID was given to choose one.
	ErrKeyAmbiguous = errors.New("key selection is ambiguous")
	// ErrUnsafeKey means the key's attributes would let its value leave the token
	// (CKA_EXTRACTABLE true, CKA_SENSITIVE false, CKA_NEVER_EXTRACTABLE false) or it
	// lacks a CKA_ID, and Config.AllowExtractable is not set.
	ErrUnsafeKey = errors.New("key attributes are unsafe")
	// ErrTokenNotFound means no token in the module matches the configured selector.
	ErrTokenNotFound = errors.New("token not found")
	// ErrTokenChanged means the token found by the configured selector after a
	// re-initialisation (or by a later Open in the same process) has another serial
	// number (CK_TOKEN_INFO.serialNumber) than the token this process logged in to: it
	// was re-initialised or substituted. No C_Login is made on it and no key on it is
	// used; errors carrying it also wrap kek.ErrUnavailable.
	ErrTokenChanged = errors.New("another token is in the configured token's place")
	// ErrKeyChanged means the key found again by label and CKA_ID (after a
	// re-initialisation or a stale handle) is not the key found at Open: its
	// CKA_CHECK_VALUE differs, or it does not unwrap the probe body wrapped at Open.
	// Nothing is wrapped or unwrapped under it; errors carrying it also wrap
	// kek.ErrUnavailable.
	ErrKeyChanged = errors.New("another key has the key's label and CKA_ID")
)

// keyIDDomain separates hwkms key_id hashes from any other use of SHA-256.
const keyIDDomain = "hwkms/pkcs11/key_id\x00"

// KeyID derives the key_id of a PKCS#11 KEK from its CKA_LABEL and raw CKA_ID:
//
//	"p11:" + hex(SHA-256("hwkms/pkcs11/key_id\x00" + label + "\x00" + ckaID)[:16])
//
// It depends only on the key object, never on slot or token serial, so every node that
// reaches the same key computes the same key_id, and a key re-created with the same
// label gets a new random CKA_ID and so a new key_id.
func KeyID(label string, ckaID []byte) string {
	h := sha256.New()
	h.Write([]byte(keyIDDomain))
	h.Write([]byte(label))
	h.Write([]byte{0})
	h.Write(ckaID)
	return "p11:" + hex.EncodeToString(h.Sum(nil)[:16])
}

// KeyInfo describes an AES secret key on a token. It holds no key material.
type KeyInfo struct {
	// KeyID is KeyID(Label, CKA_ID): the key_id reported to kube-apiserver.
	KeyID string
	// Label is CKA_LABEL.
	Label string
	// CKAID is CKA_ID, lower-case hex.
	CKAID string
	// Extractable is CKA_EXTRACTABLE: the key may be wrapped out of the token.
	Extractable bool
	// Sensitive is CKA_SENSITIVE: the key value cannot be read in plaintext.
	Sensitive bool
	// NeverExtractable is CKA_NEVER_EXTRACTABLE: the key has never been extractable.
	NeverExtractable bool
	// Private is CKA_PRIVATE: the key can be used only in a logged-in session.
	Private bool
	// Modifiable is CKA_MODIFIABLE: C_SetAttributeValue can change the key's
	// attributes (its label, CKA_ID or usage flags). Also true when the token does not
	// report it (the PKCS#11 default). CreateKey sets it false where the token allows.
	Modifiable bool
	// Copyable is CKA_COPYABLE: C_CopyObject can copy the key into a new object with
	// other attributes. Also true when the token does not report it (the PKCS#11
	// default; tokens before PKCS#11 v2.40 lack it). CreateKey sets it false where the
	// token allows.
	Copyable bool
	// Mechanism is MechanismAESCBCHMAC for a key with an HMAC partner key and
	// MechanismRSAOAEP for an RSA key pair (set by CreateKey and ListKeys alike), and
	// empty for an AES key alone, whose mechanism
	// (aes-gcm or aes-gcm-token-iv) Open decides from the token; KEK.Mechanism
	// reports the choice.
	Mechanism string
}

// AttributeWarning is a warning for hwkms doctor and key list when the key is
// Modifiable or Copyable (the token refused CKA_MODIFIABLE or CKA_COPYABLE false when
// CreateKey made it, or the key was made elsewhere or by an older hwkms), and "" when
// it is neither. Such a key is not refused: its value still cannot leave the token,
// but someone logged in could change its label, CKA_ID or usage, or copy it under
// another name.
func (k KeyInfo) AttributeWarning() string {
	var w []string
	if k.Modifiable {
		w = append(w, "CKA_MODIFIABLE is true: its label, CKA_ID and usage flags can be changed by anyone logged in")
	}
	if k.Copyable {
		w = append(w, "CKA_COPYABLE is true: C_CopyObject can copy it into a new object with other attributes")
	}
	return strings.Join(w, "; ")
}

// Safe reports whether the key's value can never have left the token and only a
// logged-in user can use it: Sensitive, NeverExtractable, not Extractable, Private,
// and with a CKA_ID (which key_id uniqueness needs).
func (k KeyInfo) Safe() bool { return k.unsafeReason() == "" }

// unsafeReason names the first attribute that makes the key unsafe, or "".
func (k KeyInfo) unsafeReason() string {
	switch {
	case k.Extractable:
		return "CKA_EXTRACTABLE is true: the key can be wrapped out of the token"
	case !k.Sensitive:
		return "CKA_SENSITIVE is false: the key value can be read in plaintext"
	case !k.NeverExtractable:
		return "CKA_NEVER_EXTRACTABLE is false: the key was extractable at some time and may exist outside the token"
	case k.CKAID == "":
		return "CKA_ID is empty: the key_id would not change if the key were re-created with the same label"
	case !k.Private:
		return "CKA_PRIVATE is false: anyone who can open a session on the token can use the key without the PIN"
	}
	return ""
}

// acceptableWithOverride reports whether allowExtractable may accept the key despite
// unsafeReason: it covers how the key's value may have left the token, never a key
// without a CKA_ID (key_id uniqueness) or one usable without login.
func (k KeyInfo) acceptableWithOverride() bool { return k.CKAID != "" && k.Private }

// keyTemplate is the search template of hsm keys: token AES secret keys.
func keyTemplate(label string, ckaID []byte) []*pkcs11.Attribute {
	t := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
	}
	if label != "" {
		t = append(t, pkcs11.NewAttribute(pkcs11.CKA_LABEL, label))
	}
	if ckaID != nil {
		t = append(t, pkcs11.NewAttribute(pkcs11.CKA_ID, ckaID))
	}
	return t
}

// maxFound bounds a search so that a token full of objects cannot make us loop forever.
const maxFound = 10000

// findObjects runs C_FindObjectsInit/C_FindObjects/C_FindObjectsFinal with tmpl.
func findObjects(c p11, sh pkcs11.SessionHandle, tmpl []*pkcs11.Attribute) ([]pkcs11.ObjectHandle, error) {
	if err := c.FindObjectsInit(sh, tmpl); err != nil {
		return nil, opError{op: "C_FindObjectsInit", err: err}
	}
	defer c.FindObjectsFinal(sh) //nolint:errcheck // nothing to do if it fails
	var all []pkcs11.ObjectHandle
	for len(all) < maxFound {
		hs, _, err := c.FindObjects(sh, 64)
		if err != nil {
			return nil, opError{op: "C_FindObjects", err: err}
		}
		if len(hs) == 0 {
			break
		}
		all = append(all, hs...)
	}
	return all, nil
}

// readKeyInfo reads the non-secret attributes of a secret key.
func readKeyInfo(c p11, sh pkcs11.SessionHandle, h pkcs11.ObjectHandle) (KeyInfo, []byte, error) {
	attrs, err := c.GetAttributeValue(sh, h, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil),
		pkcs11.NewAttribute(pkcs11.CKA_ID, nil),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_NEVER_EXTRACTABLE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, nil),
	})
	if err != nil {
		return KeyInfo{}, nil, opError{op: "C_GetAttributeValue", err: err}
	}
	var (
		ki    KeyInfo
		ckaID []byte
	)
	for _, a := range attrs {
		switch a.Type {
		case pkcs11.CKA_LABEL:
			ki.Label = string(a.Value)
		case pkcs11.CKA_ID:
			ckaID = bytes.Clone(a.Value)
		case pkcs11.CKA_EXTRACTABLE:
			// Anything but a one-byte CK_FALSE counts as extractable.
			ki.Extractable = !(len(a.Value) == 1 && a.Value[0] == 0)
		case pkcs11.CKA_SENSITIVE:
			ki.Sensitive = len(a.Value) == 1 && a.Value[0] != 0
		case pkcs11.CKA_NEVER_EXTRACTABLE:
			ki.NeverExtractable = len(a.Value) == 1 && a.Value[0] != 0
		case pkcs11.CKA_PRIVATE:
			ki.Private = len(a.Value) == 1 && a.Value[0] != 0
		}
	}
	if ckaID == nil {
		ckaID = []byte{} // non-nil: a refind must match the empty CKA_ID, not any
	}
	ki.Modifiable, ki.Copyable = readLocks(c, sh, h)
	ki.CKAID = hex.EncodeToString(ckaID)
	ki.KeyID = KeyID(ki.Label, ckaID)
	return ki, ckaID, nil
}

// readLocks reads CKA_MODIFIABLE and CKA_COPYABLE; an attribute the token does not
// report counts as true (the PKCS#11 default).
func readLocks(c p11, sh pkcs11.SessionHandle, h pkcs11.ObjectHandle) (modifiable, copyable bool) {
	modifiable, copyable = true, true
	set := func(a *pkcs11.Attribute) {
		v := !(len(a.Value) == 1 && a.Value[0] == 0)
		switch a.Type {
		case pkcs11.CKA_MODIFIABLE:
			modifiable = v
		case pkcs11.CKA_COPYABLE:
			copyable = v
		}
	}
	both := []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_MODIFIABLE, nil), pkcs11.NewAttribute(pkcs11.CKA_COPYABLE, nil)}
	if attrs, err := c.GetAttributeValue(sh, h, both); err == nil {
		for _, a := range attrs {
			set(a)
		}
		return modifiable, copyable
	}
	for _, t := range both { // one is unknown to the token: ask for each alone
		if attrs, err := c.GetAttributeValue(sh, h, []*pkcs11.Attribute{pkcs11.NewAttribute(t.Type, nil)}); err == nil && len(attrs) == 1 {
			set(attrs[0])
		}
	}
	return modifiable, copyable
}

// lockTemplates are the attributes CreateKey adds to every key template, with the
// fallbacks for tokens that refuse them: all of them, then without CKA_COPYABLE (a
// PKCS#11 v2.40 attribute older tokens lack), then none. The key's KeyInfo
// (Modifiable, Copyable) then reports what the token keeps.
var lockTemplates = [][]*pkcs11.Attribute{
	{pkcs11.NewAttribute(pkcs11.CKA_MODIFIABLE, false), pkcs11.NewAttribute(pkcs11.CKA_COPYABLE, false)},
	{pkcs11.NewAttribute(pkcs11.CKA_MODIFIABLE, false)},
	nil,
}

// withLocks calls gen with each of lockTemplates in turn until the token accepts the
// template: it moves to the next only when gen fails with a CK_RV that refuses a
// template attribute (CKR_ATTRIBUTE_TYPE_INVALID, CKR_ATTRIBUTE_VALUE_INVALID,
// CKR_TEMPLATE_INCONSISTENT, CKR_ATTRIBUTE_READ_ONLY), or with CKR_GENERAL_ERROR,
// which is how the NSS softoken refuses them. A failed C_GenerateKey creates nothing,
// so trying again with a smaller template cannot leave an object behind.
func withLocks(gen func(lock []*pkcs11.Attribute) error) error {
	var err error
	for _, lock := range lockTemplates {
		err = gen(lock)
		if !isRV(err, pkcs11.CKR_ATTRIBUTE_TYPE_INVALID, pkcs11.CKR_ATTRIBUTE_VALUE_INVALID,
			pkcs11.CKR_TEMPLATE_INCONSISTENT, pkcs11.CKR_ATTRIBUTE_READ_ONLY, pkcs11.CKR_GENERAL_ERROR) {
			return err
		}
	}
	return err
}

// selectKey finds the one key with label (and ckaID if non-nil), reads its attributes
// and, unless allowUnsafe, refuses it if they are unsafe.
func selectKey(c p11, sh pkcs11.SessionHandle, tokenLabel, label string, ckaID []byte, allowUnsafe bool) (pkcs11.ObjectHandle, KeyInfo, []byte, error) {
	hs, err := findObjects(c, sh, keyTemplate(label, ckaID))
	if err != nil {
		return 0, KeyInfo{}, nil, err
	}
	desc := fmt.Sprintf("AES secret key labelled %q", label)
	if ckaID != nil {
		desc += fmt.Sprintf(" with CKA_ID %x", ckaID)
	}
	switch {
	case len(hs) == 0:
		return 0, KeyInfo{}, nil, fmt.Errorf("hsm: no %s on token %q: %w", desc, tokenLabel, kek.ErrKeyNotFound)
	case len(hs) > 1:
		return 0, KeyInfo{}, nil, fmt.Errorf("hsm: %d keys match %s on token %q: ambiguous; set keyCKAID to choose one: %w",
			len(hs), desc, tokenLabel, ErrKeyAmbiguous)
	}
	ki, id, err := readKeyInfo(c, sh, hs[0])
	if err != nil {
		return 0, KeyInfo{}, nil, err
	}
	if reason := ki.unsafeReason(); reason != "" && (!allowUnsafe || !ki.acceptableWithOverride()) {
		hint := "set allowExtractable to accept it"
		if !ki.acceptableWithOverride() {
			hint = "allowExtractable does not accept this; use a key made by hwkms key create"
		}
		return 0, KeyInfo{}, nil, fmt.Errorf("hsm: %s on token %q refused: %s (%s): %w",
			desc, tokenLabel, reason, hint, ErrUnsafeKey)
	}
	return hs[0], ki, id, nil
}

// macKeyTypes are the key types an HMAC partner key may have: CKK_GENERIC_SECRET
// (what CreateKey makes) and CKK_SHA256_HMAC (what `tpm2_ptool addkey --algorithm
// hmac:sha256` makes on tpm2-pkcs11, which has no C_GenerateKey; docs/tokens.md).
var macKeyTypes = []uint{pkcs11.CKK_GENERIC_SECRET, pkcs11.CKK_SHA256_HMAC}

// macKeyTemplate is the search template of the HMAC partner key of an aes-cbc-hmac
// KEK: a token secret key of type keyType with the same label and the same CKA_ID.
func macKeyTemplate(keyType uint, label string, ckaID []byte) []*pkcs11.Attribute {
	return []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, keyType),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_ID, ckaID),
	}
}

// findMACKeys finds the HMAC partner keys (every type in macKeyTypes) of the AES key
// (label, ckaID).
func findMACKeys(c p11, sh pkcs11.SessionHandle, label string, ckaID []byte) ([]pkcs11.ObjectHandle, error) {
	var all []pkcs11.ObjectHandle
	for _, kt := range macKeyTypes {
		hs, err := findObjects(c, sh, macKeyTemplate(kt, label, ckaID))
		if err != nil {
			return nil, err
		}
		all = append(all, hs...)
	}
	return all, nil
}

// selectMACKey finds the HMAC partner key of the AES key (label, ckaID): 0 if there is
// none, an error if there are several or its attributes are unsafe (the same rules as
// for the AES key, with allowUnsafe standing for Config.AllowExtractable).
func selectMACKey(c p11, sh pkcs11.SessionHandle, tokenLabel, label string, ckaID []byte, allowUnsafe bool) (pkcs11.ObjectHandle, error) {
	hs, err := findMACKeys(c, sh, label, ckaID)
	if err != nil {
		return 0, err
	}
	switch len(hs) {
	case 0:
		return 0, nil
	case 1:
	default:
		return 0, fmt.Errorf("hsm: %d HMAC keys labelled %q with CKA_ID %x on token %q: %w", len(hs), label, ckaID, tokenLabel, ErrKeyAmbiguous)
	}
	ki, _, err := readKeyInfo(c, sh, hs[0])
	if err != nil {
		return 0, err
	}
	if reason := ki.unsafeReason(); reason != "" && (!allowUnsafe || !ki.acceptableWithOverride()) {
		return 0, fmt.Errorf("hsm: HMAC key labelled %q with CKA_ID %x on token %q refused: %s: %w", label, ckaID, tokenLabel, reason, ErrUnsafeKey)
	}
	return hs[0], nil
}

// adminSession opens the token cfg selects, logs in, opens a session (read-write if rw)
// and runs fn. It is the common part of CreateKey, ListKeys and DestroyKey.
func adminSession(ctx context.Context, cfg Config, rw bool, fn func(t *token, sh pkcs11.SessionHandle) error) (err error) {
	t, err := acquireAdminToken(ctx, cfg)
	if err != nil {
		return err
	}
	defer func() {
		if rerr := releaseToken(t); rerr != nil && err == nil {
			err = rerr
		}
	}()
	t.mod.gate.RLock()
	defer t.mod.gate.RUnlock()
	return withSession(t, rw, fn)
}

// acquireAdminToken validates cfg, reads its PIN and takes a token reference (see
// acquireToken). It takes the module's Open/Close lock while it selects the token and
// logs in, so callers must not be inside another acquireToken or releaseToken.
func acquireAdminToken(ctx context.Context, cfg Config) (*token, error) {
	if err := cfg.Validate(""); err != nil {
		return nil, fmt.Errorf("hsm: invalid config: %w", err)
	}
	pin, err := cfg.readPIN()
	if err != nil {
		return nil, err
	}
	return acquireToken(ctx, cfg, pin)
}

// withSession opens a session on t (read-write if rw), runs fn and closes it. The
// caller holds t.mod.gate for reading.
func withSession(t *token, rw bool, fn func(t *token, sh pkcs11.SessionHandle) error) error {
	flags := uint(pkcs11.CKF_SERIAL_SESSION)
	if rw {
		flags |= pkcs11.CKF_RW_SESSION
	}
	sh, err := t.ctx.OpenSession(t.slot, flags)
	if err != nil {
		return tokenError(t, opError{op: "C_OpenSession", err: err})
	}
	defer t.ctx.CloseSession(sh) //nolint:errcheck // the session holds nothing we need
	if err := fn(t, sh); err != nil {
		return asTokenError(t, err)
	}
	return nil
}

// CreateKey generates a KEK on the token selected by cfg for cfg.Mechanism (doc.go,
// "Mechanisms"): an AES-256 key with C_GenerateKey (CKM_AES_KEY_GEN) and the template
// CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE true; CKA_EXTRACTABLE false; CKA_ENCRYPT and
// CKA_DECRYPT true; CKA_WRAP, CKA_UNWRAP, CKA_SIGN, CKA_VERIFY, CKA_DERIVE false;
// CKA_LABEL cfg.KeyLabel; a random 16-byte CKA_ID; and CKA_MODIFIABLE and CKA_COPYABLE
// false where the token allows (withLocks: without CKA_COPYABLE, then without both,
// if the token refuses them; the returned KeyInfo's Modifiable and Copyable, and
// AttributeWarning, report what the token kept). For aes-cbc-hmac (named, or chosen
// by auto on a token without a usable GCM) it also makes the HMAC key: a 32-byte
// CKK_GENERIC_SECRET (CKM_GENERIC_SECRET_KEY_GEN) with the same label and CKA_ID,
// CKA_SIGN and CKA_VERIFY true and every other usage false. It then opens the key as
// Open would, which probes the mechanism and runs a round trip, and destroys what it
// made if that fails. It refuses (kek.ErrKeyExists) if any object labelled
// cfg.KeyLabel exists, and refuses a cfg with KeyCKAID set (the CKA_ID must be fresh
// and random). It reads the attributes back and destroys the key again if the token
// did not honour them.
// Once the creating session is gone it finds the key objects again from a new
// session and fails with ErrNotStored if the token did not store them (persist.go).
//
// The existence check and the creation are not atomic: two concurrent CreateKey calls
// with the same label on different hosts may both succeed; Open then reports ambiguity.
func CreateKey(ctx context.Context, cfg Config) (KeyInfo, error) {
	cfg = cfg.Resolved()
	if cfg.KeyCKAID != "" {
		return KeyInfo{}, errors.New("hsm: keyCKAID must not be set when creating a key: a random CKA_ID is generated")
	}
	auto := cfg.Mechanism == "" || cfg.Mechanism == MechanismAuto
	withMAC := cfg.Mechanism == MechanismAESCBCHMAC
	rsa := cfg.Mechanism == MechanismRSAOAEP
	var (
		ki      KeyInfo
		id      []byte
		cbcOK   bool
		made    []pkcs11.ObjectHandle
		tokName string
	)
	err := adminSession(ctx, cfg, true, func(t *token, sh pkcs11.SessionHandle) error {
		tokName = t.label
		existing, err := findObjects(t.ctx, sh, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, cfg.KeyLabel)})
		if err != nil {
			return err
		}
		if len(existing) > 0 {
			return fmt.Errorf("hsm: token %q already has %d object(s) labelled %q: %w", t.label, len(existing), cfg.KeyLabel, kek.ErrKeyExists)
		}
		if auto {
			gcm, err := mechanismProblems(t, MechanismAESGCM, pkcs11.CKM_AES_GCM)
			if err != nil {
				return err
			}
			cbc, err := mechanismProblems(t, MechanismAESCBCHMAC, 0)
			if err != nil {
				return err
			}
			cbcOK = cbc == ""
			withMAC = gcm != "" && cbcOK
		} else {
			gcmType := uint(pkcs11.CKM_AES_GCM)
			if cfg.GCMMechanism != 0 {
				gcmType = cfg.GCMMechanism
			}
			problem, err := mechanismProblems(t, cfg.Mechanism, gcmType)
			if err != nil {
				return err
			}
			if problem != "" {
				return fmt.Errorf("hsm: token %q has no usable mechanism for key %q: %s: %s: %w", t.label, cfg.KeyLabel, cfg.Mechanism, problem, ErrNoMechanism)
			}
		}
		id = make([]byte, 16)
		if _, err := rand.Read(id); err != nil {
			return fmt.Errorf("hsm: generating CKA_ID: %w", err)
		}
		if rsa {
			if err := generateRSAPair(t, sh, cfg.KeyLabel, id); err != nil {
				return err
			}
			made = append(made, 0) // destroyed by label and CKA_ID if the probe fails
			_, _, ki, _, err = selectRSAKeys(t.ctx, sh, t.label, cfg.KeyLabel, id, false)
			return err
		}
		h, err := generateKEKPart(t, sh, cfg.KeyLabel, id, false)
		if err != nil {
			return err
		}
		made = append(made, h)
		if ki, _, err = readKeyInfo(t.ctx, sh, h); err != nil {
			return err
		}
		if withMAC {
			mh, err := generateKEKPart(t, sh, cfg.KeyLabel, id, true)
			if err != nil {
				return err
			}
			made = append(made, mh)
		}
		return nil
	})
	if err == nil {
		want := len(made) // the AES key, and its HMAC key for aes-cbc-hmac
		if rsa {
			want = 2 // the private and the public key
		}
		err = verifyStored(ctx, cfg, id, want)
	}
	if err == nil {
		var mech string
		mech, err = probeCreated(ctx, cfg, id)
		if errors.Is(err, ErrNoMechanism) && auto && !withMAC && cbcOK {
			// GCM is offered but failed its round trip: fall back to aes-cbc-hmac.
			err = adminSession(ctx, cfg, true, func(t *token, sh pkcs11.SessionHandle) error {
				mh, err := generateKEKPart(t, sh, cfg.KeyLabel, id, true)
				if err == nil {
					made = append(made, mh)
				}
				return err
			})
			if err == nil {
				mech, err = probeCreated(ctx, cfg, id)
			}
		}
		if mech == MechanismAESCBCHMAC || mech == MechanismRSAOAEP {
			ki.Mechanism = mech
		}
	}
	if err != nil && len(made) > 0 {
		if derr := destroyByID(ctx, cfg, id); derr != nil {
			return KeyInfo{}, errors.Join(err, fmt.Errorf("hsm: destroying the new key objects labelled %q (CKA_ID %x) on token %q failed; destroy them by hand: %w", cfg.KeyLabel, id, tokName, derr))
		}
	}
	if err != nil {
		return KeyInfo{}, err
	}
	return ki, nil
}

// generateKEKPart generates one token key of a KEK: the AES-256 key, or (mac) the
// 32-byte generic secret HMAC key, with label and id, reads its attributes back and
// destroys it again if the token did not honour the template.
func generateKEKPart(t *token, sh pkcs11.SessionHandle, label string, id []byte, mac bool) (pkcs11.ObjectHandle, error) {
	gen, kt, enc, sig := uint(pkcs11.CKM_AES_KEY_GEN), uint(pkcs11.CKK_AES), true, false
	if mac {
		gen, kt, enc, sig = pkcs11.CKM_GENERIC_SECRET_KEY_GEN, pkcs11.CKK_GENERIC_SECRET, false, true
	}
	tmpl := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, kt),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, enc),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, enc),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, sig),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, sig),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_ID, id),
	}
	var h pkcs11.ObjectHandle
	err := withLocks(func(lock []*pkcs11.Attribute) error {
		var err error
		h, err = t.ctx.GenerateKey(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(gen, nil)}, append(tmpl[:len(tmpl):len(tmpl)], lock...))
		return err
	})
	if err != nil {
		return 0, opError{op: "C_GenerateKey", err: err}
	}
	ki, _, err := readKeyInfo(t.ctx, sh, h)
	if err == nil && !ki.Safe() {
		err = fmt.Errorf("hsm: token %q did not honour the key template: %s: %w", t.label, ki.unsafeReason(), ErrUnsafeKey)
	}
	if err != nil {
		if derr := t.ctx.DestroyObject(sh, h); derr != nil {
			return 0, errors.Join(err, fmt.Errorf("hsm: C_DestroyObject of the new key failed; destroy it by hand: %w", derr))
		}
		return 0, err
	}
	return h, nil
}

// probeCreated opens the key just created (label and id) as Open would, which
// chooses the mechanism and runs a round trip, and returns the mechanism's name.
func probeCreated(ctx context.Context, cfg Config, id []byte) (string, error) {
	cfg.KeyCKAID = hex.EncodeToString(id)
	k, err := Open(ctx, cfg)
	if err != nil {
		return "", err
	}
	name := k.Mechanism()
	return name, k.Close()
}

// destroyByID destroys every object labelled cfg.KeyLabel with CKA_ID id: the key
// objects a failed CreateKey made (the CKA_ID is fresh and random, so nothing else).
func destroyByID(ctx context.Context, cfg Config, id []byte) error {
	return adminSession(ctx, cfg, true, func(t *token, sh pkcs11.SessionHandle) error {
		hs, err := findObjects(t.ctx, sh, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, cfg.KeyLabel),
			pkcs11.NewAttribute(pkcs11.CKA_ID, id),
		})
		if err != nil {
			return err
		}
		var errs []error
		for _, h := range hs {
			if err := t.ctx.DestroyObject(sh, h); err != nil {
				errs = append(errs, opError{op: "C_DestroyObject", err: err})
			}
		}
		return errors.Join(errs...)
	})
}

// ListKeys lists the AES secret token keys on the token selected by cfg (KeyLabel and
// KeyCKAID are ignored), sorted by label then CKA_ID. It logs in to see private keys.
func ListKeys(ctx context.Context, cfg Config) ([]KeyInfo, error) {
	cfg = cfg.Resolved()
	if cfg.KeyLabel == "" {
		cfg.KeyLabel = "-" // not used; keeps Validate from complaining
	}
	var out []KeyInfo
	err := adminSession(ctx, cfg, false, func(t *token, sh pkcs11.SessionHandle) error {
		hs, err := findObjects(t.ctx, sh, keyTemplate("", nil))
		if err != nil {
			return err
		}
		for _, h := range hs {
			ki, id, err := readKeyInfo(t.ctx, sh, h)
			if err != nil {
				return err
			}
			macs, err := findMACKeys(t.ctx, sh, ki.Label, id)
			if err != nil {
				return err
			}
			if len(macs) > 0 {
				ki.Mechanism = MechanismAESCBCHMAC
			}
			out = append(out, ki)
		}
		rs, err := findObjects(t.ctx, sh, rsaKeyTemplate(pkcs11.CKO_PRIVATE_KEY, "", nil))
		if err != nil {
			return err
		}
		for _, h := range rs {
			ki, _, err := readKeyInfo(t.ctx, sh, h)
			if err != nil {
				return err
			}
			ki.Mechanism = MechanismRSAOAEP
			out = append(out, ki)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Label != out[j].Label {
			return out[i].Label < out[j].Label
		}
		return out[i].CKAID < out[j].CKAID
	})
	return out, nil
}

// DestroyKey destroys, with C_DestroyObject, the one AES secret key selected by
// cfg.KeyLabel and (if set) cfg.KeyCKAID, and its HMAC partner keys (same label and
// CKA_ID) if it is an aes-cbc-hmac key (both halves of an rsa-oaep key). It refuses
// when the selection is ambiguous. Data wrapped by the key can no longer be unwrapped
// with this token's copy. It can still be unwrapped wherever another copy of the key
// lives: a key made by CreateReplicableKey and copied by ReplicateKey, or one the HSM
// cloned or backed up itself, stays usable on every other token that holds it, so
// destroying one copy does not make the data unreadable.
func DestroyKey(ctx context.Context, cfg Config) error {
	cfg = cfg.Resolved()
	return adminSession(ctx, cfg, true, func(t *token, sh pkcs11.SessionHandle) error {
		h, _, id, err := selectKey(t.ctx, sh, t.label, cfg.KeyLabel, cfg.ckaID(), true)
		if errors.Is(err, kek.ErrKeyNotFound) {
			// An rsa-oaep key: the private and the public key.
			priv, pub, _, _, rerr := selectRSAKeys(t.ctx, sh, t.label, cfg.KeyLabel, cfg.ckaID(), true)
			if rerr == nil {
				return destroyQuiet(t, sh, priv, pub)
			}
			if !errors.Is(rerr, kek.ErrKeyNotFound) {
				return rerr
			}
		}
		if err != nil {
			return err
		}
		macs, err := findMACKeys(t.ctx, sh, cfg.KeyLabel, id)
		if err != nil {
			return err
		}
		if err := t.ctx.DestroyObject(sh, h); err != nil {
			return opError{op: "C_DestroyObject", err: err}
		}
		for _, mh := range macs {
			if err := t.ctx.DestroyObject(sh, mh); err != nil {
				return fmt.Errorf("hsm: the AES key is destroyed but its HMAC key is not; destroy it by hand: %w", opError{op: "C_DestroyObject", err: err})
			}
		}
		return nil
	})
}
