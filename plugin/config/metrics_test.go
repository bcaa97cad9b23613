package config

import (
	"strings"
	"testing"
)

func TestMetricsAddress(t *testing.T) {
	for _, tc := range []struct {
		name    string
		block   string
		wantErr string // "" means valid
	}{
		{"off by default", "", ""},
		{"ipv4 loopback", "metrics:\n  address: 127.0.0.1:9464\n", ""},
		{"other 127/8", "metrics:\n  address: 127.0.0.2:9464\n", ""},
		{"ipv6 loopback", "metrics:\n  address: \"[::1]:9464\"\n", ""},
		{"localhost", "metrics:\n  address: localhost:9464\n", ""},
		{"ephemeral port", "metrics:\n  address: 127.0.0.1:0\n", ""},
		{"every interface", "metrics:\n  address: \":9464\"\n", "metrics.address: \":9464\" listens on every interface"},
		{"public ip", "metrics:\n  address: 10.0.0.5:9464\n", "metrics.address: \"10.0.0.5\" is not a loopback address"},
		{"hostname", "metrics:\n  address: node1:9464\n", "metrics.address: \"node1\" is not a loopback address"},
		{"unspecified v4", "metrics:\n  address: 0.0.0.0:9464\n", "metrics.address"},
		{"no port", "metrics:\n  address: 127.0.0.1\n", "metrics.address: want host:port"},
		{"bad port", "metrics:\n  address: 127.0.0.1:http\n", "metrics.address: port"},
		{"big port", "metrics:\n  address: 127.0.0.1:70000\n", "metrics.address: port"},
		{"non-loopback allowed", "metrics:\n  address: 0.0.0.0:9464\n  allowNonLoopback: true\n", ""},
		{"every interface allowed", "metrics:\n  address: \":9464\"\n  allowNonLoopback: true\n", ""},
		{"unknown field", "metrics:\n  adress: 127.0.0.1:9464\n", "metrics.adress: unknown field"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Parse([]byte(validYAML + tc.block))
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				if tc.block == "" && c.Metrics.Address != "" {
					t.Fatalf("metrics on by default: %+v", c.Metrics)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("error %v, want one containing %q", err, tc.wantErr)
			}
		})
	}
}
