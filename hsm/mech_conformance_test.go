package hsm

import (
	"context"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/plugin/kek/kektest"
)

// TestMechanismConformance runs the kek.KEK conformance suite for every mechanism on
// SoftHSM2: aes-gcm, aes-cbc-hmac and rsa-oaep (SHA-1 OAEP there) on the token as it is, aes-gcm-token-iv under
// the CloudHSM, the Luna (before firmware 7.9.3) and the Cloud KMS (vendor
// mechanism CKM_CLOUDKMS_AES_GCM only) emulations.
func TestMechanismConformance(t *testing.T) {
	for _, tc := range []struct {
		name      string
		mechanism string
		emu       ivEmulation
	}{
		{"aes-gcm", MechanismAESGCM, ivAsSoftHSM},
		{"auto", MechanismAuto, ivAsSoftHSM},
		{"aes-cbc-hmac", MechanismAESCBCHMAC, ivAsSoftHSM},
		{"rsa-oaep", MechanismRSAOAEP, ivAsSoftHSM},
		{"aes-gcm-token-iv/EmulatedCloudHSM", MechanismAESGCMTokenIV, ivAsCloudHSM},
		{"aes-gcm-token-iv/EmulatedLunaBefore7.9.3", MechanismAESGCMTokenIV, ivAsLunaBefore793},
		{"aes-gcm-token-iv/EmulatedCloudKMS", MechanismAESGCMTokenIV, ivAsCloudHSM},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fx, toks := newTokens(t, 1)
			m := installMechTok(t)
			cloudKMS := strings.HasSuffix(tc.name, "EmulatedCloudKMS")
			m.set(func(m *mechTok) {
				m.iv = tc.emu
				if cloudKMS {
					m.vendorGCM = ckmCloudKMSAESGCM
					m.missing[pkcs11.CKM_AES_GCM] = true
				}
			})
			opener := func(label string) func(t *testing.T) kek.KEK {
				cfg := cfgFor(fx, toks[0], label)
				cfg.Mechanism = tc.mechanism
				if cloudKMS {
					cfg.GCMMechanism = ckmCloudKMSAESGCM
				}
				createKey(t, cfg)
				return func(t *testing.T) kek.KEK {
					t.Helper()
					k, err := Open(context.Background(), cfg)
					if err != nil {
						t.Fatalf("Open: %v", err)
					}
					if tc.mechanism != MechanismAuto && k.Mechanism() != tc.mechanism {
						t.Fatalf("Mechanism() = %q, want %q", k.Mechanism(), tc.mechanism)
					}
					return k
				}
			}
			kektest.Run(t, opener("kek"), kektest.WithOther(opener("other")))
		})
	}
}
