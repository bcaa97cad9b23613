package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hwkms/hwkms/plugin/config"
	"github.com/hwkms/hwkms/tpm"
	"github.com/hwkms/hwkms/tpm/swtpm/swtpmtest"
)

// TestKeyDestroyTPMBlobPrompt: the confirmation prompt of key destroy for a blob-form
// TPM KEK says what deleting the file does (removes this copy; another copy of the
// blob still loads under this TPM's SRK), not that the data can never be read again.
// An unconfirmed destroy leaves the file.
func TestKeyDestroyTPMBlobPrompt(t *testing.T) {
	ctx := context.Background()
	sim := swtpmtest.New(t)
	dir := shortDir(t)
	primary := tpm.Config{Device: sim.Device, BlobFile: filepath.Join(dir, "primary.blob")}
	old := tpm.Config{Device: sim.Device, BlobFile: filepath.Join(dir, "old.blob")}
	for _, c := range []tpm.Config{primary, old} {
		if _, err := tpm.CreateKey(ctx, c); err != nil {
			t.Fatal(err)
		}
	}
	path := filepath.Join(dir, "hwkms.yaml")
	writeYAML(t, path, &config.Config{Socket: config.Socket{Path: filepath.Join(dir, "kms.sock")}, Keys: []config.Key{{TPM: &primary}}})
	var out, errb bytes.Buffer
	err := run(ctx, []string{"key", "destroy", "--config", path, "--tpm-blob-file", old.BlobFile}, strings.NewReader("no\n"), &out, &errb)
	if err == nil || !strings.Contains(err.Error(), "not confirmed") {
		t.Fatalf("unconfirmed destroy = %v", err)
	}
	prompt := errb.String()
	for _, want := range []string{"deletes the blob file " + old.BlobFile, "removes this copy of the KEK", "another copy of the blob", "can still load it", "owner hierarchy is cleared"} {
		if !strings.Contains(prompt, want) {
			t.Errorf("prompt does not say %q:\n%s", want, prompt)
		}
	}
	if strings.Contains(prompt, "forever") || strings.Contains(prompt, "never") {
		t.Errorf("prompt claims the data can never be read again:\n%s", prompt)
	}
	if _, err := os.Stat(old.BlobFile); err != nil {
		t.Fatalf("unconfirmed destroy removed the blob: %v", err)
	}
}
