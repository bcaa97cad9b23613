package hsm

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"

	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/miekg/pkcs11"
)

// Mechanism names, the values of Config.Mechanism (doc.go, "Mechanisms").
const (
	// MechanismAuto picks the first usable of MechanismAESGCM, MechanismAESGCMTokenIV
	// and MechanismAESCBCHMAC at Open and CreateKey. It is the default.
	MechanismAuto = "auto"
	// MechanismAESGCM is CKM_AES_GCM with an IV from hwkms: body version 0x01.
	MechanismAESGCM = "aes-gcm"
	// MechanismAESGCMTokenIV is CKM_AES_GCM (or Config.GCMMechanism) with an IV the
	// token generates: body version 0x02.
	MechanismAESGCMTokenIV = "aes-gcm-token-iv"
	// MechanismAESCBCHMAC is CKM_AES_CBC_PAD then CKM_SHA256_HMAC over the result
	// (encrypt-then-MAC) with two token keys: body version 0x03.
	MechanismAESCBCHMAC = "aes-cbc-hmac"
)

var mechanismNames = []string{MechanismAuto, MechanismAESGCM, MechanismAESGCMTokenIV, MechanismAESCBCHMAC, MechanismRSAOAEP}

// Errors about mechanisms.
var (
	// ErrNoMechanism means the token offers no usable mechanism for the key (or not
	// the one Config.Mechanism names). The message lists what is missing.
	ErrNoMechanism = errors.New("no usable wrapping mechanism")
	// ErrIVNotKept means a GCM IV was not what the mechanism needs: a token replaced
	// hwkms's IV (aes-gcm), or did not generate one (aes-gcm-token-iv: the IV buffer
	// came back zero or unchanged and nothing was appended). No body is returned.
	ErrIVNotKept = errors.New("token did not handle the GCM IV as the mechanism requires")
)

// Body versions after 0x01 (mechAESGCM, kek.go). Stored in etcd: never change meaning.
const (
	// mechAESGCMTokenIV: 0x02 | mechanism u32 | ivLen u8 | IV | ciphertext || tag.
	mechAESGCMTokenIV byte = 0x02
	// mechAESCBCHMAC: 0x03 | IV(16) | CBC-PAD ciphertext | HMAC-SHA256(32).
	mechAESCBCHMAC byte = 0x03

	tokenIVHeader  = 1 + 4 + 1
	tokenIVMinBody = tokenIVHeader + gcmIVSize + 1 + gcmTagSize
	tokenIVMaxBody = tokenIVHeader + 16 + kek.MaxPlaintext + gcmTagSize

	cbcIVSize  = 16
	cbcBlock   = 16
	macSize    = 32
	cbcMinBody = 1 + cbcIVSize + cbcBlock + macSize
	cbcMaxBody = 1 + cbcIVSize + (kek.MaxPlaintext/cbcBlock+1)*cbcBlock + macSize
)

// cbcMACDomain starts every aes-cbc-hmac MAC input, separating it from any other
// use of the HMAC key.
const cbcMACDomain = "hwkms/pkcs11/aes-cbc-hmac\x00"

// mechanism is the chosen way a KEK wraps.
type mechanism struct {
	name    string // one of the Mechanism* names other than auto; "" before Open chose
	gcmType uint   // aes-gcm-token-iv: CKM_AES_GCM or Config.GCMMechanism
	// cbc is how version 0x03 bodies are decrypted (cbc_decrypt.go): CKM_AES_CBC_PAD
	// unless the aes-cbc-hmac round trip at Open needed CKM_AES_CBC.
	cbc cbcDecrypt
}

// Mechanism returns the name of the mechanism the KEK wraps with (MechanismAESGCM,
// MechanismAESGCMTokenIV or MechanismAESCBCHMAC), chosen at Open. It never touches the
// token and is valid after Close. Unwrap reads every body version whatever it is.
func (k *KEK) Mechanism() string { return k.mech.name }

// requirement is one PKCS#11 mechanism a hwkms mechanism needs, with the flags.
type requirement struct {
	name  string
	mt    uint
	flags uint
	bits  int // key size in bits that must be in range, 0: not checked
}

