package main

import (
	"context"
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hwkms/hwkms/hsm"
	"github.com/hwkms/hwkms/plugin/config"
	"github.com/hwkms/hwkms/softhsm/softhsmtest"
)

// TestBenchAgainstServer runs `hwkms bench` against a real server on SoftHSM for each
// op and checks that it counts, verifies and reports.
func TestBenchAgainstServer(t *testing.T) {
	fx := softhsmtest.New(t)
	tok := softhsmtest.NewToken(t, fx)
	dir := shortDir(t)
	path := filepath.Join(dir, "hwkms.yaml")
	key := hsm.Config{Module: fx.Module, TokenLabel: tok.Label, PINFile: tok.PINFile, KeyLabel: "kek"}
	if _, err := hsm.CreateKey(context.Background(), key); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "kms.sock")
	writeYAML(t, path, &config.Config{Socket: config.Socket{Path: sock}, Keys: []config.Key{{PKCS11: &key}}})
	startServe(t, path)

	for _, op := range []string{"encrypt", "decrypt", "status", "mixed"} {
		t.Run(op, func(t *testing.T) {
			out, err := runCLI(t, "", "bench", "--socket", sock, "--op", op, "--concurrency", "1,4", "--ops", "200", "--distinct", "50", "--conns", "per-worker", "--json")
			if err != nil {
				t.Fatal(err)
			}
			lines := strings.Split(strings.TrimSpace(out), "\n")
			if len(lines) != 2 {
				t.Fatalf("want 2 result lines, got %q", out)
			}
			for i, l := range lines {
				var r benchResult
				if err := json.Unmarshal([]byte(l), &r); err != nil {
					t.Fatal(err)
				}
				if r.Count != 200 || r.Errors != 0 || r.Concurrency != []int{1, 4}[i] || r.P50us <= 0 || r.P99us < r.P50us || r.MaxUs < r.P99us {
					t.Fatalf("bad result %+v", r)
				}
			}
		})
	}
	// A socket nobody serves: every request fails and bench says so.
	if _, err := runCLI(t, "", "bench", "--socket", filepath.Join(dir, "none.sock"), "--op", "status", "--concurrency", "1", "--ops", "3", "--timeout", "200ms"); err == nil {
		t.Fatal("bench against a dead socket reported success")
	}
}
