package main

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hwkms/hwkms/hsm"
	"github.com/hwkms/hwkms/plugin/config"
	"github.com/hwkms/hwkms/softhsm/softhsmtest"
)

// TestPKCS11ReplicateCLI: key create --replicable, key replicate, and cluster-check
// across two SoftHSM tokens.
func TestPKCS11ReplicateCLI(t *testing.T) {
	fx := softhsmtest.New(t)
	dir := shortDir(t)
	var paths, socks []string
	for i := range 2 {
		tok := softhsmtest.NewToken(t, fx)
		kc := hsm.Config{Module: fx.Module, TokenLabel: tok.Label, PINFile: tok.PINFile, KeyLabel: "kek-ha"}
		if i == 0 {
			kc.AllowExtractable = true // the replicable source
		} else {
			kc.AllowReplicated = true
		}
		p := filepath.Join(dir, fmt.Sprintf("p%d.yaml", i))
		writeYAML(t, p, &config.Config{Socket: config.Socket{Path: filepath.Join(dir, fmt.Sprintf("p%d.sock", i))}, Keys: []config.Key{{PKCS11: &kc}}})
		paths = append(paths, p)
		socks = append(socks, filepath.Join(dir, fmt.Sprintf("p%d.sock", i)))
	}
	if _, err := runCLI(t, "", "key", "create", "--config", paths[0], "--replicable"); err != nil {
		t.Fatal(err)
	}
	if _, err := runCLI(t, "", "key", "replicate", "--config", paths[0], "--to-config", paths[1]); err != nil {
		t.Fatal(err)
	}
	for _, p := range paths {
		startServe(t, p)
	}
	if out, err := runCLI(t, "", "cluster-check", "--sockets", strings.Join(socks, ",")); err != nil {
		t.Fatalf("cluster-check: %v\n%s", err, out)
	}
}