// requirements lists what the token must offer for mechanism name.
func requirements(name string, gcmType uint) []requirement {
	ed := uint(pkcs11.CKF_ENCRYPT | pkcs11.CKF_DECRYPT)
	switch name {
	case MechanismAESGCM:
		return []requirement{{"CKM_AES_GCM", pkcs11.CKM_AES_GCM, ed, 256}}
	case MechanismAESGCMTokenIV:
		n := "CKM_AES_GCM"
		if gcmType != pkcs11.CKM_AES_GCM {
			n = fmt.Sprintf("GCM mechanism 0x%08x", gcmType)
		}
		return []requirement{{n, gcmType, ed, 256}}
	case MechanismAESCBCHMAC:
		return []requirement{
			{"CKM_AES_CBC_PAD", pkcs11.CKM_AES_CBC_PAD, ed, 256},
			{"CKM_SHA256_HMAC", pkcs11.CKM_SHA256_HMAC, pkcs11.CKF_SIGN, 0},
		}
	case MechanismRSAOAEP:
		return []requirement{{"CKM_RSA_PKCS_OAEP", pkcs11.CKM_RSA_PKCS_OAEP, ed, 0}}
	}
	return nil
}

// mechanismProblems asks the token (C_GetMechanismInfo) for each requirement of name
// and describes what is missing or lacking, "" if nothing. A device-class error is
// returned as an error. The caller holds t.mod.gate for reading.
func mechanismProblems(t *token, name string, gcmType uint) (string, error) {
	var missing, present []string
	for _, r := range requirements(name, gcmType) {
		info, err := t.ctx.GetMechanismInfo(t.slot, []*pkcs11.Mechanism{pkcs11.NewMechanism(r.mt, nil)})
		switch {
		case isRV(err, pkcs11.CKR_MECHANISM_INVALID):
			missing = append(missing, r.name+" missing")
			continue
		case err != nil && classify(err) != rvOther:
			return "", tokenError(t, opError{op: "C_GetMechanismInfo", err: err})
		case err != nil:
			missing = append(missing, fmt.Sprintf("%s: C_GetMechanismInfo: %v", r.name, err))
			continue
		case info.Flags&r.flags != r.flags:
			missing = append(missing, fmt.Sprintf("%s present but without the flags 0x%x it needs (has 0x%x)", r.name, r.flags, info.Flags))
			continue
		case r.bits != 0 && info.MaxKeySize != 0 && !keySizeIn(r.bits, info.MinKeySize, info.MaxKeySize):
			missing = append(missing, fmt.Sprintf("%s present but for key sizes %d..%d, not AES-256", r.name, info.MinKeySize, info.MaxKeySize))
			continue
		}
		present = append(present, r.name+" present")
	}
	if len(missing) == 0 {
		return "", nil
	}
	return strings.Join(append(missing, present...), ", "), nil
}

// keySizeIn reports whether bits fits [lo, hi], which tokens give in bits or in bytes.
func keySizeIn(bits int, lo, hi uint) bool {
	b, B := uint(bits), uint(bits/8)
	return (lo <= b && b <= hi) || (lo <= B && B <= hi)
}

