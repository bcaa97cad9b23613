package main

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hwkms/hwkms/hsm"
	"github.com/hwkms/hwkms/plugin/config"
	"github.com/hwkms/hwkms/softhsm/softhsmtest"
	"github.com/hwkms/hwkms/tpm"
	"github.com/hwkms/hwkms/tpm/swtpm/swtpmtest"
)

// serveTPM writes a config serving kc on a socket in dir and starts serve().
func serveTPM(t *testing.T, dir, name string, kc tpm.Config) string {
	t.Helper()
	sock := filepath.Join(dir, name+".sock")
	path := filepath.Join(dir, name+".yaml")
	writeYAML(t, path, &config.Config{Socket: config.Socket{Path: sock}, Keys: []config.Key{{TPM: &kc}}})
	startServe(t, path)
	return sock
}

// TestTPMClusterCLI runs the operator procedure of docs/ha.md with the CLI on three
// swtpm nodes: export-srk, escrow-keygen, key create --import-for, key import,
// serve, cluster-check (passes); then a node with another key makes cluster-check
// fail; then tpm recover rebuilds a blob for a new TPM from the escrow.
func TestTPMClusterCLI(t *testing.T) {
	dir := shortDir(t)
	var pubs, socks, devices []string
	for i := range 3 {
		sim := swtpmtest.New(t)
		pub := filepath.Join(dir, fmt.Sprintf("node%d.pub", i))
		out, err := runCLI(t, "", "tpm", "export-srk", "--device", sim.Device, "--out", pub)
		if err != nil || !strings.Contains(out, "srk_name: 000b") {
			t.Fatalf("export-srk: %q, %v", out, err)
		}
		pubs = append(pubs, pub)
		devices = append(devices, sim.Device)
	}
	key, pubFile := filepath.Join(dir, "escrow.key"), filepath.Join(dir, "escrow.pub")
	if _, err := runCLI(t, "", "tpm", "escrow-keygen", "--out-key", key, "--out-pub", pubFile); err != nil {
		t.Fatal(err)
	}
	blobs := filepath.Join(dir, "blobs")
	out, err := runCLI(t, "", "key", "create", "--backend", "tpm", "--import-for", strings.Join(pubs, ","),
		"--out-dir", blobs, "--escrow-pub", pubFile)
	if err != nil {
		t.Fatal(err)
	}
	keyID := strings.TrimSpace(strings.TrimPrefix(strings.Split(out, "\n")[0], "key_id:"))
	if !strings.HasPrefix(keyID, "tpm:000b") {
		t.Fatalf("key create printed %q", out)
	}
	// Node 1's blob does not import on node 0 (before node 0 serves: swtpm takes
	// one connection at a time).
	if _, err := runCLI(t, "", "key", "import", "--device", devices[0], "--blob", filepath.Join(blobs, "node1.import"),
		"--blob-file", filepath.Join(dir, "x.kek")); !errors.Is(err, tpm.ErrWrongTPM) {
		t.Errorf("node 1's blob on node 0: %v, want ErrWrongTPM", err)
	}
	for i, dev := range devices {
		kc := tpm.Config{Device: dev, BlobFile: filepath.Join(dir, fmt.Sprintf("node%d.kek", i))}
		out, err := runCLI(t, "", "key", "import", "--device", dev, "--blob", filepath.Join(blobs, fmt.Sprintf("node%d.import", i)), "--blob-file", kc.BlobFile)
		if err != nil || !strings.Contains(out, keyID) {
			t.Fatalf("key import on node %d: %q, %v", i, out, err)
		}
		socks = append(socks, serveTPM(t, dir, fmt.Sprintf("n%d", i), kc))
	}

	out, err = runCLI(t, "", "cluster-check", "--sockets", strings.Join(socks, ","))
	t.Logf("cluster-check:\n%s", out)
	if err != nil || !strings.Contains(out, "cluster-check: ok, 3 nodes, key_id "+keyID) {
		t.Fatalf("cluster-check failed: %v", err)
	}

	// A node with its own key: cluster-check fails with a non-zero exit.
	odd := swtpmtest.New(t)
	oddKC := tpm.Config{Device: odd.Device, BlobFile: filepath.Join(dir, "odd.kek")}
	if _, err := tpm.CreateKey(context.Background(), oddKC); err != nil {
		t.Fatal(err)
	}
	oddSock := serveTPM(t, dir, "odd", oddKC)
	out, err = runCLI(t, "", "cluster-check", "--sockets", strings.Join([]string{socks[0], socks[1], oddSock}, ","))
	t.Logf("cluster-check with a foreign node:\n%s", out)
	var ee exitError
	if !errors.As(err, &ee) || ee != 1 || !strings.Contains(out, "MISMATCH") || !strings.Contains(out, "FAIL") {
		t.Fatalf("cluster-check with a foreign node: %v", err)
	}

	// Recovery: a new TPM gets a blob made from the escrow.
	fresh := swtpmtest.New(t)
	freshPub := filepath.Join(dir, "fresh.pub")
	if _, err := runCLI(t, "", "tpm", "export-srk", "--device", fresh.Device, "--out", freshPub); err != nil {
		t.Fatal(err)
	}
	rec := filepath.Join(dir, "recovered")
	if out, err := runCLI(t, "", "tpm", "recover", "--escrow-blob", filepath.Join(blobs, "escrow.import"), "--escrow-key", key,
		"--import-for", freshPub, "--out-dir", rec); err != nil || !strings.Contains(out, keyID) {
		t.Fatalf("tpm recover: %q, %v", out, err)
	}
	freshKC := tpm.Config{Device: fresh.Device, BlobFile: filepath.Join(dir, "fresh.kek")}
	if out, err := runCLI(t, "", "key", "import", "--device", fresh.Device, "--blob", filepath.Join(rec, "fresh.import"), "--blob-file", freshKC.BlobFile); err != nil || !strings.Contains(out, keyID) {
		t.Fatalf("key import of the recovered blob: %q, %v", out, err)
	}
	freshSock := serveTPM(t, dir, "fresh", freshKC)
	if out, err := runCLI(t, "", "cluster-check", "--sockets", strings.Join([]string{socks[0], freshSock}, ",")); err != nil {
		t.Fatalf("cluster-check with the recovered node: %v\n%s", err, out)
	}
}

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
