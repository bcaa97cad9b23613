package wire

import (
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
)

// ErrMalformed marks input that does not parse (a body, a blob file, an import or
// escrow blob). Packages wrap it with the sentinel that decides the error's class.
var ErrMalformed = errors.New("malformed")

// ErrNotKEK means an object is not an hwkms KEK (wrong type or attributes). Package
// tpm exports it as tpm.ErrNotKEK; it lives here so that tpm/provision, which
// parses the KEK public area of import blobs, returns the same value.
var ErrNotKEK = errors.New("tpm: object is not the configured hwkms KEK")

// Limits on a KEK auth value.
const (
	// MinAuthLen is the shortest accepted auth value. The KEK and sealed objects are
	// created with noDA, so the TPM does not rate-limit guesses: the auth value must
	// carry its own entropy.
	MinAuthLen = 16
	// MaxAuthLen is the longest accepted auth value: the TPM limits an object's
	// authValue to the digest size of its nameAlg (SHA-256).
	MaxAuthLen = 32
)

// Cut2B splits a TPM2B off b: a big-endian u16 size, then that many bytes.
func Cut2B(b []byte) (field, rest []byte, ok bool) {
	if len(b) < 2 {
		return nil, nil, false
	}
	n := int(binary.BigEndian.Uint16(b))
	if len(b)-2 < n {
		return nil, nil, false
	}
	return b[2 : 2+n], b[2+n:], true
}

// Append2B appends f to out as a TPM2B: a big-endian u16 length, then f (1..65535
// bytes).
func Append2B(out, f []byte) ([]byte, error) {
	if len(f) == 0 || len(f) > 0xffff {
		return nil, errors.New("tpm: import blob field out of range")
	}
	out = binary.BigEndian.AppendUint16(out, uint16(len(f)))
	return append(out, f...), nil
}

// SafeMarshal is tpm2.Marshal without its panic on values it cannot encode: input
// from a ciphertext or a blob must never crash the process.
func SafeMarshal(v tpm2.Marshallable) (b []byte, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%w: cannot marshal", ErrMalformed)
		}
	}()
	return tpm2.Marshal(v), nil
}

// SafeUnmarshalPublic is tpm2.Unmarshal of a TPMT_PUBLIC guarded against panics on
// hostile input.
func SafeUnmarshalPublic(b []byte) (pub *tpm2.TPMTPublic, err error) {
	defer func() {
		if r := recover(); r != nil {
			pub, err = nil, fmt.Errorf("%w: cannot unmarshal", ErrMalformed)
		}
	}()
	return tpm2.Unmarshal[tpm2.TPMTPublic](b)
}

// SafeUnmarshal is tpm2.Unmarshal guarded against panics on hostile input.
func SafeUnmarshal[T tpm2.Marshallable, P interface {
	*T
	tpm2.Unmarshallable
}](b []byte) (v *T, err error) {
	defer func() {
		if r := recover(); r != nil {
			v, err = nil, fmt.Errorf("%w: cannot unmarshal", ErrMalformed)
		}
	}()
	return tpm2.Unmarshal[T, P](b)
}

// ObjectName returns the TPM Name (nameAlg || H(TPMT_PUBLIC)) of pub, computed here.
func ObjectName(pub *tpm2.TPMTPublic) ([]byte, error) {
	n, err := tpm2.ObjectName(pub)
	if err != nil {
		return nil, err
	}
	return n.Buffer, nil
}

// KeyID is the key_id of the KEK with TPM Name name: "tpm:" + lowercase hex(name).
func KeyID(name []byte) string { return "tpm:" + hex.EncodeToString(name) }
