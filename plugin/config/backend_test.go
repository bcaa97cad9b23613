package config

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/miekg/pkcs11"

	"github.com/hwkms/hwkms/hsm"
	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/tpm"
)

// TestRegistryResolve: every backend is registered once, in frame-byte order, and a
// key resolves only with exactly one block.
func TestRegistryResolve(t *testing.T) {
	if got := Backends(); !slices.Equal(got, []string{"pkcs11", "tpm"}) {
		t.Fatalf("Backends() = %v, want [pkcs11 tpm]", got)
	}
	for _, tc := range []struct {
		name string
		key  Key
		want string // backend name, "" for an error
	}{
		{"pkcs11", Key{PKCS11: &hsm.Config{}}, "pkcs11"},
		{"tpm", Key{TPM: &tpm.Config{}}, "tpm"},
		{"none", Key{}, ""},
		{"both", Key{PKCS11: &hsm.Config{}, TPM: &tpm.Config{}}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := tc.key.Resolve()
			if tc.want == "" {
				if err == nil || !strings.Contains(err.Error(), "exactly one backend block (pkcs11 or tpm)") {
					t.Fatalf("Resolve = %v, %v; want the exactly-one error", b, err)
				}
				if tc.key.Backend() != "" {
					t.Fatalf("Backend() = %q, want \"\"", tc.key.Backend())
				}
				if _, err := OpenKey(context.Background(), tc.key); !errors.Is(err, errNoBackend) {
					t.Fatalf("OpenKey = %v, want errNoBackend", err)
				}
				return
			}
			if err != nil || b.Name() != tc.want || tc.key.Backend() != tc.want {
				t.Fatalf("Resolve = %v, %v; Backend() = %q; want %s", b, err, tc.key.Backend(), tc.want)
			}
		})
	}
}

// TestDeviceReason: each backend names only its own device's errors; the classes every
// backend shares are left to metrics.
func TestDeviceReason(t *testing.T) {
	for _, tc := range []struct {
		name string
		b    kek.Backend
		err  error
		want string
	}{
		{"ckr", kek.BackendPKCS11, fmt.Errorf("hsm: %w: %w", kek.ErrUnavailable, pkcs11.Error(pkcs11.CKR_DEVICE_REMOVED)), "CKR_DEVICE_REMOVED"},
		{"ckr on tpm", kek.BackendTPM, pkcs11.Error(pkcs11.CKR_DEVICE_REMOVED), ""},
		{"vendor ckr", kek.BackendPKCS11, pkcs11.Error(0x80001234), ""},
		{"tpm rc", kek.BackendTPM, fmt.Errorf("tpm: %w", tpm2.TPMRCInitialize), "TPM_RC_INITIALIZE"},
		{"tpm policy", kek.BackendTPM, fmt.Errorf("x: %w", tpm.ErrPolicy), "policy"},
		{"tpm transport", kek.BackendTPM, fmt.Errorf("tpm: %w", kek.ErrUnavailable), ""},
		{"pkcs11 not found", kek.BackendPKCS11, kek.ErrKeyNotFound, ""},
		{"test backend", kek.BackendTest, pkcs11.Error(pkcs11.CKR_DEVICE_REMOVED), ""},
		{"nil", kek.BackendPKCS11, nil, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := DeviceReason(tc.b, tc.err); got != tc.want {
				t.Fatalf("DeviceReason = %q, want %q", got, tc.want)
			}
		})
	}
}

// statsKEK reports what hsm.KEK and tpm.KEK report at scrape time.
type statsKEK struct {
	kek.KEK
	pool hsm.PoolStats
}

func (k statsKEK) Stats() hsm.PoolStats         { return k.pool }
func (k statsKEK) Reinits() (ok, failed uint64) { return 3, 7 }
func (k statsKEK) Reconnects() uint64           { return 2 }

// TestDeviceStats: DeviceStats reads every statistic a KEK reports and marks the
// others absent.
func TestDeviceStats(t *testing.T) {
	got := DeviceStats(statsKEK{pool: hsm.PoolStats{Size: 8, InUse: 5}})
	want := Stats{HasSessions: true, Sessions: 8, SessionsInUse: 5, HasReinits: true, ReinitsOK: 3, ReinitsFailed: 7, HasReconnects: true, Reconnects: 2}
	if got != want {
		t.Fatalf("DeviceStats = %+v, want %+v", got, want)
	}
	var plain struct{ kek.KEK }
	if got := DeviceStats(plain); got != (Stats{}) {
		t.Fatalf("DeviceStats of a KEK without statistics = %+v, want none", got)
	}
}
