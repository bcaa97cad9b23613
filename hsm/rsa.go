package hsm

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/miekg/pkcs11"
)

// MechanismRSAOAEP is CKM_RSA_PKCS_OAEP under an RSA key pair on the token, for tokens
// without AES: body version 0x04. It is opt-in (auto never picks it) because anyone
// with the public key can make a valid body (doc.go, "Version 0x04").
const MechanismRSAOAEP = "rsa-oaep"

// Body version 0x04: 0x04 | hash u8 | u16 len | RSA-OAEP ciphertext.
const (
	mechRSAOAEP byte = 0x04

	oaepSHA1   byte = 0x01 // OAEP hash and MGF1 hash SHA-1
	oaepSHA256 byte = 0x02 // OAEP hash and MGF1 hash SHA-256

	rsaBits       = 3072
	rsaHeader     = 1 + 1 + 2
	rsaMaxCT      = 512 // up to RSA-4096 keys made elsewhere
	rsaMinCT      = 256 // RSA-2048
	rsaAADDomain  = "hwkms/pkcs11/rsa-oaep\x00"
	rsaDigestSize = sha256.Size
)

// oaepParams returns the CK_RSA_PKCS_OAEP_PARAMS for hash id h: hash and MGF1 with the
// same SHA, CKZ_DATA_SPECIFIED with no label (SoftHSM2 2.6.1 accepts no label; the aad
// is bound inside the plaintext block instead).
func oaepParams(h byte) *pkcs11.OAEPParams {
	if h == oaepSHA256 {
		return pkcs11.NewOAEPParams(pkcs11.CKM_SHA256, pkcs11.CKG_MGF1_SHA256, pkcs11.CKZ_DATA_SPECIFIED, nil)
	}
	return pkcs11.NewOAEPParams(pkcs11.CKM_SHA_1, pkcs11.CKG_MGF1_SHA1, pkcs11.CKZ_DATA_SPECIFIED, nil)
}

// rsaAADDigest is SHA-256(domain || aad), the first 32 bytes of every RSA-OAEP
// plaintext block.
func rsaAADDigest(aad []byte) []byte {
	h := sha256.New()
	h.Write([]byte(rsaAADDomain))
	h.Write(aad)
	return h.Sum(nil)
}

// rsaKeyTemplate is the search template of the RSA key objects of a key: class is
// CKO_PRIVATE_KEY or CKO_PUBLIC_KEY.
func rsaKeyTemplate(class uint, label string, ckaID []byte) []*pkcs11.Attribute {
	t := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, class),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
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

// selectRSAKeys finds the one RSA private key labelled label (and with ckaID if
// non-nil), checks its attributes like an AES key's, and finds the one public key with
// the same label and CKA_ID and the same modulus.
func selectRSAKeys(c p11, sh pkcs11.SessionHandle, tokenLabel, label string, ckaID []byte, allowUnsafe bool) (priv, pub pkcs11.ObjectHandle, ki KeyInfo, id []byte, err error) {
	hs, err := findObjects(c, sh, rsaKeyTemplate(pkcs11.CKO_PRIVATE_KEY, label, ckaID))
	if err != nil {
		return 0, 0, KeyInfo{}, nil, err
	}
	switch {
	case len(hs) == 0:
		return 0, 0, KeyInfo{}, nil, fmt.Errorf("hsm: no RSA private key labelled %q on token %q: %w", label, tokenLabel, kek.ErrKeyNotFound)
	case len(hs) > 1:
		return 0, 0, KeyInfo{}, nil, fmt.Errorf("hsm: %d RSA private keys labelled %q on token %q: ambiguous; set keyCKAID to choose one: %w", len(hs), label, tokenLabel, ErrKeyAmbiguous)
	}
	if ki, id, err = readKeyInfo(c, sh, hs[0]); err != nil {
		return 0, 0, KeyInfo{}, nil, err
	}
	if reason := ki.unsafeReason(); reason != "" && (!allowUnsafe || !ki.acceptableWithOverride()) {
		return 0, 0, KeyInfo{}, nil, fmt.Errorf("hsm: RSA private key labelled %q on token %q refused: %s: %w", label, tokenLabel, reason, ErrUnsafeKey)
	}
	ki.Mechanism = MechanismRSAOAEP
	ps, err := findObjects(c, sh, rsaKeyTemplate(pkcs11.CKO_PUBLIC_KEY, label, id))
	if err != nil {
		return 0, 0, KeyInfo{}, nil, err
	}
	if len(ps) != 1 {
		return 0, 0, KeyInfo{}, nil, fmt.Errorf("hsm: %d RSA public keys labelled %q with CKA_ID %x on token %q, want 1: %w", len(ps), label, id, tokenLabel, kek.ErrKeyNotFound)
	}
	mod := func(h pkcs11.ObjectHandle) ([]byte, error) {
		a, err := c.GetAttributeValue(sh, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_MODULUS, nil)})
		if err != nil {
			return nil, opError{op: "C_GetAttributeValue", err: err}
		}
		return a[0].Value, nil
	}
	pm, err := mod(hs[0])
	if err != nil {
		return 0, 0, KeyInfo{}, nil, err
	}
	qm, err := mod(ps[0])
	if err != nil {
		return 0, 0, KeyInfo{}, nil, err
	}
	if len(pm) == 0 || !bytes.Equal(pm, qm) {
		return 0, 0, KeyInfo{}, nil, fmt.Errorf("hsm: the RSA public key labelled %q on token %q does not match its private key: %w", label, tokenLabel, ErrUnsafeKey)
	}
	return hs[0], ps[0], ki, id, nil
}

