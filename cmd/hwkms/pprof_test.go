package main

import (
	"io"
	"log/slog"
	"testing"
)

// TestPprofLoopbackOnly checks that HWKMS_PPROF accepts loopback addresses only and
// that unset means off.
func TestPprofLoopbackOnly(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	for _, tc := range []struct {
		name, addr string
		ok         bool
	}{
		{"unset", "", true},
		{"ipv4 loopback", "127.0.0.1:0", true},
		{"ipv6 loopback", "[::1]:0", true},
		{"localhost", "localhost:0", true},
		{"any address", ":0", false},
		{"all interfaces", "0.0.0.0:0", false},
		{"other host", "192.0.2.1:6060", false},
		{"no port", "127.0.0.1", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv(pprofEnv, tc.addr)
			err := startPprof(log)
			if tc.name == "ipv6 loopback" && err != nil {
				t.Skipf("no IPv6 loopback here: %v", err)
			}
			if (err == nil) != tc.ok {
				t.Fatalf("%s=%q: err %v, want ok %v", pprofEnv, tc.addr, err, tc.ok)
			}
		})
	}
}
