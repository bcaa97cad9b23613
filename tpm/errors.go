package tpm

import (
	"errors"
	"fmt"

	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/tpm/internal/wire"
)

// Errors of this package. Each is wrapped together with the plugin sentinel that
// decides the gRPC code and, where there is one, the TPM's own typed error
// (tpm2.TPMRC), so errors.Is and errors.As work on all of them.
var (
	// ErrPolicy means a sealed object's PCR policy is not satisfied: a selected PCR
	// no longer has the value it had at Wrap time (firmware, boot loader or Secure
	// Boot configuration changed). It is always wrapped together with
	// kek.ErrUnavailable: the body is authentic, this TPM state just cannot open
	// it. Recovery is described in doc.go.
	ErrPolicy = errors.New("tpm: PCR policy not satisfied")
	// ErrNotKEK means the object at the configured handle or in the blob file is not
	// an hwkms KEK (wrong type or attributes), or, after a reconnect, is not the same
	// KEK that Open found (its Name changed).
	ErrNotKEK = wire.ErrNotKEK
	// ErrWrongTPM means an import blob was made for another TPM's SRK, or is bound
	// to another TPM's EK.
	ErrWrongTPM = errors.New("tpm: import blob was made for another TPM's SRK")
	// ErrSRKMismatch means the key TPM2_CreatePrimary returned as the owner SRK is
	// not one hwkms will salt a session to or load under: its Name does not match its
	// public area, its public area is not the TCG ECC P-256 SRK template, or its
	// Name is not Config.SRKName. An interposer on the bus answering in the TPM's
	// place is one cause; a cleared owner hierarchy (a new SRK) with an old srkName
	// is another. It is always wrapped together with kek.ErrUnavailable. See
	// srkpin.go.
	ErrSRKMismatch = errors.New("tpm: owner SRK is not the expected key")
	// ErrKeyIDMismatch means the KEK found (at the persistent handle, or in the blob
	// file or import blob) has another key_id than the one pinned by Config.KeyID,
	// or, after a reconnect, than the one Open found. It is always wrapped together
	// with ErrNotKEK, and on the request path with kek.ErrUnavailable.
	ErrKeyIDMismatch = errors.New("tpm: KEK is not the pinned key_id")
)

// errDesync marks an error from go-tpm that is neither a TPM response code nor a
// transport failure (response parsing, response HMAC check): our view of the
// session nonces can no longer be trusted, so the connection is rebuilt.
var errDesync = errors.New("tpm session state lost")

// errTransport marks a failure of the connection itself (dial, write, read, framing,
// deadline). The connection is unusable afterwards and the KEK reconnects. It wraps
// kek.ErrUnavailable, so every transport failure, including in Open, CreateKey,
// Probe and DestroyKey, maps to Unavailable.
var errTransport = fmt.Errorf("tpm transport failed: %w", kek.ErrUnavailable)