// choose picks the KEK's mechanism (doc.go, "Mechanisms"): the one cfg names, or for
// auto the first of aes-gcm, aes-gcm-token-iv and aes-cbc-hmac (only for a key with
// an HMAC partner key) that the token offers and that passes a round trip. A
// device-class failure is returned as is; otherwise, if none is usable, one error
// wrapping ErrNoMechanism names what each candidate lacks.
func (k *KEK) choose(ctx context.Context, cfg Config) error {
	cands := []string{MechanismAESGCM, MechanismAESGCMTokenIV, MechanismAESCBCHMAC}
	auto := cfg.Mechanism == "" || cfg.Mechanism == MechanismAuto
	if !auto {
		cands = []string{cfg.Mechanism}
	}
	gcmType := uint(pkcs11.CKM_AES_GCM)
	if cfg.GCMMechanism != 0 {
		gcmType = cfg.GCMMechanism
	}
	var problems []string
	for _, name := range cands {
		k.tok.mod.gate.RLock()
		problem, err := mechanismProblems(k.tok, name, gcmType)
		k.tok.mod.gate.RUnlock()
		if err != nil {
			return err
		}
		if problem == "" && name == MechanismAESCBCHMAC && !k.hasMAC {
			problem = fmt.Sprintf("no HMAC key (CKK_GENERIC_SECRET or CKK_SHA256_HMAC) labelled %q with the key's CKA_ID; create the key with mechanism %s", k.keyLabel, MechanismAESCBCHMAC)
		}
		if problem == "" {
			k.mech = mechanism{name: name, gcmType: gcmType}
			body, err := k.roundTrip(ctx)
			if err != nil && name == MechanismRSAOAEP && !errors.Is(err, kek.ErrUnavailable) && ctx.Err() == nil {
				// SHA-256 OAEP first; tokens such as SoftHSM2 2.6.1 have only SHA-1.
				k.oaepHash = oaepSHA1
				body, err = k.roundTrip(ctx)
			}
			if err != nil && name == MechanismAESCBCHMAC && cbcPadDecryptFailed(err) && ctx.Err() == nil {
				// The token encrypted and MACed, but its CKM_AES_CBC_PAD decrypt failed
				// (tpm2-pkcs11 above 32 bytes): decrypt with CKM_AES_CBC instead.
				k.mech.cbc = cbcDecryptRaw
				var err2 error
				if body, err2 = k.roundTrip(ctx); err2 != nil {
					err = fmt.Errorf("%w; with %s instead: %w", err, cbcDecryptRaw, err2)
				} else {
					err = nil
				}
			}
			if err == nil {
				k.keyMu.Lock()
				k.probe = body // the same-key probe (sameKey)
				k.keyMu.Unlock()
				return nil
			}
			if errors.Is(err, kek.ErrUnavailable) || errors.Is(err, kek.ErrClosed) || ctx.Err() != nil {
				k.mech = mechanism{}
				return fmt.Errorf("hsm: round trip with mechanism %s on token %q: %w", name, k.tok.label, err)
			}
			problem = fmt.Sprintf("round trip failed: %v", err)
		}
		problems = append(problems, name+": "+problem)
	}
	k.mech = mechanism{}
	if auto {
		k.tok.mod.gate.RLock()
		problem, err := mechanismProblems(k.tok, MechanismRSAOAEP, 0)
		k.tok.mod.gate.RUnlock()
		if err == nil && problem == "" {
			problems = append(problems, MechanismRSAOAEP+": CKM_RSA_PKCS_OAEP available, but auto never chooses it: name it in config (and create an RSA key for it)")
		}
	}
	return fmt.Errorf("hsm: token %q has no usable mechanism for key %q: %s: %w",
		k.tok.label, k.keyLabel, strings.Join(problems, "; "), ErrNoMechanism)
}