// rsaPublicTemplate is what an rsa-oaep key's public key is made with, whether
// generated or imported: a token object that can only encrypt, with label and id.
func rsaPublicTemplate(label string, id []byte) []*pkcs11.Attribute {
	return []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, false),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_ID, id),
	}
}

// rsaPrivateTemplate is what an rsa-oaep key's private key is made with: a private,
// sensitive, non-extractable token object that can only decrypt, with label and id.
func rsaPrivateTemplate(label string, id []byte) []*pkcs11.Attribute {
	return []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, false),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_ID, id),
	}
}

// generateRSAPair makes the RSA-3072 key pair of an rsa-oaep key with C_GenerateKeyPair
// (CKM_RSA_PKCS_KEY_PAIR_GEN): a public key that can only encrypt and a private key
// (CKA_PRIVATE, CKA_SENSITIVE true, CKA_EXTRACTABLE false) that can only decrypt,
// both with label and id.
func generateRSAPair(t *token, sh pkcs11.SessionHandle, label string, id []byte) error {
	pubT := append(rsaPublicTemplate(label, id),
		pkcs11.NewAttribute(pkcs11.CKA_MODULUS_BITS, rsaBits),
		pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, []byte{1, 0, 1}))
	privT := rsaPrivateTemplate(label, id)
	var pub, priv pkcs11.ObjectHandle
	err := withLocks(func(lock []*pkcs11.Attribute) error { // CKA_MODIFIABLE, CKA_COPYABLE false (keys.go)
		var err error
		pub, priv, err = t.ctx.GenerateKeyPair(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, nil)},
			append(pubT[:len(pubT):len(pubT)], lock...), append(privT[:len(privT):len(privT)], lock...))
		return err
	})
	if err != nil {
		return opError{op: "C_GenerateKeyPair", err: err}
	}
	ki, _, err := readKeyInfo(t.ctx, sh, priv)
	if err == nil && !ki.Safe() {
		err = fmt.Errorf("hsm: token %q did not honour the key template: %s: %w", t.label, ki.unsafeReason(), ErrUnsafeKey)
	}
	if err != nil {
		return errors.Join(err, destroyQuiet(t, sh, priv, pub))
	}
	return nil
}

func destroyQuiet(t *token, sh pkcs11.SessionHandle, hs ...pkcs11.ObjectHandle) error {
	var errs []error
	for _, h := range hs {
		if err := t.ctx.DestroyObject(sh, h); err != nil {
			errs = append(errs, fmt.Errorf("hsm: C_DestroyObject of a new key object failed; destroy it by hand: %w", err))
		}
	}
	return errors.Join(errs...)
}

