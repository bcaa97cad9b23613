package kek

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
)

// KEK is a key-encryption key whose material never leaves its device (a PKCS#11
// token or a TPM). Implementations are safe for concurrent use. Close is idempotent;
// every method called after Close returns an error wrapping ErrClosed.
//
// The plugin owns the ciphertext frame; a KEK only produces and consumes the backend
// body of that frame. aad is bound to the body: Unwrap must fail with an error wrapping
// ErrInvalidCiphertext when the body or aad differs in any bit from what Wrap was given
// and produced.
type KEK interface {
	// ID returns the key_id reported to kube-apiserver: non-empty UTF-8, at most
	// MaxKeyIDLen bytes, derived from the key itself (never from a slot or serial), stable
	// across restarts and different for a re-created key. It is not secret.
	ID() string
	// Backend names the frame body format this KEK produces; it is written in byte 1 of
	// every frame and checked on Decrypt.
	Backend() Backend
	// Wrap encrypts plaintext (1..MaxPlaintext bytes) on the device, binding aad.
	Wrap(ctx context.Context, plaintext, aad []byte) ([]byte, error)
	// Unwrap decrypts a body produced by Wrap with the same aad.
	Unwrap(ctx context.Context, body, aad []byte) ([]byte, error)
	// Close releases device resources (sessions, handles). Idempotent.
	Close() error
}

// Backend identifies the kind of KEK that produced a frame body. Values are stored in
// etcd inside every ciphertext and can never be reassigned.
type Backend byte

const (
	// BackendPKCS11 is a body produced by hsm.KEK (PKCS#11; see hsm/doc.go for its layout).
	BackendPKCS11 Backend = 0x01
	// BackendTPM is a body produced by tpm.KEK (TPM 2.0 sealed object; see tpm/doc.go).
	BackendTPM Backend = 0x02
	// BackendTest is used only by in-memory test KEKs; production keyrings refuse it.
	BackendTest Backend = 0x7f
)

// String returns the backend's config name.
func (b Backend) String() string {
	switch b {
	case BackendPKCS11:
		return "pkcs11"
	case BackendTPM:
		return "tpm"
	case BackendTest:
		return "test"
	default:
		return "unknown"
	}
}

// Errors a KEK wraps (with %w, alongside the device's own typed error) so the plugin
// can map them to gRPC codes in one place. An error wrapping none of them maps to
// codes.Internal.
var (
	// ErrInvalidCiphertext means the body is malformed or failed authentication
	// (wrong key, tampered bytes, wrong aad). Maps to codes.InvalidArgument.
	ErrInvalidCiphertext = errors.New("ciphertext is malformed or not authentic")
	// ErrInvalidInput means the plaintext is outside the accepted size range.
	// Maps to codes.InvalidArgument.
	ErrInvalidInput = errors.New("invalid input")
	// ErrUnavailable means the device cannot be reached or is not usable right now
	// (removed, not logged in, session lost and not yet recovered). Maps to
	// codes.Unavailable.
	ErrUnavailable = errors.New("device unavailable")
	// ErrClosed is returned by every KEK method after Close. Maps to codes.Unavailable.
	ErrClosed = errors.New("kek is closed")
)

// Errors of key lifecycle operations (open, create, destroy), shared by every backend
// so callers above the backends test one sentinel, not one per device.
var (
	// ErrKeyNotFound means the configured key does not exist on the device: no PKCS#11
	// object with the label (and CKA_ID), an empty TPM persistent handle, a missing
	// TPM blob file.
	ErrKeyNotFound = errors.New("key not found")
	// ErrKeyExists means a create found the label, handle or blob file already in use;
	// nothing was overwritten.
	ErrKeyExists = errors.New("key already exists")
)

// Limits of the KMS v2 wire contract (kube-apiserver's envelope transformer,
// k8s.io/apiserver v0.37.2) and of hwkms.
const (
	// MaxCiphertext is kube-apiserver's hard limit on an Encrypt response ciphertext.
	MaxCiphertext = 1024
	// MaxKeyIDLen is kube-apiserver's limit on key_id.
	MaxKeyIDLen = 1024
	// MaxPlaintext is the largest plaintext any hwkms backend accepts. kube-apiserver
	// sends 32-byte seeds. The bound is set by the smallest backend: a TPM sealed-data
	// object holds at most 128 bytes, of which the TPM backend uses 32 for the aad digest.
	MaxPlaintext = 96
)

// APIServerKeyIDHash is the label kube-apiserver's envelope metrics use for a key_id
// (apiserver_envelope_encryption_key_id_hash_*{key_id_hash=...}; k8s.io/apiserver's
// envelope metrics): "sha256:" and the lowercase hex SHA-256 of the key_id; "" for an
// empty key_id. hwkms's metrics and `hwkms storage audit` print it, so a query can
// join what the plugin serves, what every apiserver uses and what etcd holds.
func APIServerKeyIDHash(keyID string) string {
	if keyID == "" {
		return ""
	}
	sum := sha256.Sum256([]byte(keyID))
	return "sha256:" + hex.EncodeToString(sum[:])
}
