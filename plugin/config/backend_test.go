package config

import (
	"context"
	"errors"
	"fmt"
	"regexp"
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

// mechKEK reports a mechanism, as hsm.KEK does.
type mechKEK struct {
	kek.KEK
	mech string
}

func (k mechKEK) Mechanism() string { return k.mech }

// TestDeviceStatsMechanism: the mechanism of a pkcs11 KEK reaches the metrics, and a
// name hsm does not define becomes "other" (a label takes bounded values only).
func TestDeviceStatsMechanism(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{hsm.MechanismAESGCM, "aes-gcm"},
		{hsm.MechanismAESGCMTokenIV, "aes-gcm-token-iv"},
		{hsm.MechanismAESCBCHMAC, "aes-cbc-hmac"},
		{hsm.MechanismRSAOAEP, "rsa-oaep"},
		{"aes-gcm\x00 injected", "other"},
		{"", ""},
	} {
		if got := DeviceStats(mechKEK{mech: tc.in}).Mechanism; got != tc.want {
			t.Errorf("DeviceStats(%q).Mechanism = %q, want %q", tc.in, got, tc.want)
		}
	}
}

// TestGenerateAdvice: for tpm2-pkcs11 the advice is the two tpm2_ptool commands with
// one fresh --id, the token and key labels of the config and the PIN read from the
// PIN file by the shell; other modules get the attributes to set.
func TestGenerateAdvice(t *testing.T) {
	t.Setenv("TPM2_PKCS11_TCTI", "tabrmd:bus_type=session")
	t.Setenv("TPM2_PKCS11_STORE", "/var/lib/tpm2 store")
	c := hsm.Config{Module: "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so", TokenLabel: "k8s kms", KeyLabel: "kek-1", PINFile: "/etc/hwkms/pin"}
	a, b := GenerateAdvice(c), GenerateAdvice(c)
	idRE := regexp.MustCompile(`--id ([0-9a-f]{32}) `)
	for _, alg := range []string{"aes256", "hmac:sha256"} {
		want := "TPM2TOOLS_TCTI=tabrmd:bus_type=session tpm2_ptool addkey --label 'k8s kms' --key-label kek-1 --id "
		if !strings.Contains(a, want) || !strings.Contains(a, "--algorithm "+alg+` --userpin "$(cat /etc/hwkms/pin)" --path '/var/lib/tpm2 store'`) {
			t.Errorf("advice lacks the %s command %q...:\n%s", alg, want, a)
		}
	}
	ids := idRE.FindAllStringSubmatch(a, -1)
	if len(ids) != 2 || ids[0][1] != ids[1][1] {
		t.Fatalf("advice must give both commands one --id: %q", ids)
	}
	if other := idRE.FindStringSubmatch(b); other == nil || other[1] == ids[0][1] {
		t.Errorf("two advices share --id %s: it must be fresh", ids[0][1])
	}
	g := GenerateAdvice(hsm.Config{Module: "/opt/vendor/libp11.so", KeyLabel: "kek-1", PINFile: "/etc/hwkms/pin"})
	if strings.Contains(g, "tpm2_ptool") || !strings.Contains(g, `labelled "kek-1"`) || !strings.Contains(g, "CKK_SHA256_HMAC") {
		t.Errorf("advice for another module: %s", g)
	}
}

// TestCreateAdviceOnlyForUnsupportedGenerate: only CKR_FUNCTION_NOT_SUPPORTED gets the
// advice, and the error stays typed.
func TestCreateAdviceOnlyForUnsupportedGenerate(t *testing.T) {
	p := pkcs11Key{hsm.Config{Module: "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so", TokenLabel: "t", KeyLabel: "k"}}
	unsupported := fmt.Errorf("hsm: C_GenerateKey on token %q: %w", "t", pkcs11.Error(pkcs11.CKR_FUNCTION_NOT_SUPPORTED))
	err := p.createAdvice(unsupported)
	var rv pkcs11.Error
	if !errors.As(err, &rv) || rv != pkcs11.CKR_FUNCTION_NOT_SUPPORTED || !strings.Contains(err.Error(), "tpm2_ptool addkey") {
		t.Errorf("createAdvice(CKR_FUNCTION_NOT_SUPPORTED) = %v", err)
	}
	other := fmt.Errorf("hsm: C_GenerateKey: %w", pkcs11.Error(pkcs11.CKR_TEMPLATE_INCONSISTENT))
	if got := p.createAdvice(other); got != other {
		t.Errorf("createAdvice changed another error: %v", got)
	}
}

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
