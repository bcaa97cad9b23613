package tpm

import (
	"path/filepath"
	"testing"

	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/plugin/kek/kektest"
	"github.com/hwkms/hwkms/tpm/provision"
	"github.com/hwkms/hwkms/tpm/swtpm/swtpmtest"
)

// TestConformance runs the kek.KEK conformance suite on tpm.KEK: over swtpm with
// the persistent form (and a blob-form KEK as the other key), over swtpm with an
// imported KEK (the multi-node form, whose sealed objects have fixedTPM clear), and
// over the in-process simulator. Both devices serve one connection at a time, so
// the suite's KEKs share one line and evict each other as they alternate.
func TestConformance(t *testing.T) {
	opener := func(cfg Config) func(t *testing.T) kek.KEK {
		return func(t *testing.T) kek.KEK {
			t.Helper()
			k, err := Open(testCtx(t), cfg)
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			return k
		}
	}
	t.Run("swtpm", func(t *testing.T) {
		sim := swtpmtest.New(t)
		cfg := Config{Device: sim.Device, PersistentHandle: testHandle}
		other := Config{Device: sim.Device, BlobFile: filepath.Join(t.TempDir(), "other.blob")}
		createKey(t, cfg)
		createKey(t, other)
		t.Cleanup(func() { assertNoHandles(t, sim) }) // after Run's cleanups close its KEKs
		kektest.Run(t, opener(cfg), kektest.WithOther(opener(other)))
	})
	t.Run("swtpm imported", func(t *testing.T) {
		sim := swtpmtest.New(t)
		srk, err := ExportSRK(testCtx(t), sim.Device)
		if err != nil {
			t.Fatal(err)
		}
		m, err := provision.NewKEKMaterial(nil)
		if err != nil {
			t.Fatal(err)
		}
		blob, err := m.ImportBlob(srk.EncodeSRKPEM())
		m.Destroy()
		if err != nil {
			t.Fatal(err)
		}
		cfg := Config{Device: sim.Device, BlobFile: filepath.Join(t.TempDir(), "imported.blob")}
		if _, err := ImportKey(testCtx(t), cfg, blob); err != nil {
			t.Fatal(err)
		}
		other := Config{Device: sim.Device, PersistentHandle: testHandle}
		createKey(t, other)
		t.Cleanup(func() { assertNoHandles(t, sim) }) // after Run's cleanups close its KEKs
		kektest.Run(t, opener(cfg), kektest.WithOther(opener(other)))
	})
	t.Run("simulator", func(t *testing.T) {
		s := newSimTPM(t, 7)
		cfg := Config{Device: s.Device, BlobFile: filepath.Join(t.TempDir(), "kek.blob")}
		other := Config{Device: s.Device, PersistentHandle: testHandle}
		createKey(t, cfg)
		createKey(t, other)
		kektest.Run(t, opener(cfg), kektest.WithOther(opener(other)))
	})
}
