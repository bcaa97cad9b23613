package tpm

import (
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/google/go-tpm/tpm2"
	"github.com/hwkms/hwkms/plugin/files"
	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/tpm/internal/wire"
)

// blobV1 is the first byte of a KEK blob file (doc.go).
const blobV1 = 0x01

// readBlobFile reads and checks a KEK blob file.
func readBlobFile(path string) (pub *tpm2.TPMTPublic, pubBytes, priv []byte, err error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil, nil, fmt.Errorf("tpm: blobFile %s: %w", path, kek.ErrKeyNotFound)
	}
	if err != nil {
		return nil, nil, nil, fmt.Errorf("tpm: blobFile: %w", err)
	}
	pub, pubBytes, priv, err = decodeObject(blobV1, b)
	if err == nil {
		err = wire.CheckAnyKEKPublic(pub)
	}
	if err != nil {
		return nil, nil, nil, fmt.Errorf("tpm: blobFile %s: %w: %w", path, ErrNotKEK, err)
	}
	return pub, pubBytes, priv, nil
}

// writeBlobFile writes a new KEK blob file with files.WriteFile (temporary file,
// fsync, hard link, directory fsync; mode 0600), failing with kek.ErrKeyExists if
// path exists: a blob file is never partial and never overwritten.
func writeBlobFile(path string, data []byte) error {
	err := files.WriteFile(path, data, files.WriteOptions{Mode: 0o600, Exclusive: true})
	if errors.Is(err, fs.ErrExist) {
		return kek.ErrKeyExists
	}
	return err
}