// wrapGCMTokenIV makes a version 0x02 body: GCM (k.mech.gcmType) with a zeroed 12-byte
// IV buffer (ulIvLen 12, ulIvBits 96) for the token to fill, aad and a 128-bit tag. The
// IV is the one the token wrote back into the buffer, or the 12 or 16 bytes it appended
// to the output; a zero or unchanged IV is refused (ErrIVNotKept), since the token
// would then have encrypted with an all-zero IV.
func (k *KEK) wrapGCMTokenIV(ctx context.Context, plaintext, aad []byte) ([]byte, error) {
	mt := k.mech.gcmType
	var iv, ct []byte
	err := k.run(ctx, func(c p11, sh pkcs11.SessionHandle, keys keyHandles) error {
		params := pkcs11.NewGCMParams(make([]byte, gcmIVSize), aad, gcmTagSize*8)
		defer params.Free()
		if err := c.EncryptInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(mt, params)}, keys.enc); err != nil {
			return opError{op: "C_EncryptInit", err: err}
		}
		out, err := c.Encrypt(sh, plaintext)
		if err != nil {
			return opError{op: "C_Encrypt", err: err}
		}
		iv, ct, err = splitTokenIV(params.IV(), out, len(plaintext))
		if err != nil {
			return fmt.Errorf("hsm: token %q: %w", k.tok.label, err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	body := make([]byte, tokenIVHeader, tokenIVHeader+len(iv)+len(ct))
	body[0] = mechAESGCMTokenIV
	binary.BigEndian.PutUint32(body[1:5], uint32(mt))
	body[5] = byte(len(iv))
	body = append(body, iv...)
	return append(body, ct...), nil
}

// splitTokenIV finds the IV a token generated for n bytes of plaintext: written back
// into the 12-byte buffer (CloudHSM, ProtectServer, Cloud KMS), or appended to the
// ciphertext || tag output (Luna before firmware 7.9.3, 16 bytes).
func splitTokenIV(written, out []byte, n int) (iv, ct []byte, err error) {
	want := n + gcmTagSize
	wroteIV := len(written) == gcmIVSize && !allZero(written)
	switch extra := len(out) - want; {
	case extra == 0 && wroteIV:
		return written, out, nil
	case extra == 0:
		return nil, nil, fmt.Errorf("the GCM IV buffer came back zero and no IV was appended: the token used the all-zero IV instead of generating one; refusing the ciphertext (use mechanism %s): %w", MechanismAESGCM, ErrIVNotKept)
	case (extra == gcmIVSize || extra == 16) && !wroteIV:
		iv = out[want:]
		if allZero(iv) {
			return nil, nil, fmt.Errorf("the token appended an all-zero GCM IV: %w", ErrIVNotKept)
		}
		return iv, out[:want], nil
	case wroteIV:
		return nil, nil, fmt.Errorf("the token both wrote an IV back and returned %d extra bytes: %w", extra, ErrIVNotKept)
	}
	return nil, nil, fmt.Errorf("C_Encrypt returned %d bytes for %d bytes of plaintext, want %d (+12 or +16 with an appended IV): %w",
		len(out), n, want, ErrIVNotKept)
}

// decryptInitError classifies a C_DecryptInit failure for a body: the mechanism and
// its parameters come from the body, so a token that refuses them for this key
// (CKR_MECHANISM_INVALID, CKR_MECHANISM_PARAM_INVALID, CKR_KEY_TYPE_INCONSISTENT,
// CKR_KEY_FUNCTION_NOT_PERMITTED) cannot decrypt the body with this key, ever: the
// body is not one this key made here (kek.ErrInvalidCiphertext). Other errors take
// the usual path.
func decryptInitError(t *token, err error) error {
	// CKR_ARGUMENTS_BAD too: the parameters come from the body (SoftHSM2 2.6.1 answers it
	// for SHA-256 OAEP, which it lacks), so a token refusing them is refusing the body.
	if isRV(err, pkcs11.CKR_MECHANISM_INVALID, pkcs11.CKR_MECHANISM_PARAM_INVALID, pkcs11.CKR_ARGUMENTS_BAD, pkcs11.CKR_KEY_TYPE_INCONSISTENT, pkcs11.CKR_KEY_FUNCTION_NOT_PERMITTED) {
		return fmt.Errorf("hsm: C_DecryptInit on token %q refused the body's mechanism for this key: %w: %w", t.label, kek.ErrInvalidCiphertext, err)
	}
	return opError{op: "C_DecryptInit", err: err}
}

func allZero(b []byte) bool {
	var acc byte
	for _, x := range b {
		acc |= x
	}
	return acc == 0
}

// parseTokenIVBody checks a version 0x02 body without touching the token: its length,
// its mechanism (CKM_AES_GCM or the configured vendor GCM mechanism, nothing else: a
// body cannot choose how the key is used), its IV length (12 or 16) and a non-zero IV.
func (k *KEK) parseTokenIVBody(body []byte) (mt uint, iv, ct []byte, err error) {
	if len(body) < tokenIVMinBody || len(body) > tokenIVMaxBody {
		return 0, nil, nil, fmt.Errorf("hsm: body version 0x02 is %d bytes, want %d..%d: %w", len(body), tokenIVMinBody, tokenIVMaxBody, kek.ErrInvalidCiphertext)
	}
	mt = uint(binary.BigEndian.Uint32(body[1:5]))
	if mt != pkcs11.CKM_AES_GCM && (k.gcmVendor == 0 || mt != k.gcmVendor) {
		return 0, nil, nil, fmt.Errorf("hsm: body version 0x02 names mechanism 0x%08x, which is neither CKM_AES_GCM nor the configured gcmMechanism: %w", mt, kek.ErrInvalidCiphertext)
	}
	ivLen := int(body[5])
	if ivLen != gcmIVSize && ivLen != 16 {
		return 0, nil, nil, fmt.Errorf("hsm: body version 0x02 has a %d-byte IV, want 12 or 16: %w", ivLen, kek.ErrInvalidCiphertext)
	}
	iv, ct = body[tokenIVHeader:tokenIVHeader+ivLen], body[tokenIVHeader+ivLen:]
	if n := len(ct) - gcmTagSize; n < 1 || n > kek.MaxPlaintext {
		return 0, nil, nil, fmt.Errorf("hsm: body version 0x02 carries %d bytes of ciphertext and tag, want %d..%d: %w", len(ct), 1+gcmTagSize, kek.MaxPlaintext+gcmTagSize, kek.ErrInvalidCiphertext)
	}
	if allZero(iv) {
		return 0, nil, nil, fmt.Errorf("hsm: body version 0x02 has an all-zero IV: %w", kek.ErrInvalidCiphertext)
	}
	return mt, iv, ct, nil
}

// cbcMACInput is what the HMAC of a version 0x03 body covers: every field, each
// variable one with its length.
func cbcMACInput(iv, ct, aad []byte) []byte {
	in := make([]byte, 0, len(cbcMACDomain)+1+4+len(aad)+len(iv)+4+len(ct))
	in = append(in, cbcMACDomain...)
	in = append(in, mechAESCBCHMAC)
	in = binary.BigEndian.AppendUint32(in, uint32(len(aad)))
	in = append(in, aad...)
	in = append(in, iv...)
	in = binary.BigEndian.AppendUint32(in, uint32(len(ct)))
	return append(in, ct...)
}

// sign computes the HMAC-SHA256 of in on the token with the HMAC key.
func sign(c p11, sh pkcs11.SessionHandle, macKey pkcs11.ObjectHandle, in []byte) ([]byte, error) {
	if err := c.SignInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_SHA256_HMAC, nil)}, macKey); err != nil {
		return nil, opError{op: "C_SignInit", err: err}
	}
	mac, err := c.Sign(sh, in)
	if err != nil {
		return nil, opError{op: "C_Sign", err: err}
	}
	if len(mac) != macSize {
		return nil, fmt.Errorf("hsm: C_Sign with CKM_SHA256_HMAC returned %d bytes, want %d", len(mac), macSize)
	}
	return mac, nil
}