// wrapRSAOAEP makes a version 0x04 body: C_Encrypt with CKM_RSA_PKCS_OAEP (hash
// k.oaepHash) under the public key of SHA-256(domain || aad) || plaintext.
func (k *KEK) wrapRSAOAEP(ctx context.Context, plaintext, aad []byte) ([]byte, error) {
	h := k.oaepHash
	block := append(rsaAADDigest(aad), plaintext...)
	var ct []byte
	err := k.run(ctx, func(c p11, sh pkcs11.SessionHandle, keys keyHandles) error {
		if err := c.EncryptInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_OAEP, oaepParams(h))}, keys.enc); err != nil {
			return opError{op: "C_EncryptInit", err: err}
		}
		out, err := c.Encrypt(sh, block)
		if err != nil {
			return opError{op: "C_Encrypt", err: err}
		}
		ct = out
		return nil
	})
	if err != nil {
		return nil, err
	}
	if len(ct) < rsaMinCT || len(ct) > rsaMaxCT {
		return nil, fmt.Errorf("hsm: C_Encrypt (CKM_RSA_PKCS_OAEP) on token %q returned %d bytes, want %d..%d", k.tok.label, len(ct), rsaMinCT, rsaMaxCT)
	}
	body := make([]byte, rsaHeader, rsaHeader+len(ct))
	body[0], body[1] = mechRSAOAEP, h
	binary.BigEndian.PutUint16(body[2:4], uint16(len(ct)))
	return append(body, ct...), nil
}

// checkRSABody checks a version 0x04 body without touching the token.
func (k *KEK) checkRSABody(body []byte) error {
	if len(body) < rsaHeader+rsaMinCT || len(body) > rsaHeader+rsaMaxCT {
		return fmt.Errorf("hsm: body version 0x04 is %d bytes, want %d..%d: %w", len(body), rsaHeader+rsaMinCT, rsaHeader+rsaMaxCT, kek.ErrInvalidCiphertext)
	}
	if body[1] != oaepSHA1 && body[1] != oaepSHA256 {
		return fmt.Errorf("hsm: body version 0x04 names OAEP hash 0x%02x: %w", body[1], kek.ErrInvalidCiphertext)
	}
	if n := int(binary.BigEndian.Uint16(body[2:4])); n != len(body)-rsaHeader {
		return fmt.Errorf("hsm: body version 0x04 says %d bytes of ciphertext and carries %d: %w", n, len(body)-rsaHeader, kek.ErrInvalidCiphertext)
	}
	if !k.rsa {
		return fmt.Errorf("hsm: body version 0x04 needs an RSA key, and key %q is an AES key: %w", k.keyLabel, kek.ErrInvalidCiphertext)
	}
	return nil
}

// unwrapRSAOAEP decrypts a version 0x04 body with the private key and checks the aad
// digest at the start of the plaintext block in constant time.
func (k *KEK) unwrapRSAOAEP(ctx context.Context, body, aad []byte) ([]byte, error) {
	h, ct := body[1], body[rsaHeader:]
	var block []byte
	err := k.run(ctx, func(c p11, sh pkcs11.SessionHandle, keys keyHandles) error {
		if err := c.DecryptInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_OAEP, oaepParams(h))}, keys.priv); err != nil {
			return decryptInitError(k.tok, err) // e.g. SHA-256 OAEP on a token with SHA-1 only
		}
		out, err := c.Decrypt(sh, ct)
		if err != nil {
			if isRV(err, pkcs11.CKR_GENERAL_ERROR, pkcs11.CKR_ENCRYPTED_DATA_INVALID, pkcs11.CKR_ENCRYPTED_DATA_LEN_RANGE) {
				return fmt.Errorf("hsm: C_Decrypt (CKM_RSA_PKCS_OAEP) on token %q: %w: %w", k.tok.label, kek.ErrInvalidCiphertext, err)
			}
			return opError{op: "C_Decrypt", err: err}
		}
		block = out
		return nil
	})
	if err != nil {
		return nil, err
	}
	n := len(block) - rsaDigestSize
	if n < 1 || n > kek.MaxPlaintext || subtle.ConstantTimeCompare(block[:rsaDigestSize], rsaAADDigest(aad)) != 1 {
		return nil, fmt.Errorf("hsm: body version 0x04 does not carry this aad's digest: %w", kek.ErrInvalidCiphertext)
	}
	return block[rsaDigestSize:], nil
}
