package tpm

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"

	"github.com/google/go-tpm/tpm2"
	"github.com/hwkms/hwkms/tpm/internal/wire"
)

// The fast path of Unwrap's body parsing. Profiling `hwkms serve` on swtpm under
// `hwkms bench --op decrypt` showed about a third of the process's CPU per Decrypt
// in go-tpm's reflection-driven (un)marshalling of the body's public area before any
// TPM command: decodeObject's unmarshal and canonical re-marshal, checkSealedPublic's
// attribute comparison (a marshal of each side) and the Name (a third marshal, then
// SHA-256). On a two-core node that CPU is taken from the TPM simulator or from the
// apiserver.
//
// A body's public area made by Wrap without a PCR policy has exactly one form: the
// marshalled sealed template with a 32-byte unique. parseSealedFast recognises that
// form by comparing bytes, and then knows everything decodeObject and
// checkSealedPublicFor would have found: the area is canonical (it is the template's
// own encoding), its attributes are sealedAttributes (or the imported ones), it has
// no authPolicy, and its Name is nameAlg || SHA-256 of the area, as TPM2 Part 1
// section 16 defines it (the area is canonical, so hashing it is hashing its
// marshalling). Anything else - a PCR-policy object, any deviation - takes the slow
// path, which decides as before. TestFastPathAgrees checks that the two agree.

// sealedPrefixes[imported] is the marshalled no-policy sealed template up to its
// unique field (a TPM2B_DIGEST, which follows as 0x0020 and 32 bytes).
var sealedPrefixes = func() (p [2][]byte) {
	for i, imported := range []bool{false, true} {
		t := sealedTemplateFor(nil, imported)
		b, err := wire.SafeMarshal(&t)
		if err != nil || len(b) < 2 || b[len(b)-2] != 0 || b[len(b)-1] != 0 {
			continue // leave the fast path off: the slow path still decides
		}
		p[i] = b[:len(b)-2]
	}
	return p
}()

// parseSealedFast parses a bodyV1 whose public area is the no-policy sealed
// template (for a KEK imported or not) and returns the areas and the object's Name;
// ok is false for anything else, which the caller hands to decodeObject.
func parseSealedFast(b []byte, imported bool) (pubBytes, priv, name []byte, ok bool) {
	prefix := sealedPrefixes[0]
	if imported {
		prefix = sealedPrefixes[1]
	}
	if len(prefix) == 0 || len(b) < 1 || b[0] != bodyV1 {
		return nil, nil, nil, false
	}
	pubBytes, rest, ok := wire.Cut2B(b[1:])
	if !ok || len(pubBytes) != len(prefix)+2+sha256.Size || !bytes.HasPrefix(pubBytes, prefix) ||
		binary.BigEndian.Uint16(pubBytes[len(prefix):]) != sha256.Size {
		return nil, nil, nil, false
	}
	priv, rest, ok = wire.Cut2B(rest)
	if !ok || len(priv) == 0 || len(rest) != 0 {
		return nil, nil, nil, false
	}
	digest := sha256.Sum256(pubBytes)
	name = binary.BigEndian.AppendUint16(make([]byte, 0, 2+sha256.Size), uint16(tpm2.TPMAlgSHA256))
	return pubBytes, priv, append(name, digest[:]...), true
}