// wrapCBCHMAC makes a version 0x03 body: CKM_AES_CBC_PAD with a random 16-byte IV from
// crypto/rand under the AES key, then CKM_SHA256_HMAC (C_Sign) under the HMAC key over
// cbcMACInput: 0x03 | IV | ciphertext | MAC.
func (k *KEK) wrapCBCHMAC(ctx context.Context, plaintext, aad []byte) ([]byte, error) {
	if !k.hasMAC {
		return nil, fmt.Errorf("hsm: key %q has no HMAC key: %w", k.keyLabel, ErrNoMechanism)
	}
	iv := make([]byte, cbcIVSize)
	if _, err := rand.Read(iv); err != nil {
		return nil, fmt.Errorf("hsm: generating IV: %w", err)
	}
	want := (len(plaintext)/cbcBlock + 1) * cbcBlock
	var ct, mac []byte
	err := k.run(ctx, func(c p11, sh pkcs11.SessionHandle, keys keyHandles) error {
		if err := c.EncryptInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_CBC_PAD, iv)}, keys.enc); err != nil {
			return opError{op: "C_EncryptInit", err: err}
		}
		out, err := c.Encrypt(sh, plaintext)
		if err != nil {
			return opError{op: "C_Encrypt", err: err}
		}
		if len(out) != want {
			return fmt.Errorf("hsm: C_Encrypt (CKM_AES_CBC_PAD) on token %q returned %d bytes for %d bytes of plaintext, want %d",
				k.tok.label, len(out), len(plaintext), want)
		}
		m, err := sign(c, sh, keys.mac, cbcMACInput(iv, out, aad))
		if err != nil {
			return err
		}
		ct, mac = out, m
		return nil
	})
	if err != nil {
		return nil, err
	}
	body := make([]byte, 0, 1+cbcIVSize+len(ct)+macSize)
	body = append(body, mechAESCBCHMAC)
	body = append(body, iv...)
	body = append(body, ct...)
	return append(body, mac...), nil
}

