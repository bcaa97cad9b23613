package tpm

import (
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"testing"

	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/tpm/swtpm/swtpmtest"
)

// TestSharedLine opens two KEKs on one swtpm, which serves one connection at a time
// (as /dev/tpm0 allows one open): both share a line, requests for either succeed in
// any interleaving, the TPM never holds more than one KEK's objects and sessions, a
// swtpm restart is survived by both, and closing one leaves the other working.
func TestSharedLine(t *testing.T) {
	sim := swtpmtest.New(t)
	cfgA := Config{Device: sim.Device, BlobFile: filepath.Join(t.TempDir(), "a.blob")}
	cfgB := Config{Device: sim.Device, PersistentHandle: testHandle}
	infoA, infoB := createKey(t, cfgA), createKey(t, cfgB)
	ctx := testCtx(t)

	kA, err := Open(ctx, cfgA)
	if err != nil {
		t.Fatal(err)
	}
	defer kA.Close()
	kB, err := Open(ctx, cfgB)
	if err != nil {
		t.Fatalf("second KEK on the same swtpm: %v", err)
	}
	defer kB.Close()
	if kA.line == nil || kA.line != kB.line {
		t.Fatalf("KEKs on one device do not share a line: %p %p", kA.line, kB.line)
	}
	if kA.ID() != infoA.KeyID || kB.ID() != infoB.KeyID {
		t.Fatalf("IDs %s %s, want %s %s", kA.ID(), kB.ID(), infoA.KeyID, infoB.KeyID)
	}

	keks := []*KEK{kA, kB}
	bodies := make([][]byte, 2)
	for i, k := range keks {
		if bodies[i], err = k.Wrap(ctx, fmt.Appendf(nil, "seed %d", i), []byte("aad")); err != nil {
			t.Fatalf("Wrap with key %d: %v", i, err)
		}
	}
	// Each body opens only under its own KEK, whichever is loaded.
	for i, k := range keks {
		got, err := k.Unwrap(ctx, bodies[i], []byte("aad"))
		if err != nil || string(got) != fmt.Sprintf("seed %d", i) {
			t.Errorf("Unwrap with key %d = %q, %v", i, got, err)
		}
		if _, err := k.Unwrap(ctx, bodies[1-i], []byte("aad")); !errors.Is(err, kek.ErrInvalidCiphertext) {
			t.Errorf("key %d opened key %d's body: %v, want ErrInvalidCiphertext", i, 1-i, err)
		}
	}

	// Interleaved from many goroutines: every switch evicts the other KEK.
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := range 8 {
		wg.Go(func() {
			for n := range 20 {
				i := (g + n) % 2
				got, err := keks[i].Unwrap(ctx, bodies[i], []byte("aad"))
				if err == nil && string(got) != fmt.Sprintf("seed %d", i) {
					err = fmt.Errorf("key %d unwrapped %q", i, got)
				}
				if err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("interleaved: %v", err)
	}
	// Only the KEK that used the TPM last holds anything in it.
	for _, k := range keks {
		assertOnlyOwn(t, k)
	}

	if err := sim.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	for i, k := range keks {
		if got, err := k.Unwrap(ctx, bodies[i], []byte("aad")); err != nil || string(got) != fmt.Sprintf("seed %d", i) {
			t.Errorf("Unwrap with key %d after swtpm restart = %q, %v", i, got, err)
		}
	}
	if n := kA.Reconnects() + kB.Reconnects(); n != 1 {
		t.Errorf("reconnects after one swtpm restart = %d, want 1 (the other KEK reuses the line)", n)
	}

	// kB owns the line now; closing it leaves kA working, and closing kA frees it all.
	if err := kB.Close(); err != nil {
		t.Fatal(err)
	}
	if got, err := kA.Unwrap(ctx, bodies[0], []byte("aad")); err != nil || string(got) != "seed 0" {
		t.Errorf("Unwrap with key 0 after closing key 1 = %q, %v", got, err)
	}
	assertOnlyOwn(t, kA)
	if err := kA.Close(); err != nil {
		t.Fatal(err)
	}
	assertNoHandles(t, sim)
	linesMu.Lock()
	_, open := lines[kA.dev.String()]
	linesMu.Unlock()
	if open {
		t.Errorf("line to %s left open after every KEK closed", kA.dev)
	}
}
