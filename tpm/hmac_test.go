package tpm

import (
	"bytes"
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/plugin/kek/kektest"
	"github.com/hwkms/hwkms/tpm/swtpm/latency"
	"github.com/hwkms/hwkms/tpm/swtpm/swtpmtest"
)

// TestConformanceHMAC runs the kek.KEK conformance suite on KEKs of kind hmac: over
// swtpm (persistent form, with a blob-form hmac KEK as the other key) and over the
// simulator (blob form, with a sealed-kind KEK as the other key: bodies of one kind
// are foreign to the other).
func TestConformanceHMAC(t *testing.T) {
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
		cfg := Config{Device: sim.Device, PersistentHandle: testHandle, Kind: KindHMAC}
		other := Config{Device: sim.Device, BlobFile: filepath.Join(t.TempDir(), "other.blob"), Kind: KindHMAC}
		createKey(t, cfg)
		createKey(t, other)
		t.Cleanup(func() { assertNoHandles(t, sim) })
		kektest.Run(t, opener(cfg), kektest.WithOther(opener(other)))
	})
	t.Run("simulator", func(t *testing.T) {
		s := newSimTPM(t, 7)
		cfg := Config{Device: s.Device, BlobFile: filepath.Join(t.TempDir(), "kek.blob"), Kind: KindHMAC}
		other := Config{Device: s.Device, PersistentHandle: testHandle}
		createKey(t, cfg)
		createKey(t, other)
		kektest.Run(t, opener(cfg), kektest.WithOther(opener(other)))
	})
}

