package latency_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/hwkms/hwkms/plugin/files"
	"github.com/hwkms/hwkms/tpm"
	"github.com/hwkms/hwkms/tpm/swtpm/latency"
	"github.com/hwkms/hwkms/tpm/swtpm/swtpmtest"
)

func TestDelayModel(t *testing.T) {
	p := latency.SLB9670
	hdr := func(cc uint32, extra ...byte) []byte {
		b := []byte{0x80, 0x01, 0, 0, 0, 0, byte(cc >> 24), byte(cc >> 16), byte(cc >> 8), byte(cc)}
		return append(b, extra...)
	}
	handles := make([]byte, 8)
	cases := []struct {
		name string
		cmd  []byte
		min  time.Duration
		max  time.Duration
	}{
		{"flush", hdr(0x165, 0x80, 0, 0, 1), p.Base, p.Base + time.Millisecond},
		{"unsalted session", hdr(0x176, append(handles, 0, 1, 7, 0, 0)...), p.Base, p.Base + time.Millisecond},
		{"salted session", hdr(0x176, append(handles, 0, 1, 7, 0, 2, 1, 2)...), p.Base + p.ECDH, p.Base + p.ECDH + time.Millisecond},
		{"create primary", hdr(0x131), p.Base + p.KeyGen, p.Base + p.KeyGen + time.Millisecond},
		{"short", []byte{1, 2}, p.Base, p.Base + time.Millisecond},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if d := p.Delay(c.cmd, 10); d < c.min || d > c.max {
				t.Fatalf("Delay = %v, want %v..%v", d, c.min, c.max)
			}
		})
	}
	if d1, d2 := p.Delay(hdr(0x157), 10), p.Delay(hdr(0x157, make([]byte, 1024)...), 10); d2-d1 != p.PerKiB {
		t.Fatalf("1 KiB more costs %v, want %v", d2-d1, p.PerKiB)
	}
}

// TestProxyKEK runs a KEK through the proxy: it works, each Unwrap costs TPM2_Load,
// TPM2_Unseal and TPM2_FlushContext and at least their modelled time, and concurrent
// calls are serialised.
func TestProxyKEK(t *testing.T) {
	sim := swtpmtest.New(t)
	dir := t.TempDir()
	auth := filepath.Join(dir, "auth")
	if err := files.WriteFile(auth, []byte("0123456789abcdef0123"), files.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	cfg := tpm.Config{Device: sim.Device, BlobFile: filepath.Join(dir, "kek.blob"), AuthFile: auth}
	if _, err := tpm.CreateKey(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	x, err := latency.StartFor(sim.Device, latency.SLB9670)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { x.Close() })
	cfg.Device = x.Device
	k, err := tpm.Open(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { k.Close() })

	seed := make([]byte, 32)
	rand.Read(seed)
	body, err := k.Wrap(ctx, seed, []byte("aad"))
	if err != nil {
		t.Fatal(err)
	}
	before := x.Counts()
	start := time.Now()
	got, err := k.Unwrap(ctx, body, []byte("aad"))
	took := time.Since(start)
	if err != nil || !bytes.Equal(got, seed) {
		t.Fatalf("Unwrap = %x, %v", got, err)
	}
	after := x.Counts()
	total := 0
	for cc, n := range after {
		if d := n - before[cc]; d > 0 {
			total += d
			t.Logf("Unwrap sent %s x%d", latency.CommandName(cc), d)
		}
	}
	for _, cc := range []uint32{0x157, 0x15E, 0x165} {
		if after[cc]-before[cc] != 1 {
			t.Errorf("Unwrap sent %s %d times, want once", latency.CommandName(cc), after[cc]-before[cc])
		}
	}
	if total != 3 {
		t.Errorf("Unwrap sent %d commands, want 3", total)
	}
	if min := 3 * latency.SLB9670.Base; took < min {
		t.Errorf("Unwrap took %v, less than 3 modelled commands (%v)", took, min)
	}

	// Concurrent Unwraps: the proxy runs one command at a time, so n calls take at
	// least n times one call's three commands.
	const n = 6
	start = time.Now()
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := k.Unwrap(ctx, body, []byte("aad")); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if min := n * 3 * latency.SLB9670.Base; time.Since(start) < min {
		t.Errorf("%d concurrent Unwraps took %v, less than serialised (%v)", n, time.Since(start), min)
	}
}