// checkCBCBody checks a version 0x03 body's length without touching the token.
func (k *KEK) checkCBCBody(body []byte) error {
	if len(body) < cbcMinBody || len(body) > cbcMaxBody || (len(body)-1-cbcIVSize-macSize)%cbcBlock != 0 {
		return fmt.Errorf("hsm: body version 0x03 is %d bytes, want %d..%d with whole 16-byte blocks: %w", len(body), cbcMinBody, cbcMaxBody, kek.ErrInvalidCiphertext)
	}
	if !k.hasMAC {
		return fmt.Errorf("hsm: body version 0x03 needs an HMAC key, and key %q has none: %w", k.keyLabel, kek.ErrInvalidCiphertext)
	}
	return nil
}

// unwrapCBCHMAC checks the MAC of a version 0x03 body on the token (C_Sign, compared
// in constant time) before anything is decrypted, then decrypts with CKM_AES_CBC_PAD,
// or with CKM_AES_CBC and the padding removed here if Open chose that (cbc_decrypt.go).
// A MAC mismatch, bad padding or a plaintext of a length Wrap never makes is
// kek.ErrInvalidCiphertext; device-class errors take the usual recovery.
func (k *KEK) unwrapCBCHMAC(ctx context.Context, body, aad []byte) ([]byte, error) {
	iv := body[1 : 1+cbcIVSize]
	ct := body[1+cbcIVSize : len(body)-macSize]
	tag := body[len(body)-macSize:]
	var pt []byte
	err := k.run(ctx, func(c p11, sh pkcs11.SessionHandle, keys keyHandles) error {
		mac, err := sign(c, sh, keys.mac, cbcMACInput(iv, ct, aad))
		if err != nil {
			return err
		}
		if subtle.ConstantTimeCompare(mac, tag) != 1 {
			return fmt.Errorf("hsm: body version 0x03: HMAC does not verify: %w", kek.ErrInvalidCiphertext)
		}
		strategy := k.mech.cbc
		if err := c.DecryptInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(strategy.mechanism(), iv)}, keys.enc); err != nil {
			return opError{op: "C_DecryptInit", err: err}
		}
		// One C_Decrypt into len(ct) bytes: tpm2-pkcs11's length query consumes CBC
		// state, and the call after it returns wrong plaintext (rawcall.go).
		out, err := c.DecryptOnce(sh, ct, len(ct))
		if err != nil {
			if isRV(err, pkcs11.CKR_ENCRYPTED_DATA_INVALID, pkcs11.CKR_ENCRYPTED_DATA_LEN_RANGE) {
				return fmt.Errorf("hsm: C_Decrypt (%s) on token %q: %w: %w", strategy, k.tok.label, kek.ErrInvalidCiphertext, err)
			}
			if strategy == cbcDecryptPad {
				err = cbcPadDecryptError{err}
			}
			return opError{op: "C_Decrypt", err: err}
		}
		if strategy == cbcDecryptRaw {
			if out, err = unpadPKCS7(out); err != nil {
				return err
			}
		}
		pt = out
		return nil
	})
	if err != nil {
		return nil, err
	}
	if n := len(pt); n < 1 || n > kek.MaxPlaintext || (n/cbcBlock+1)*cbcBlock != len(ct) {
		return nil, fmt.Errorf("hsm: body version 0x03 decrypted to %d bytes from %d: %w", len(pt), len(ct), kek.ErrInvalidCiphertext)
	}
	return pt, nil
}