// TestHMACBody: the body layout, one TPM command per call, tamper and foreign-body
// refusal as ErrInvalidCiphertext (never ErrUnavailable), and kinds never mixed.
func TestHMACBody(t *testing.T) {
	sim := swtpmtest.New(t)
	cfg := Config{Device: sim.Device, BlobFile: filepath.Join(t.TempDir(), "hmac.blob"), Kind: KindHMAC}
	createKey(t, cfg)
	sealedCfg := Config{Device: sim.Device, BlobFile: filepath.Join(t.TempDir(), "sealed.blob")}
	createKey(t, sealedCfg)
	x, err := latency.StartFor(sim.Device, latency.Profile{Name: "counting"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { x.Close() }) // idempotent; the cleanup below closes it in order
	cfg.Device, sealedCfg.Device = x.Device, x.Device
	ctx := testCtx(t)
	k, err := Open(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	sealed, err := Open(ctx, sealedCfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// The proxy holds swtpm's one connection: close it before listing handles.
		if err := errors.Join(k.Close(), sealed.Close()); err != nil {
			t.Errorf("Close: %v", err)
		}
		x.Close()
		assertNoHandles(t, sim)
	})
	seed := bytes.Repeat([]byte{0x5a}, 32)
	aad := []byte("frame aad")

	// Calls of one KEK in a row: one TPM2_HMAC each, nothing else.
	if _, err := k.Wrap(ctx, seed, aad); err != nil { // owns the shared line now
		t.Fatal(err)
	}
	before := x.Counts()
	body, err := k.Wrap(ctx, seed, aad)
	if err != nil {
		t.Fatal(err)
	}
	got, err := k.Unwrap(ctx, body, aad)
	if err != nil || !bytes.Equal(got, seed) {
		t.Fatalf("Unwrap = %x, %v", got, err)
	}
	after := x.Counts()
	for cc, n := range after {
		if d := n - before[cc]; d != 0 && !(cc == 0x155 && d == 2) {
			t.Errorf("Wrap+Unwrap sent %s x%d; want only TPM2_HMAC, once each", latency.CommandName(cc), d)
		}
	}
	if after[0x155]-before[0x155] != 2 {
		t.Errorf("Wrap+Unwrap sent TPM2_HMAC x%d, want 2", after[0x155]-before[0x155])
	}

	if len(body) != 1+32+32+16 || body[0] != bodyV2 {
		t.Fatalf("body: %d bytes, version %#x; want 81 bytes, version 2", len(body), body[0])
	}
	again, err := k.Wrap(ctx, seed, aad)
	if err != nil || bytes.Equal(again[1:33], body[1:33]) {
		t.Fatalf("two Wraps share a nonce (%v)", err)
	}
	invalid := func(name string, b, aad []byte, k *KEK) {
		t.Helper()
		_, err := k.Unwrap(ctx, b, aad)
		if !errors.Is(err, kek.ErrInvalidCiphertext) || errors.Is(err, kek.ErrUnavailable) {
			t.Errorf("%s: Unwrap = %v, want ErrInvalidCiphertext only", name, err)
		}
	}
	for i := range body {
		b := bytes.Clone(body)
		b[i] ^= 0x01
		invalid("flipped byte", b, aad, k)
	}
	invalid("wrong aad", body, []byte("other aad"), k)
	invalid("truncated", body[:len(body)-1], aad, k)
	invalid("empty ciphertext", body[:1+32+16], aad, k)
	invalid("extended", append(bytes.Clone(body), 0), aad, k)
	invalid("empty", nil, aad, k)
	sealedBody, err := sealed.Wrap(ctx, seed, aad)
	if err != nil {
		t.Fatal(err)
	}
	invalid("version-1 body to a kind-hmac KEK", sealedBody, aad, k)
	invalid("version-2 body to a sealed KEK", body, aad, sealed)
	if got, err := k.Unwrap(ctx, body, aad); err != nil || !bytes.Equal(got, seed) {
		t.Fatalf("Unwrap after the refusals = %x, %v", got, err)
	}
}

// TestKindMismatch: a configuration whose kind is not the key's fails Open with
// ErrNotKEK, both ways; kind hmac takes no PCRs and cannot be imported.
func TestKindMismatch(t *testing.T) {
	sim := swtpmtest.New(t)
	hm := Config{Device: sim.Device, BlobFile: filepath.Join(t.TempDir(), "hmac.blob"), Kind: KindHMAC}
	se := Config{Device: sim.Device, PersistentHandle: testHandle}
	createKey(t, hm)
	createKey(t, se)
	for _, c := range []struct {
		name string
		cfg  Config
		kind string
	}{{"hmac key, sealed config", hm, KindSealed}, {"sealed key, hmac config", se, KindHMAC}} {
		cfg := c.cfg
		cfg.Kind = c.kind
		if k, err := Open(testCtx(t), cfg); !errors.Is(err, ErrNotKEK) {
			if k != nil {
				k.Close()
			}
			t.Errorf("%s: Open = %v, want ErrNotKEK", c.name, err)
		}
	}
	assertNoHandles(t, sim)
	bad := Config{Device: sim.Device, BlobFile: "/x", Kind: KindHMAC, PCRs: []int{7}}
	if err := bad.Validate("tpm"); err == nil || !strings.Contains(err.Error(), "tpm.pcrs") {
		t.Errorf("Validate(kind hmac with PCRs) = %v", err)
	}
	bad = Config{Device: sim.Device, BlobFile: "/x", Kind: "aes"}
	if err := bad.Validate("tpm"); err == nil || !strings.Contains(err.Error(), "tpm.kind") {
		t.Errorf("Validate(kind aes) = %v", err)
	}
	if _, err := ImportKey(testCtx(t), Config{Device: sim.Device, BlobFile: filepath.Join(t.TempDir(), "i.blob"), Kind: KindHMAC}, nil); err == nil {
		t.Error("ImportKey with kind hmac succeeded")
	}
}

// TestConnectCommands counts what Open sends: a KEK of kind hmac in blob form
// creates the SRK once (parent and salt) and starts one session; the sealed kind two.
func TestConnectCommands(t *testing.T) {
	sim := swtpmtest.New(t)
	for _, c := range []struct {
		kind             string
		primary, session int
	}{{KindHMAC, 1, 1}, {KindSealed, 1, 2}} {
		t.Run(c.kind, func(t *testing.T) {
			cfg := Config{Device: sim.Device, BlobFile: filepath.Join(t.TempDir(), "kek.blob"), Kind: c.kind}
			createKey(t, cfg)
			x, err := latency.StartFor(sim.Device, latency.Profile{Name: "counting"})
			if err != nil {
				t.Fatal(err)
			}
			defer x.Close()
			cfg.Device = x.Device
			k, err := Open(testCtx(t), cfg)
			if err != nil {
				t.Fatal(err)
			}
			counts := x.Counts()
			if err := k.Close(); err != nil {
				t.Fatal(err)
			}
			if counts[0x131] != c.primary || counts[0x176] != c.session {
				t.Errorf("Open sent CreatePrimary x%d, StartAuthSession x%d; want %d and %d", counts[0x131], counts[0x176], c.primary, c.session)
			}
		})
	}
}
