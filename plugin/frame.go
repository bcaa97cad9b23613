package plugin

import (
	"fmt"

	"github.com/hwkms/hwkms/plugin/kek"
)

// Ciphertext frame, as stored in etcd inside kube-apiserver's EncryptedObject.
//
// Version 1 (the only version so far; formats are forever, never reuse a value):
//
//	byte 0     frame version, 0x01
//	byte 1     backend (kek.BackendPKCS11 0x01, kek.BackendTPM 0x02)
//	bytes 2..  backend body, produced by KEK.Wrap with the AAD below
//
// The AAD given to the KEK binds the frame version, the backend and the key_id:
//
//	"hwkms\x00" | version | backend | key_id (UTF-8 bytes)
//
// so a frame cannot be replayed under another key_id, another backend or another
// frame version: Unwrap fails authentication.
const (
	// FrameV1 is the version byte of the version-1 frame.
	FrameV1 byte = 0x01
	// frameHeaderLen is the length of the version and backend bytes.
	frameHeaderLen = 2
)

// aadPrefix starts every AAD; it separates hwkms AADs from any other use of the key.
const aadPrefix = "hwkms\x00"

// encodeFrame builds a version-1 frame around body.
func encodeFrame(b kek.Backend, body []byte) []byte {
	out := make([]byte, 0, frameHeaderLen+len(body))
	out = append(out, FrameV1, byte(b))
	return append(out, body...)
}

// parseFrame splits a frame into its backend and body. It accepts only version 1 and
// a non-empty body; any other input wraps kek.ErrInvalidCiphertext.
func parseFrame(frame []byte) (kek.Backend, []byte, error) {
	if len(frame) <= frameHeaderLen {
		return 0, nil, fmt.Errorf("frame of %d bytes is too short: %w", len(frame), kek.ErrInvalidCiphertext)
	}
	if frame[0] != FrameV1 {
		return 0, nil, fmt.Errorf("unsupported frame version 0x%02x: %w", frame[0], kek.ErrInvalidCiphertext)
	}
	return kek.Backend(frame[1]), frame[frameHeaderLen:], nil
}

// frameAAD returns the additional authenticated data for a version-1 frame.
func frameAAD(b kek.Backend, keyID string) []byte {
	out := make([]byte, 0, len(aadPrefix)+2+len(keyID))
	out = append(out, aadPrefix...)
	out = append(out, FrameV1, byte(b))
	return append(out, keyID...)
}
