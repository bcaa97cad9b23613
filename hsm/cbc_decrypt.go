package hsm

import (
	"errors"
	"fmt"

	"github.com/miekg/pkcs11"

	"github.com/hwkms/hwkms/plugin/kek"
)

// cbcDecrypt is how a KEK decrypts the ciphertext of a version 0x03 body (doc.go,
// "aes-cbc-hmac"), chosen at Open by the round trip. Both give the same plaintext for
// the same body: the stored bytes are CBC with PKCS#7 padding either way.
type cbcDecrypt int

const (
	// cbcDecryptPad: one C_Decrypt of CKM_AES_CBC_PAD; the token removes the padding.
	// The default, and what every KEK uses whose round trip did not need the other.
	cbcDecryptPad cbcDecrypt = iota
	// cbcDecryptRaw: one C_Decrypt of CKM_AES_CBC (no padding) with the body's IV;
	// hsm checks and removes the PKCS#7 padding (unpadPKCS7). For tokens whose
	// CKM_AES_CBC_PAD decrypt fails on ciphertext longer than 32 bytes although the
	// encryption works: tpm2-pkcs11 1.9.0 answers CKR_GENERAL_ERROR ("Internal buffer
	// too small") at 48 bytes and more, while CKM_AES_CBC decrypts 32..112 bytes in
	// one call (docs/tokens.md).
	cbcDecryptRaw
)

// String names the strategy as docs/tokens.md and the logs do.
func (s cbcDecrypt) String() string {
	if s == cbcDecryptRaw {
		return "CKM_AES_CBC, padding removed by hsm"
	}
	return "CKM_AES_CBC_PAD"
}

// mechanism is the PKCS#11 mechanism the strategy's C_DecryptInit uses.
func (s cbcDecrypt) mechanism() uint {
	if s == cbcDecryptRaw {
		return pkcs11.CKM_AES_CBC
	}
	return pkcs11.CKM_AES_CBC_PAD
}

// cbcPadDecryptError marks a failed CKM_AES_CBC_PAD C_Decrypt of a body whose MAC
// verified, so that Open's round trip can tell it from a failed encryption or MAC.
// Its text and chain are those of the error it carries.
type cbcPadDecryptError struct{ err error }

func (e cbcPadDecryptError) Error() string { return e.err.Error() }
func (e cbcPadDecryptError) Unwrap() error { return e.err }

// cbcPadDecryptFailed reports whether err, from a round trip, is a CKM_AES_CBC_PAD
// C_Decrypt that failed the way a token's internal limit does (CKR_GENERAL_ERROR or
// CKR_FUNCTION_FAILED) after the encryption and the MAC worked: the round trip is then
// worth trying once more with cbcDecryptRaw. Device-class errors are not such a
// failure.
func cbcPadDecryptFailed(err error) bool {
	var e cbcPadDecryptError
	return errors.As(err, &e) && isRV(e.err, pkcs11.CKR_GENERAL_ERROR, pkcs11.CKR_FUNCTION_FAILED) &&
		!errors.Is(err, kek.ErrUnavailable)
}

// unpadPKCS7 checks and removes the PKCS#7 padding of out, the CKM_AES_CBC plaintext
// of a version 0x03 body: the last byte n must be 1..16 and the last n bytes all n.
// The MAC was verified before the decryption, so this is no padding oracle; a body
// that passes the MAC with bad padding was made with the HMAC key but not by Wrap, and
// is kek.ErrInvalidCiphertext. On error out is cleared.
func unpadPKCS7(out []byte) ([]byte, error) {
	if len(out) == 0 || len(out)%cbcBlock != 0 {
		clear(out)
		return nil, fmt.Errorf("hsm: body version 0x03: CKM_AES_CBC returned %d bytes, not whole 16-byte blocks: %w", len(out), kek.ErrInvalidCiphertext)
	}
	n := int(out[len(out)-1])
	bad := n < 1 || n > cbcBlock
	if !bad {
		for _, b := range out[len(out)-n:] {
			bad = bad || int(b) != n
		}
	}
	if bad {
		clear(out)
		return nil, fmt.Errorf("hsm: body version 0x03: bad PKCS#7 padding after CKM_AES_CBC: %w", kek.ErrInvalidCiphertext)
	}
	clear(out[len(out)-n:])
	return out[:len(out)-n], nil
}
