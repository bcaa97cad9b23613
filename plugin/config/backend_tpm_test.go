package config

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hwkms/hwkms/tpm"
	"github.com/hwkms/hwkms/tpm/provision"
	"github.com/hwkms/hwkms/tpm/swtpm/swtpmtest"
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

// checkLog records doctor's checks.
type checkLog struct{ lines []string }

func (c *checkLog) OK(check, detail string) { c.lines = append(c.lines, "[ok] "+check+": "+detail) }
func (c *checkLog) Warn(check, detail, fix string) {
	c.lines = append(c.lines, "[warn] "+check+": "+detail)
}
func (c *checkLog) Fail(check, detail, fix string) {
	c.lines = append(c.lines, "[FAIL] "+check+": "+detail)
}
func (c *checkLog) PINRefused() {}

// line returns the line starting with prefix.
func (c *checkLog) line(t *testing.T, prefix string) string {
	t.Helper()
	for _, l := range c.lines {
		if strings.HasPrefix(l, prefix) {
			return l
		}
	}
	t.Fatalf("no %q line in:\n%s", prefix, strings.Join(c.lines, "\n"))
	return ""
}

// TestTPMDestroyAndDoctorWording: key destroy's prompt and doctor's "key present"
// say what is true for each kind of TPM KEK, read from its attributes: a blob made
// here (fixedTPM) is gone only with every copy of its blob or the owner hierarchy; an
// imported KEK (fixedTPM clear) also lives in the other TPMs that imported it and in
// its escrow blob, so doctor must not say it cannot leave this TPM. A persistent
// handle states the one true case too, from the fixedTPM attribute tpm.Probe reports.
func TestTPMDestroyAndDoctorWording(t *testing.T) {
	ctx := context.Background()
	sim := swtpmtest.New(t)
	dir := t.TempDir()

	made := tpm.Config{Device: sim.Device, BlobFile: filepath.Join(dir, "made.blob")}
	if _, err := tpm.CreateKey(ctx, made); err != nil {
		t.Fatal(err)
	}
	imported := tpm.Config{Device: sim.Device, BlobFile: filepath.Join(dir, "imported.blob")}
	m, err := provision.NewKEKMaterial(nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Destroy)
	srk, err := tpm.ExportSRK(ctx, sim.Device)
	if err != nil {
		t.Fatal(err)
	}
	blob, err := m.ImportBlob(srk.EncodeSRKPEM())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tpm.ImportKey(ctx, imported, blob); err != nil {
		t.Fatal(err)
	}
	persistent := tpm.Config{Device: sim.Device, PersistentHandle: "0x81010010"}
	if _, err := tpm.CreateKey(ctx, persistent); err != nil {
		t.Fatal(err)
	}
	importedPersistent := tpm.Config{Device: sim.Device, PersistentHandle: "0x81010011"}
	if _, err := tpm.ImportKey(ctx, importedPersistent, blob); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name              string
		c                 tpm.Config
		destroy, doctor   []string
		notDestroy, notDr []string
	}{
		{
			name:       "blob made here",
			c:          made,
			destroy:    []string{"deletes the blob file " + made.BlobFile, "removes this copy", "another copy of the blob", "owner SRK can still load it", "every copy of the blob is gone or the owner hierarchy is cleared"},
			notDestroy: []string{"forever", "imported"},
			doctor:     []string{"made in this TPM (fixedTPM|fixedParent)", "loads only under this TPM's owner SRK"},
			notDr:      []string{"imported"},
		},
		{
			name:       "imported blob",
			c:          imported,
			destroy:    []string{"deletes the blob file " + imported.BlobFile, "another copy of the blob", "imported KEK (fixedTPM clear)", "every other TPM that imported", "escrow blob"},
			notDestroy: []string{"forever"},
			doctor:     []string{"imported (fixedTPM clear)", "every TPM that imported its import blobs", "escrow blob"},
			notDr:      []string{"cannot leave this TPM", "fixedTPM|fixedParent"},
		},
		{
			name:       "persistent handle made here",
			c:          persistent,
			destroy:    []string{"evicts persistent handle 0x81010010", "made here by hwkms key create (fixedTPM)", "no other copy was written", "unreadable, forever"},
			notDestroy: []string{"imported", "escrow"},
			doctor:     []string{"made in this TPM (fixedTPM|fixedParent) at persistent handle 0x81010010", "no copy of it was written outside this TPM"},
			notDr:      []string{"imported", "blob"},
		},
		{
			name:       "persistent handle imported",
			c:          importedPersistent,
			destroy:    []string{"evicts persistent handle 0x81010011", "imported KEK (fixedTPM clear)", "every other TPM that imported", "escrow blob"},
			notDestroy: []string{"forever", "made here"},
			doctor:     []string{"imported (fixedTPM clear)", "every TPM that imported its import blobs", "escrow blob"},
			notDr:      []string{"cannot leave this TPM", "fixedTPM|fixedParent"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := tpmKey{tc.c}
			d := b.Describe(ctx)
			if d.Err != nil || !d.Present {
				t.Fatalf("Describe: %+v", d)
			}
			for _, want := range tc.destroy {
				if !strings.Contains(d.DestroyEffect, want) {
					t.Errorf("destroy prompt does not say %q:\n%s", want, d.DestroyEffect)
				}
			}
			for _, not := range tc.notDestroy {
				if strings.Contains(d.DestroyEffect, not) {
					t.Errorf("destroy prompt says %q:\n%s", not, d.DestroyEffect)
				}
			}
			var log checkLog
			b.Check(ctx, &log, CheckOptions{Name: "keys[0]", Timeout: 10 * time.Second})
			present := log.line(t, "[ok] keys[0] key present")
			for _, want := range append(tc.doctor, d.KeyID) {
				if !strings.Contains(present, want) {
					t.Errorf("doctor does not say %q:\n%s", want, present)
				}
			}
			for _, not := range tc.notDr {
				if strings.Contains(present, not) {
					t.Errorf("doctor says %q:\n%s", not, present)
				}
			}
			log.line(t, "[ok] keys[0] round trip")
		})
	}
}

// TestTPMDoctorPins: doctor's "key present" fails, with advice naming the field,
// when the KEK is not the one keyID pins or the owner SRK is not the one srkName pins.
func TestTPMDoctorPins(t *testing.T) {
	ctx := context.Background()
	sim := swtpmtest.New(t)
	dir := t.TempDir()
	a := tpm.Config{Device: sim.Device, BlobFile: filepath.Join(dir, "a.blob")}
	b := tpm.Config{Device: sim.Device, BlobFile: filepath.Join(dir, "b.blob")}
	infoA, err := tpm.CreateKey(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tpm.CreateKey(ctx, b); err != nil {
		t.Fatal(err)
	}
	wrongKey := b
	wrongKey.KeyID = infoA.KeyID
	wrongSRK := a
	wrongSRK.SRKName = "000b" + strings.Repeat("00", 32)
	for _, tc := range []struct {
		name string
		c    tpm.Config
		want string
	}{
		{"keyID", wrongKey, "the config's keyID pins " + infoA.KeyID},
		{"srkName", wrongSRK, "srkName pins 000b00"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var log checkLog
			tpmKey{tc.c}.Check(ctx, &log, CheckOptions{Name: "keys[0]", Timeout: 10 * time.Second})
			if l := log.line(t, "[FAIL] keys[0] key present"); !strings.Contains(l, tc.want) {
				t.Errorf("doctor does not say %q:\n%s", tc.want, l)
			}
		})
	}
}
