package config

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hwkms/hwkms/hsm"
	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/softhsm/softhsmtest"
	"github.com/hwkms/hwkms/tpm"
	"github.com/hwkms/hwkms/tpm/swtpm/swtpmtest"
)

// TestBackendLifecycle drives each backend through the registry exactly as the
// commands do (key create, list, rotate, destroy, doctor, serve's open) on a real
// device: SoftHSM2 and swtpm.
func TestBackendLifecycle(t *testing.T) {
	for _, tc := range []struct {
		name string
		key  func(t *testing.T) Key
		opts func(t *testing.T) RotateOptions
	}{
		{
			name: "pkcs11",
			key: func(t *testing.T) Key {
				fx := softhsmtest.New(t)
				tok := softhsmtest.NewToken(t, fx)
				return Key{PKCS11: &hsm.Config{Module: fx.Module, TokenLabel: tok.Label, PINFile: tok.PINFile, KeyLabel: "kek-lifecycle"}}
			},
			opts: func(*testing.T) RotateOptions { return RotateOptions{Stamp: "t1", Label: "kek-lifecycle-2"} },
		},
		{
			name: "tpm",
			key: func(t *testing.T) Key {
				sim := swtpmtest.New(t)
				return Key{TPM: &tpm.Config{Device: sim.Device, BlobFile: filepath.Join(t.TempDir(), "kek.blob")}}
			},
			opts: func(t *testing.T) RotateOptions {
				return RotateOptions{Stamp: "t1", BlobFile: filepath.Join(t.TempDir(), "kek-2.blob")}
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			key := tc.key(t)
			b, err := key.Resolve()
			if err != nil {
				t.Fatalf("Resolve: %v", err)
			}
			if b.Name() != tc.name || key.Backend() != tc.name {
				t.Fatalf("Name %q, Backend %q; want %q", b.Name(), key.Backend(), tc.name)
			}

			// Before create: not present, not any key_id.
			if d := b.Describe(ctx); d.Present || d.Err == nil && d.KeyID != "-" {
				t.Fatalf("Describe before create: %+v", d)
			}
			if is, err := b.Is(ctx, "p11:00"); err != nil || is {
				t.Fatalf("Is before create = %v, %v; want false, nil", is, err)
			}

			created, err := b.Create(ctx)
			if err != nil {
				t.Fatalf("Create: %v", err)
			}
			if created.KeyID == "" || created.Where == "" {
				t.Fatalf("Create returned %+v", created)
			}
			if _, err := b.Create(ctx); !errors.Is(err, kek.ErrKeyExists) {
				t.Fatalf("second Create: %v, want ErrKeyExists", err)
			}
			d := b.Describe(ctx)
			if !d.Present || d.KeyID != created.KeyID || d.Err != nil || d.Where == "" {
				t.Fatalf("Describe after create: %+v, want present %s", d, created.KeyID)
			}
			if is, err := b.Is(ctx, created.KeyID); err != nil || !is {
				t.Fatalf("Is(own key_id) = %v, %v", is, err)
			}
			if is, err := b.Is(ctx, created.KeyID+"x"); err != nil || is {
				t.Fatalf("Is(other key_id) = %v, %v", is, err)
			}

			// Serve's open: the KEK round-trips and reports the same key_id.
			k, err := b.Open(ctx)
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			if k.ID() != created.KeyID {
				t.Fatalf("opened key_id %s, created %s", k.ID(), created.KeyID)
			}
			body, err := k.Wrap(ctx, []byte("0123456789abcdef0123456789abcdef"), []byte("aad"))
			if err != nil {
				t.Fatalf("Wrap: %v", err)
			}
			if pt, err := k.Unwrap(ctx, body, []byte("aad")); err != nil || string(pt) != "0123456789abcdef0123456789abcdef" {
				t.Fatalf("Unwrap: %v", err)
			}
			if s := DeviceStats(k); tc.name == "pkcs11" && !s.HasSessions {
				t.Fatalf("DeviceStats of a PKCS#11 KEK: %+v", s)
			}
			if err := k.Close(); err != nil {
				t.Fatal(err)
			}

			// Doctor's device checks pass on a healthy key.
			var log checkLog
			b.Check(ctx, &log, CheckOptions{Name: "keys[0] (" + tc.name + ", primary)", ConfigPath: "/etc/hwkms/hwkms.yaml", Timeout: 10 * time.Second})
			all := strings.Join(log.lines, "\n")
			if strings.Contains(all, "[FAIL]") || !strings.Contains(all, "[ok]") {
				t.Fatalf("doctor on a healthy key:\n%s", all)
			}

			// Rotation makes a different key on the same device.
			next, err := b.Rotate(ctx, tc.opts(t))
			if err != nil {
				t.Fatalf("Rotate: %v", err)
			}
			if next.KeyID == "" || next.KeyID == created.KeyID {
				t.Fatalf("Rotate made key_id %q (old %q)", next.KeyID, created.KeyID)
			}
			nb, err := next.Key.Resolve()
			if err != nil {
				t.Fatal(err)
			}
			if is, err := nb.Is(ctx, next.KeyID); err != nil || !is {
				t.Fatalf("rotated key's config does not select it: %v, %v", is, err)
			}

			// Destroy the old key: gone, and the new one stays.
			if err := b.Destroy(ctx); err != nil {
				t.Fatalf("Destroy: %v", err)
			}
			if d := b.Describe(ctx); d.Present {
				t.Fatalf("Describe after destroy: %+v", d)
			}
			if _, err := b.Open(ctx); !errors.Is(err, kek.ErrKeyNotFound) {
				t.Fatalf("Open after destroy: %v, want ErrKeyNotFound", err)
			}
			if d := nb.Describe(ctx); !d.Present || d.KeyID != next.KeyID {
				t.Fatalf("rotated key after the old one's destroy: %+v", d)
			}
		})
	}
}

// TestPKCS11AttributeWarning: a key whose CKA_MODIFIABLE and CKA_COPYABLE are true
// (made by another tool, or on a token that refused them false) is described and
// checked with a warning naming both; a key hwkms made has neither.
func TestPKCS11AttributeWarning(t *testing.T) {
	fx := softhsmtest.New(t)
	tok := softhsmtest.NewToken(t, fx)
	ctx := context.Background()
	locked := Key{PKCS11: &hsm.Config{Module: fx.Module, TokenLabel: tok.Label, PINFile: tok.PINFile, KeyLabel: "kek-locked"}}
	b, err := locked.Resolve()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.Create(ctx); err != nil {
		t.Fatal(err)
	}
	if d := b.Describe(ctx); strings.Contains(d.Detail, "WARNING") {
		t.Fatalf("a key hwkms made is described with a warning: %s", d.Detail)
	}
	var log checkLog
	b.Check(ctx, &log, CheckOptions{Name: "keys[0]", Timeout: 10 * time.Second})
	if all := strings.Join(log.lines, "\n"); strings.Contains(all, "CKA_MODIFIABLE") {
		t.Fatalf("doctor warns about a key hwkms made:\n%s", all)
	}
	// Describe and Check of a KeyInfo that reports both attributes true.
	info := hsm.KeyInfo{KeyID: "p11:x", Label: "l", CKAID: "01", Sensitive: true, NeverExtractable: true, Private: true, Modifiable: true, Copyable: true}
	d := b.(pkcs11Key).describe(info)
	if !strings.Contains(d.Detail, "CKA_MODIFIABLE") || !strings.Contains(d.Detail, "CKA_COPYABLE") {
		t.Fatalf("key list detail for a modifiable, copyable key: %q", d.Detail)
	}
}
