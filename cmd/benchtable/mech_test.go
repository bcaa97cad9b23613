package main

import (
	"strings"
	"testing"
)

// TestParseFloors: benchmark names lose "Benchmark" and the -GOMAXPROCS suffix (also
// after a hyphenated sub-benchmark name), p50-ns and p99-ns become microseconds, and a
// benchmark without p50-ns gets its mean.
func TestParseFloors(t *testing.T) {
	out := `goos: linux
BenchmarkMechanism/aes-gcm-token-iv/wrap-2         	    3000	     52000 ns/op	     48000 p50-ns	    120000 p99-ns	     912 B/op	      21 allocs/op
BenchmarkMechanism/rsa-oaep/unwrap                 	    3000	   1500000 ns/op	   1400000 p50-ns	   2000000 p99-ns
BenchmarkGRPC/Encrypt-2   	    3000	     61000 ns/op
PASS
ok  	github.com/hwkms/hwkms/hsm	12.3s
`
	fl := parseFloors(strings.NewReader(out))
	for name, want := range map[string]floor{
		"Mechanism/aes-gcm-token-iv/wrap": {mean: 52, p50: 48, p99: 120},
		"Mechanism/rsa-oaep/unwrap":       {mean: 1500, p50: 1400, p99: 2000},
		"GRPC/Encrypt":                    {mean: 61, p50: 61},
	} {
		if got, ok := fl[name]; !ok || got != want {
			t.Errorf("floor %s = %+v (found %v), want %+v", name, got, ok, want)
		}
	}
	if len(fl) != 3 {
		t.Errorf("parsed %d floors, want 3: %v", len(fl), fl)
	}
}

// TestMechTable: each served mechanism's row divides the served p50 by raw + bare
// gRPC; aes-gcm-token-iv shows its emulated raw numbers and no served figure; a
// mechanism whose level answered nothing shows no ratio.
func TestMechTable(t *testing.T) {
	fl := map[string]floor{"GRPC/Encrypt": {p50: 60}, "GRPC/Decrypt": {p50: 40}}
	served := map[string]result{}
	for i, m := range mechanisms {
		fl["Mechanism/"+m.name+"/wrap"] = floor{p50: float64(100 * (i + 1))}
		fl["Mechanism/"+m.name+"/unwrap"] = floor{p50: float64(200 * (i + 1))}
		if m.served {
			served[m.name+"/encrypt"] = result{Op: "encrypt", Count: 10, P50us: float64(100*(i+1)) + 90}
			served[m.name+"/decrypt"] = result{Op: "decrypt", Count: 10, P50us: 2 * (float64(200*(i+1)) + 40)}
		}
	}
	served["rsa-oaep/decrypt"] = result{Op: "decrypt", Errors: 7}
	out := mechTable(fl, served)
	for _, want := range []string{
		"| aes-gcm | Encrypt | 190 us (0 errors) | 100 us wrap (Encrypt also unwraps to verify: 200 us) | 60 us | 1.19 |",
		"| aes-gcm | Decrypt | 480 us (0 errors) | 200 us | 40 us | 2.00 |",
		"| aes-gcm-token-iv | Encrypt | emulation only: see BenchmarkMechanism | 200 us wrap (Encrypt also unwraps to verify: 400 us) | 60 us | - |",
		"| aes-gcm-token-iv | Decrypt | emulation only: see BenchmarkMechanism | 400 us | 40 us | - |",
		"| aes-cbc-hmac | Encrypt | 390 us (0 errors) | 300 us wrap (Encrypt also unwraps to verify: 600 us) | 60 us | 1.08 |",
		"| rsa-oaep | Encrypt | 490 us (0 errors) | 400 us wrap (Encrypt also unwraps to verify: 800 us) | 60 us | 1.07 |",
		"| rsa-oaep | Decrypt | none (7 errors) | 800 us | 40 us | - |",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("mechanism table lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "PASS") || strings.Contains(out, "MISS") {
		t.Errorf("mechanism table has a verdict, but no target is set:\n%s", out)
	}
}
