package config

import (
	"os"
	"path/filepath"
	"testing"
)

// TestPermitsRW: the permission-bit check doctor uses to warn that only root's
// CAP_DAC_OVERRIDE (which the systemd unit drops) lets it open a TPM device node.
func TestPermitsRW(t *testing.T) {
	path := filepath.Join(t.TempDir(), "tpmrm0")
	if err := os.WriteFile(path, nil, 0o660); err != nil {
		t.Fatal(err)
	}
	if ok, _ := permitsRW(path); !ok {
		t.Fatal("own 0660 file: not readable and writable")
	}
	if err := os.Chmod(path, 0o440); err != nil {
		t.Fatal(err)
	}
	if ok, _ := permitsRW(path); ok {
		t.Fatal("0440 file reported writable")
	}
	if os.Geteuid() != 0 {
		t.Skip("skipping the other-owner cases: needs root to chown (CI runs as root)")
	}
	for _, tc := range []struct {
		uid, gid int
		mode     os.FileMode
		want     bool
	}{
		{4243, 4244, 0o660, false},        // tss:tss 0660, root not in tss: the shipped unit's case
		{4243, os.Getegid(), 0o660, true}, // in the group
		{4243, 4244, 0o666, true},         // world-writable
		{4243, os.Getegid(), 0o600, false},
	} {
		if err := os.Chown(path, tc.uid, tc.gid); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(path, tc.mode); err != nil {
			t.Fatal(err)
		}
		if ok, group := permitsRW(path); ok != tc.want || group == "" {
			t.Errorf("uid %d gid %d mode %04o: permitsRW = %v (group %q), want %v", tc.uid, tc.gid, tc.mode, ok, group, tc.want)
		}
	}
}
