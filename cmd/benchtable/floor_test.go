package main

import (
	"strings"
	"testing"

	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/plugin/kek/kektest"
)

// TestMemKEKConformance: the in-memory floor is a kek.KEK like any other (a floor
// that cut corners would flatter every ratio).
func TestMemKEKConformance(t *testing.T) {
	open := func(t *testing.T) kek.KEK {
		t.Helper()
		k, err := newMemKEK()
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	kektest.Run(t, open, kektest.WithOther(open))
}

func TestRatioAndStormTables(t *testing.T) {
	fl := map[string]floor{"Unseal": {p50: 100}, "UnwrapHMAC": {p50: 50}, "GRPC/Decrypt": {p50: 60}}
	mem, hsm, tpm, hm := map[string]result{}, map[string]result{}, map[string]result{}, map[string]result{}
	for _, op := range []string{"encrypt", "decrypt"} {
		for _, c := range []string{"1", "8", "64"} {
			k := op + "/" + c
			mem[k] = result{OpsPerSec: 1000, Count: 1}
			hsm[k] = result{OpsPerSec: 700, Count: 1} // 0.70: passes 0.66
			tpm[k] = result{OpsPerSec: 200, Count: 1} // 0.20: misses 0.50 and 0.25, passes 0.15
			hm[k] = result{OpsPerSec: 600, Count: 1}  // 0.60: passes
		}
	}
	tpm["decrypt/1"] = result{OpsPerSec: 200, Count: 1, P50us: 200} // 200 <= 1.25 x 160
	hm["decrypt/1"] = result{OpsPerSec: 600, Count: 1, P50us: 200}  // 200 > 1.25 x 110
	out := ratioTable(fl, mem, hsm, tpm, hm)
	for _, want := range []string{
		"| SoftHSM2 | Decrypt | 64 | 700 (0 errors) | 1000 | 0.70 | >= 0.66 | PASS |",
		"| swtpm | Decrypt | 1 | 200 (0 errors) | 1000 | 0.20 | >= 0.50 | **MISS** |",
		"| swtpm | Encrypt | 64 | 200 (0 errors) | 1000 | 0.20 | >= 0.15 | PASS |",
		"| swtpm (kind hmac) | Encrypt | 8 | 600 (0 errors) | 1000 | 0.60 | >= 0.25 | PASS |",
		"| swtpm | Decrypt p50 | 1 | 200 us | raw Unseal 100 us + bare gRPC 60 us = 160 us | 1.25 | <= 1.25 | PASS |",
		"| swtpm (kind hmac) | Decrypt p50 | 1 | 200 us | raw UnwrapHMAC 50 us + bare gRPC 60 us = 110 us | 1.82 | <= 1.25 | **MISS** |",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("ratio table lacks %q:\n%s", want, out)
		}
	}
	storms := map[string]result{
		"sealed/true/200":  {Count: 200, Seconds: 2.8},
		"sealed/false/200": {Count: 150, Errors: 50, DeadlineExceeded: 50, Seconds: 3.3},
	}
	out = stormTable("slb9670", storms)
	for _, want := range []string{
		"| kind sealed, admission | 200, 32 | 2.80 s | 200 | 0 | 0 |",
		"0 missed | PASS |",
		"| kind sealed, no admission | 200, 32 | 3.30 s | 150 | 50 | 0 |",
		"0 missed | **MISS** |",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("storm table lacks %q:\n%s", want, out)
		}
	}
}
