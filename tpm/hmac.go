package tpm

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/tpm/internal/wire"
)

// The KEK of kind hmac (Config.Kind; layout and security argument in doc.go): a
// keyed-hash HMAC-SHA-256 key inside the TPM. Wrap and Unwrap each send one TPM
// command, TPM2_HMAC (Part 3 section 15.5), which derives the body's one-time
// AES-256-GCM key K; the seed is sealed and opened under K in software.

// bodyV2 is the first byte of a body made by a KEK of kind hmac.
const bodyV2 = 0x02

const (
	hmacNonceSize = 32
	gcmTagSize    = 16
	// hmacBodyOverhead is version, nonce and GCM tag.
	hmacBodyOverhead = 1 + hmacNonceSize + gcmTagSize
)

// hmacKDFLabel starts every TPM2_HMAC input: no other use of the key (there is
// none) can produce an input that starts so.
const hmacKDFLabel = "hwkms-kdf\x00"

// kekTemplate is the public area CreateKey makes for a KEK of kind.
func kekTemplate(kind string) tpm2.TPMTPublic {
	if kind == KindHMAC {
		return wire.HMACKEKTemplate()
	}
	return wire.KEKTemplate()
}

// checkKEKKind accepts a KEK public area of the given kind ("" means sealed).
func checkKEKKind(pub *tpm2.TPMTPublic, kind string) error {
	if kind == KindHMAC {
		if !wire.IsHMACKEK(pub) {
			return errors.New("the key is of kind sealed, the configuration says kind hmac")
		}
		return wire.CheckHMACKEKPublic(pub)
	}
	if wire.IsHMACKEK(pub) {
		return errors.New("the key is of kind hmac, the configuration says kind sealed")
	}
	return wire.CheckKEKPublic(pub)
}

// startHMACSession starts the one session a KEK of kind hmac uses: an HMAC session
// salted with the owner SRK (the caller created it and flushes it: a session keeps
// its salt after its tpmKey is gone), with the KEK's auth value and AES-128-CFB
// response encryption, so K crosses the bus encrypted. The caller holds the
// connection; on error the caller tears down.
func (k *KEK) startHMACSession(srk primaryObject) error {
	s, _, err := tpm2.HMACSession(k.c, tpm2.TPMAlgSHA256, nonceSize,
		tpm2.Salted(srk.Handle, srk.pub), tpm2.AESEncryption(128, tpm2.EncryptOut), tpm2.Auth(k.auth))
	if err != nil {
		return fmt.Errorf("start salted session: %w", tpmCall(err))
	}
	k.sOut = s
	return nil
}

// hmacKDFInput is label || version || nonce || SHA-256(aad): 75 bytes, well within
// TPM2_HMAC's buffer whatever the aad.
func hmacKDFInput(nonce, aad []byte) []byte {
	digest := sha256.Sum256(aad)
	in := make([]byte, 0, len(hmacKDFLabel)+1+len(nonce)+len(digest))
	in = append(in, hmacKDFLabel...)
	in = append(in, bodyV2)
	in = append(in, nonce...)
	return append(in, digest[:]...)
}

// deriveKey runs TPM2_HMAC over the KDF input with the KEK in the response-encrypting
// session and returns K (32 bytes). The caller clears it.
func (k *KEK) deriveKey(ctx context.Context, op string, nonce, aad []byte) ([]byte, error) {
	in := hmacKDFInput(nonce, aad)
	var key []byte
	err := k.do(ctx, op, func() error {
		out, err := hmacFast(k.c, k.sOut, k.kek, k.name, in)
		if err != nil {
			return fmt.Errorf("tpm: %s: TPM2_HMAC: %w: %w", op, kek.ErrUnavailable, tpmCall(err))
		}
		if len(out) != sha256.Size {
			k.needReset = true
			return fmt.Errorf("tpm: %s: TPM2_HMAC returned %d bytes: %w", op, len(out), kek.ErrUnavailable)
		}
		key = out
		return nil
	})
	return key, err
}

// gcmFor returns AES-256-GCM under the one-time key K. Each K seals exactly one
// body, so the GCM nonce is fixed (all zero).
func gcmFor(key []byte) (cipher.AEAD, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// gcmAAD is what the GCM tag covers besides the ciphertext: version || nonce || aad.
func gcmAAD(header, aad []byte) []byte {
	return append(append(make([]byte, 0, len(header)+len(aad)), header...), aad...)
}

var zeroGCMNonce [12]byte

// wrapHMAC makes a body of version 2: a fresh random nonce, K from the TPM, the
// plaintext sealed under K. plaintext is already checked.
func (k *KEK) wrapHMAC(ctx context.Context, plaintext, aad []byte) ([]byte, error) {
	body := make([]byte, 1+hmacNonceSize, hmacBodyOverhead+len(plaintext))
	body[0] = bodyV2
	if _, err := rand.Read(body[1:]); err != nil {
		return nil, fmt.Errorf("tpm: wrap: %w", err)
	}
	key, err := k.deriveKey(ctx, "wrap", body[1:], aad)
	if err != nil {
		return nil, err
	}
	defer clear(key)
	g, err := gcmFor(key)
	if err != nil {
		return nil, fmt.Errorf("tpm: wrap: %w", err)
	}
	return g.Seal(body, zeroGCMNonce[:], plaintext, gcmAAD(body, aad)), nil
}

// unwrapHMAC parses a body of version 2 strictly, derives its K in the TPM and opens
// it. A malformed or tampered body or a wrong aad gives kek.ErrInvalidCiphertext.
func (k *KEK) unwrapHMAC(ctx context.Context, body, aad []byte) ([]byte, error) {
	if len(body) < 1 || body[0] != bodyV2 {
		return nil, fmt.Errorf("tpm: unwrap: %w: %w: not a body of version 2 (kind hmac)", kek.ErrInvalidCiphertext, wire.ErrMalformed)
	}
	if n := len(body) - hmacBodyOverhead; n < 1 || n > kek.MaxPlaintext {
		return nil, fmt.Errorf("tpm: unwrap: %w: %w: body of %d bytes", kek.ErrInvalidCiphertext, wire.ErrMalformed, len(body))
	}
	header := body[:1+hmacNonceSize]
	key, err := k.deriveKey(ctx, "unwrap", header[1:], aad)
	if err != nil {
		return nil, err
	}
	defer clear(key)
	g, err := gcmFor(key)
	if err != nil {
		return nil, fmt.Errorf("tpm: unwrap: %w", err)
	}
	pt, err := g.Open(nil, zeroGCMNonce[:], body[len(header):], gcmAAD(header, aad))
	if err != nil {
		return nil, fmt.Errorf("tpm: unwrap: %w: not authentic under this KEK, or aad does not match", kek.ErrInvalidCiphertext)
	}
	return pt, nil
}
