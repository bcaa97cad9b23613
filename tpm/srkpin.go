package tpm

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"strings"

	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/tpm/internal/wire"
)

// This file holds what hwkms checks before it trusts a key the TPM reports: the
// owner SRK that TPM2_CreatePrimary returns (CreateKey salts the session carrying
// the new KEK's auth value to it; ImportKey, Probe and the blob form of Open load
// under it), optionally pinned by Config.SRKName, and the KEK, optionally pinned by
// Config.KeyID. See doc.go, "What is pinned".

// nameLen is the length of a SHA-256 TPM Name: nameAlg 0x000b || 32-byte digest.
const nameLen = 2 + 32

// parseName decodes a SHA-256 TPM Name from lowercase or uppercase hex; what names
// the form in errors.
func parseName(s, what string) ([]byte, error) {
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != nameLen || b[0] != 0x00 || b[1] != 0x0b {
		return nil, fmt.Errorf("%q: want %s: 000b followed by 64 hex digits (%d bytes)", s, what, nameLen)
	}
	return b, nil
}

// parseKeyID decodes a key_id "tpm:000b..." into the KEK's Name.
func parseKeyID(s string) ([]byte, error) {
	hexName, ok := strings.CutPrefix(s, "tpm:")
	if !ok {
		return nil, fmt.Errorf("%q: want a TPM key_id: tpm:000b followed by 64 hex digits", s)
	}
	if _, err := parseName(hexName, "a TPM key_id"); err != nil {
		return nil, fmt.Errorf("%q: want a TPM key_id: tpm:000b followed by 64 hex digits", s)
	}
	return hex.DecodeString(hexName)
}

// pins are the parsed Config.SRKName and Config.KeyID; nil when not set. Callers
// parse them after Validate, which refused malformed ones.
type pins struct {
	srk []byte
	kek []byte
}

func (c Config) pins() pins {
	var p pins
	if c.SRKName != "" {
		p.srk, _ = parseName(c.SRKName, "")
	}
	if c.KeyID != "" {
		p.kek, _ = parseKeyID(c.KeyID)
	}
	return p
}

// checkSRK refuses a key returned by TPM2_CreatePrimary(owner, SRKTemplate) before
// anything is salted to it or loaded under it: its Name, recomputed from the public
// area, must equal the Name the TPM returned (a mismatch means the response was
// altered, or the TPM is not computing what it claims), its public area must be the
// TCG ECC P-256 SRK template with a valid point, and, when pin is set
// (Config.SRKName, the srk_name `hwkms tpm export-srk` prints), its Name must be
// pin. The error wraps ErrSRKMismatch and kek.ErrUnavailable.
func checkSRK(srk primaryObject, pin []byte) error {
	name, err := wire.ObjectName(&srk.pub)
	if err != nil {
		return fmt.Errorf("owner SRK: %w: %w: %w", ErrSRKMismatch, kek.ErrUnavailable, err)
	}
	if !bytes.Equal(name, srk.Name.Buffer) {
		return fmt.Errorf("owner SRK: the Name the TPM returned (%x) is not the Name of the public area it returned (%x): %w: %w",
			srk.Name.Buffer, name, ErrSRKMismatch, kek.ErrUnavailable)
	}
	if err := wire.CheckSRKPublic(&srk.pub); err != nil {
		return fmt.Errorf("owner SRK %x: %w: %w: %w", name, ErrSRKMismatch, kek.ErrUnavailable, err)
	}
	if pin != nil && !bytes.Equal(name, pin) {
		return fmt.Errorf("owner SRK is %x, srkName pins %x (another TPM, a cleared owner hierarchy, or something answering in the TPM's place): %w: %w",
			name, pin, ErrSRKMismatch, kek.ErrUnavailable)
	}
	return nil
}

// checkKeyID refuses a KEK whose Name is not pin (Config.KeyID; nil: not pinned).
// where says where the KEK was found, e.g. "persistent handle 0x81010010".
func checkKeyID(name, pin []byte, where string) error {
	return checkPinned(name, pin, where, "the config's keyID pins")
}

// checkPinned is checkKeyID with the pin's origin (by) named in the error.
func checkPinned(name, pin []byte, where, by string) error {
	if pin == nil || bytes.Equal(name, pin) {
		return nil
	}
	return fmt.Errorf("%s holds %s, %s %s (another object at that place): %w: %w",
		where, wire.KeyID(name), by, wire.KeyID(pin), ErrKeyIDMismatch, ErrNotKEK)
}
