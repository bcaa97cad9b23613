package tpm

import (
	"strings"
	"testing"
)

func TestConfigValidate(t *testing.T) {
	ok := Config{PersistentHandle: "0x81010010"}
	for _, tc := range []struct {
		name    string
		cfg     Config
		wantErr string // substring; "" means valid
	}{
		{"default device, persistent", ok, ""},
		{"blob", Config{BlobFile: "/var/lib/hwkms/kek.blob"}, ""},
		{"tcp", Config{Device: "tcp://127.0.0.1:2321", PersistentHandle: "0x81010010"}, ""},
		{"unix", Config{Device: "unix:///run/swtpm.sock", BlobFile: "kek"}, ""},
		{"tpm0", Config{Device: "/dev/tpm0", PersistentHandle: "0x817fffff", PCRs: []int{0, 7, 14}}, ""},
		{"stable pcrs", Config{PersistentHandle: "0x81010010", PCRs: []int{0, 1, 2, 3, 4, 5, 6, 7}}, ""},
		{"stable pcrs 8-9, 12-14", Config{PersistentHandle: "0x81010010", PCRs: []int{8, 9, 12, 13, 14}}, ""},
		{"volatile pcr 23", Config{PersistentHandle: "0x81010010", PCRs: []int{0, 7, 23}}, "keys[0].tpm.pcrs: PCR 23 changes while the system runs"},
		{"volatile pcr 10 names the allow field", Config{PersistentHandle: "0x81010010", PCRs: []int{7, 10}}, "PCR 10 changes while the system runs (IMA"},
		{"volatile pcr 11", Config{PersistentHandle: "0x81010010", PCRs: []int{11}}, "set keys[0].tpm.allowVolatilePCRs: true"},
		{"volatile pcr 15", Config{PersistentHandle: "0x81010010", PCRs: []int{15}}, "keys[0].tpm.pcrs: PCR 15"},
		{"volatile pcr 16", Config{PersistentHandle: "0x81010010", PCRs: []int{16}}, "keys[0].tpm.pcrs: PCR 16"},
		{"volatile pcr 17", Config{PersistentHandle: "0x81010010", PCRs: []int{17}}, "keys[0].tpm.pcrs: PCR 17"},
		{"volatile pcrs allowed", Config{PersistentHandle: "0x81010010", PCRs: []int{0, 7, 10, 11, 15, 16, 23}, AllowVolatilePCRs: true}, ""},
		{"srkName", Config{PersistentHandle: "0x81010010", SRKName: "000b" + strings.Repeat("a5", 32)}, ""},
		{"srkName uppercase", Config{PersistentHandle: "0x81010010", SRKName: "000B" + strings.Repeat("A5", 32)}, ""},
		{"srkName short", Config{PersistentHandle: "0x81010010", SRKName: "000b" + strings.Repeat("a5", 31)}, "keys[0].tpm.srkName:"},
		{"srkName sha1", Config{PersistentHandle: "0x81010010", SRKName: "0004" + strings.Repeat("a5", 32)}, "keys[0].tpm.srkName:"},
		{"srkName not hex", Config{PersistentHandle: "0x81010010", SRKName: "000b" + strings.Repeat("zz", 32)}, "keys[0].tpm.srkName:"},
		{"keyID", Config{BlobFile: "kek", KeyID: "tpm:000b" + strings.Repeat("0f", 32)}, ""},
		{"keyID without prefix", Config{BlobFile: "kek", KeyID: "000b" + strings.Repeat("0f", 32)}, "keys[0].tpm.keyID:"},
		{"keyID of pkcs11", Config{BlobFile: "kek", KeyID: "pkcs11:" + strings.Repeat("0f", 32)}, "keys[0].tpm.keyID:"},
		{"keyID short", Config{BlobFile: "kek", KeyID: "tpm:000b0f"}, "keys[0].tpm.keyID:"},
		{"neither key form", Config{}, "keys[0].tpm.persistentHandle: exactly one"},
		{"both key forms", Config{PersistentHandle: "0x81010010", BlobFile: "x"}, "keys[0].tpm.persistentHandle: exactly one"},
		{"decimal handle", Config{PersistentHandle: "2164326416"}, "keys[0].tpm.persistentHandle:"},
		{"transient handle", Config{PersistentHandle: "0x80000001"}, "keys[0].tpm.persistentHandle: 0x80000001 is not an owner persistent handle"},
		{"platform handle", Config{PersistentHandle: "0x81800000"}, "keys[0].tpm.persistentHandle:"},
		{"SRK range", Config{PersistentHandle: "0x81000001"}, "SRK range"},
		{"relative device", Config{Device: "tpm0", PersistentHandle: "0x81010010"}, "keys[0].tpm.device:"},
		{"bad scheme", Config{Device: "http://x:1", PersistentHandle: "0x81010010"}, "keys[0].tpm.device:"},
		{"tcp without port", Config{Device: "tcp://127.0.0.1", PersistentHandle: "0x81010010"}, "keys[0].tpm.device:"},
		{"tcp port 0", Config{Device: "tcp://127.0.0.1:0", PersistentHandle: "0x81010010"}, "keys[0].tpm.device:"},
		{"unix relative", Config{Device: "unix://run/x.sock", PersistentHandle: "0x81010010"}, "keys[0].tpm.device:"},
		{"pcr out of range", Config{PersistentHandle: "0x81010010", PCRs: []int{24}}, "keys[0].tpm.pcrs: PCR 24 out of range"},
		{"pcr negative", Config{PersistentHandle: "0x81010010", PCRs: []int{-1}}, "keys[0].tpm.pcrs:"},
		{"pcr twice", Config{PersistentHandle: "0x81010010", PCRs: []int{7, 7}}, "keys[0].tpm.pcrs: PCR 7 listed twice"},
		{"too many pcrs", Config{PersistentHandle: "0x81010010", PCRs: []int{0, 1, 2, 3, 4, 5, 6, 7, 8}}, "keys[0].tpm.pcrs:"},
		{"blob dir", Config{BlobFile: "/var/lib/"}, "keys[0].tpm.blobFile:"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.cfg.Validate("keys[0].tpm")
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("Validate = %v, want nil", err)
			case tc.wantErr != "" && err == nil:
				t.Fatalf("Validate = nil, want %q", tc.wantErr)
			case tc.wantErr != "" && !strings.Contains(err.Error(), tc.wantErr):
				t.Fatalf("Validate = %q, want it to contain %q", err, tc.wantErr)
			}
		})
	}
	if err := (Config{}).Validate(""); err == nil || !strings.HasPrefix(err.Error(), "persistentHandle:") {
		t.Errorf("empty prefix: %v", err)
	}
}

func TestParseDeviceRM(t *testing.T) {
	for dev, rm := range map[string]bool{"": true, "/dev/tpmrm0": true, "/dev/tpm0": false, "tcp://127.0.0.1:1": false, "unix:///x": false} {
		d, err := parseDevice(dev)
		if err != nil || d.rm != rm {
			t.Errorf("parseDevice(%q) = %+v, %v; want rm=%v", dev, d, err, rm)
		}
	}
}
