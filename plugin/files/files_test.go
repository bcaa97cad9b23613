package files

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func writeRaw(t *testing.T, data string, mode fs.FileMode) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(p, []byte(data), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil { // umask may have cleared bits
		t.Fatal(err)
	}
	return p
}

func TestReadSecret(t *testing.T) {
	for _, tc := range []struct {
		name    string
		data    string
		mode    fs.FileMode
		opts    SecretOptions
		want    string
		wantErr error
		errText string
	}{
		{name: "plain", data: "1234", mode: 0o600, want: "1234"},
		{name: "newline stripped once", data: "1234\n\n", mode: 0o600, want: "1234\n"},
		{name: "crlf stripped", data: "1234\r\n", mode: 0o640, want: "1234"},
		{name: "at limit with newline", data: "abcd\n", mode: 0o600, opts: SecretOptions{MaxBytes: 4}, want: "abcd"},
		{name: "over limit", data: "abcde", mode: 0o600, opts: SecretOptions{MaxBytes: 4}, wantErr: ErrTooLarge},
		{name: "far over limit", data: strings.Repeat("x", 10000), mode: 0o600, opts: SecretOptions{MaxBytes: 4}, wantErr: ErrTooLarge},
		{name: "world readable", data: "1234", mode: 0o644, wantErr: ErrInsecureMode},
		{name: "world writable", data: "1234", mode: 0o602, wantErr: ErrInsecureMode},
		{name: "world readable allowed", data: "1234", mode: 0o644, opts: SecretOptions{AllowOtherAccess: true}, want: "1234"},
		{name: "empty", data: "", mode: 0o600, want: ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := writeRaw(t, tc.data, tc.mode)
			got, err := ReadSecret(p, tc.opts)
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("err = %v, want %v", err, tc.wantErr)
				}
				if strings.Contains(err.Error(), tc.data) && tc.data != "" {
					t.Fatalf("error %q contains the secret", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != tc.want {
				t.Fatalf("got %q, want %q", got, tc.want)
			}
		})
	}
}

func TestReadSecretRefusesDirectoryAndMissing(t *testing.T) {
	if _, err := ReadSecret(t.TempDir(), SecretOptions{}); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Fatalf("directory: err = %v", err)
	}
	if _, err := ReadSecret(filepath.Join(t.TempDir(), "nope"), SecretOptions{}); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("missing: err = %v, want fs.ErrNotExist", err)
	}
}

func TestWriteFileReplacesAtomically(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "cfg")
	if err := WriteFile(p, []byte("one"), WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := WriteFile(p, []byte("two"), WriteOptions{Mode: 0o640}); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(p)
	if err != nil || !bytes.Equal(got, []byte("two")) {
		t.Fatalf("read back %q, %v", got, err)
	}
	fi, err := os.Stat(p)
	if err != nil || fi.Mode().Perm() != 0o640 {
		t.Fatalf("mode %v, %v; want 0640", fi.Mode().Perm(), err)
	}
	assertOnly(t, dir, "cfg")
}

func TestWriteFileExclusiveNeverOverwrites(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "kek.blob")
	if err := WriteFile(p, []byte("first"), WriteOptions{Exclusive: true}); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(p)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v, %v; want 0600", fi.Mode().Perm(), err)
	}
	err = WriteFile(p, []byte("second"), WriteOptions{Exclusive: true})
	if !errors.Is(err, fs.ErrExist) {
		t.Fatalf("second exclusive write: err = %v, want fs.ErrExist", err)
	}
	got, _ := os.ReadFile(p)
	if string(got) != "first" {
		t.Fatalf("existing file changed to %q", got)
	}
	assertOnly(t, dir, "kek.blob")
}

func TestWriteFileMissingDirectory(t *testing.T) {
	p := filepath.Join(t.TempDir(), "no", "such", "file")
	if err := WriteFile(p, []byte("x"), WriteOptions{}); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("err = %v, want fs.ErrNotExist", err)
	}
}

// assertOnly fails if dir holds anything but names (no temporary file left behind).
func assertOnly(t *testing.T, dir string, names ...string) {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range ents {
		got = append(got, e.Name())
	}
	if strings.Join(got, ",") != strings.Join(names, ",") {
		t.Fatalf("directory holds %v, want %v", got, names)
	}
}

func TestRemove(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "kek.blob")
	if err := WriteFile(p, []byte("x"), WriteOptions{Exclusive: true}); err != nil {
		t.Fatal(err)
	}
	if err := Remove(p); err != nil {
		t.Fatal(err)
	}
	assertOnly(t, dir)
	if err := Remove(p); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("second Remove: %v, want fs.ErrNotExist", err)
	}
}
