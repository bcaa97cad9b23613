package files

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
)

// ErrInsecureMode means a secret file can be read or written by users other than its
// owner and group (any "other" permission bit is set).
var ErrInsecureMode = errors.New("secret file is accessible to other users")

// ErrTooLarge means a secret file holds more bytes than the caller's limit.
var ErrTooLarge = errors.New("secret file is too large")

// SecretOptions are the rules ReadSecret applies.
type SecretOptions struct {
	// MaxBytes is the largest secret accepted, after the trailing newline is removed.
	// Zero means 4096.
	MaxBytes int
	// AllowOtherAccess accepts a file whose "other" permission bits are set. Only
	// tests and dev mode should set it.
	AllowOtherAccess bool
}

// ReadSecret reads a secret from path. It refuses a file that is not a regular file, a
// file whose mode gives any access to other users (unless opts.AllowOtherAccess), and a
// file longer than opts.MaxBytes (plus one trailing newline). One trailing "\n" or
// "\r\n" is removed. The caller owns the returned slice and should clear it when done;
// every buffer ReadSecret drops is cleared first. Errors name the path, never the
// contents.
func ReadSecret(path string, opts SecretOptions) ([]byte, error) {
	limit := opts.MaxBytes
	if limit <= 0 {
		limit = 4096
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read secret: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("read secret %s: %w", path, err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("read secret %s: not a regular file (%s)", path, fi.Mode().Type())
	}
	if perm := fi.Mode().Perm(); perm&0o007 != 0 && !opts.AllowOtherAccess {
		return nil, fmt.Errorf("read secret %s: mode %04o: %w (chmod o-rwx)", path, perm, ErrInsecureMode)
	}
	// Read at most limit+2 bytes (a secret of limit bytes plus "\r\n") and one more to
	// detect an oversize file without reading all of it.
	buf := make([]byte, limit+3)
	n, err := io.ReadFull(f, buf)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		clear(buf)
		return nil, fmt.Errorf("read secret %s: %w", path, err)
	}
	b := buf[:n]
	switch {
	case bytes.HasSuffix(b, []byte("\r\n")):
		clear(b[len(b)-2:])
		b = b[:len(b)-2]
	case bytes.HasSuffix(b, []byte("\n")):
		clear(b[len(b)-1:])
		b = b[:len(b)-1]
	}
	if len(b) > limit {
		clear(buf)
		return nil, fmt.Errorf("read secret %s: more than %d bytes: %w", path, limit, ErrTooLarge)
	}
	out := make([]byte, len(b))
	copy(out, b)
	clear(buf)
	return out, nil
}

// WriteOptions are the rules WriteFile applies.
type WriteOptions struct {
	// Mode is the file's permission bits. Zero means 0600.
	Mode fs.FileMode
	// Exclusive makes WriteFile fail with an error wrapping fs.ErrExist when path
	// already exists; the existing file is left untouched. Otherwise path is replaced
	// atomically.
	Exclusive bool
}

// WriteFile writes data to path durably: a temporary file in the same directory,
// written, chmod-ed to opts.Mode and fsynced, then renamed over path (or, with
// opts.Exclusive, hard-linked to path, which fails if path exists) and the directory
// fsynced. A reader sees either the old file or the complete new one; after a crash
// the same holds. The temporary file is removed on every path.
func WriteFile(path string, data []byte, opts WriteOptions) (err error) {
	mode := opts.Mode
	if mode == 0 {
		mode = 0o600
	}
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp := f.Name()
	defer os.Remove(tmp) // after a rename this is a no-op; after a link it drops the temp name
	if err := writeSync(f, data, mode); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if opts.Exclusive {
		if err := os.Link(tmp, path); err != nil {
			return fmt.Errorf("write %s: %w", path, err)
		}
	} else if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := syncDir(dir); err != nil {
		return fmt.Errorf("write %s: fsync directory: %w", path, err)
	}
	return nil
}

// Remove removes path durably: unlink, then fsync its directory, so the file does not
// come back after a crash.
func Remove(path string) error {
	if err := os.Remove(path); err != nil {
		return err // *fs.PathError: "remove <path>: ..."
	}
	if err := syncDir(filepath.Dir(path)); err != nil {
		return fmt.Errorf("remove %s: fsync directory: %w", path, err)
	}
	return nil
}

// writeSync writes data to f, sets mode, fsyncs and closes f.
func writeSync(f *os.File, data []byte, mode fs.FileMode) error {
	_, werr := f.Write(data)
	if werr == nil {
		werr = f.Chmod(mode)
	}
	if werr == nil {
		werr = f.Sync()
	}
	if cerr := f.Close(); werr == nil {
		werr = cerr
	}
	return werr
}

// syncDir fsyncs a directory so a rename or link in it is durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
