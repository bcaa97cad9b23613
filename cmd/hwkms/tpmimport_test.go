package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hwkms/hwkms/plugin/config"
	"github.com/hwkms/hwkms/tpm"
	"github.com/hwkms/hwkms/tpm/provision"
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

// TestTPMClusterCLIWithEK is TestTPMClusterCLI with EK verification (docs/ha.md,
// "Check the nodes' TPMs with their EK certificates"): export-srk --ek, key create
// --ek-roots, key import activates with each node's EK; a file without an EK or with
// an EK from an untrusted CA stops the ceremony before any blob is written; tpm
// recover --ek-roots binds the recovered blob too.
func TestTPMClusterCLIWithEK(t *testing.T) {
	dir := shortDir(t)
	ca := swtpmtest.NewEKCA(t, "Test TPM Manufacturer")
	roots := filepath.Join(dir, "ek-roots.pem")
	if err := os.WriteFile(roots, ca.PEM, 0o644); err != nil {
		t.Fatal(err)
	}
	export := func(name string, ekCA *swtpmtest.EKCA, rsaEK bool) (string, string) {
		t.Helper()
		sim := swtpmtest.New(t)
		args := []string{"tpm", "export-srk", "--device", sim.Device, "--out", filepath.Join(dir, name+".pub")}
		if ekCA != nil {
			ekCA.ProvisionEK(t, sim, rsaEK)
			args = append(args, "--ek")
		}
		out, err := runCLI(t, "", args...)
		if err != nil || (ekCA != nil && !strings.Contains(out, "ek_name: 000b")) {
			t.Fatalf("export-srk %s: %q, %v", name, out, err)
		}
		return sim.Device, filepath.Join(dir, name+".pub")
	}
	dev0, pub0 := export("node0", ca, false)
	dev1, pub1 := export("node1", ca, true)
	_, plain := export("plain", nil, false)
	_, foreign := export("foreign", swtpmtest.NewEKCA(t, "Unknown Vendor"), false)

	blobs := filepath.Join(dir, "blobs")
	for name, pubs := range map[string]string{"no EK": pub0 + "," + plain, "untrusted EK": pub0 + "," + foreign} {
		_, err := runCLI(t, "", "key", "create", "--backend", "tpm", "--import-for", pubs, "--out-dir", blobs, "--ek-roots", roots)
		if !errors.Is(err, provision.ErrEKNotTrusted) {
			t.Errorf("key create --ek-roots with a node file with %s: %v, want ErrEKNotTrusted", name, err)
		}
		if entries, _ := os.ReadDir(blobs); len(entries) != 0 {
			t.Fatalf("key create --ek-roots failed (%s) but wrote %v", name, entries)
		}
	}

	key, escrowPub := filepath.Join(dir, "escrow.key"), filepath.Join(dir, "escrow.pub")
	if _, err := runCLI(t, "", "tpm", "escrow-keygen", "--out-key", key, "--out-pub", escrowPub); err != nil {
		t.Fatal(err)
	}
	// All or nothing: an escrow.import left from an earlier run stops the ceremony
	// before any node blob is written.
	if err := os.MkdirAll(blobs, 0o700); err != nil {
		t.Fatal(err)
	}
	stale := filepath.Join(blobs, "escrow.import")
	if err := os.WriteFile(stale, []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := runCLI(t, "", "key", "create", "--backend", "tpm", "--import-for", pub0+","+pub1,
		"--out-dir", blobs, "--ek-roots", roots, "--escrow-pub", escrowPub); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Fatalf("key create over an existing escrow.import: %v", err)
	}
	if _, err := os.Stat(filepath.Join(blobs, "node0.import")); err == nil {
		t.Fatal("a failed ceremony left node0.import behind")
	}
	if err := os.Remove(stale); err != nil {
		t.Fatal(err)
	}
	out, err := runCLI(t, "", "key", "create", "--backend", "tpm", "--import-for", pub0+","+pub1,
		"--out-dir", blobs, "--ek-roots", roots, "--escrow-pub", escrowPub)
	t.Logf("key create --ek-roots:\n%s", out)
	if err != nil || strings.Count(out, ", bound to EK 000b") != 2 {
		t.Fatalf("key create --ek-roots: %v", err)
	}
	keyID := strings.TrimSpace(strings.TrimPrefix(strings.Split(out, "\n")[0], "key_id:"))
	if _, err := runCLI(t, "", "key", "import", "--device", dev0, "--blob", filepath.Join(blobs, "node1.import"),
		"--blob-file", filepath.Join(dir, "x.kek")); !errors.Is(err, tpm.ErrWrongTPM) {
		t.Errorf("node 1's EK-bound blob on node 0: %v, want ErrWrongTPM", err)
	}
	var socks []string
	for i, dev := range []string{dev0, dev1} {
		kc := tpm.Config{Device: dev, BlobFile: filepath.Join(dir, fmt.Sprintf("node%d.kek", i))}
		out, err := runCLI(t, "", "key", "import", "--device", dev, "--blob", filepath.Join(blobs, fmt.Sprintf("node%d.import", i)), "--blob-file", kc.BlobFile)
		if err != nil || !strings.Contains(out, keyID) || !strings.Contains(out, "bound to this TPM's EK") {
			t.Fatalf("key import on node %d: %q, %v", i, out, err)
		}
		socks = append(socks, serveTPM(t, dir, fmt.Sprintf("n%d", i), kc))
	}

	// Recovery onto a new, certified TPM.
	devR, pubR := export("fresh", ca, false)
	rec := filepath.Join(dir, "recovered")
	if out, err := runCLI(t, "", "tpm", "recover", "--escrow-blob", filepath.Join(blobs, "escrow.import"), "--escrow-key", key,
		"--import-for", pubR, "--out-dir", rec, "--ek-roots", roots); err != nil || !strings.Contains(out, "bound to EK") {
		t.Fatalf("tpm recover --ek-roots: %q, %v", out, err)
	}
	kc := tpm.Config{Device: devR, BlobFile: filepath.Join(dir, "fresh.kek")}
	if out, err := runCLI(t, "", "key", "import", "--device", devR, "--blob", filepath.Join(rec, "fresh.import"), "--blob-file", kc.BlobFile); err != nil || !strings.Contains(out, keyID) {
		t.Fatalf("key import of the recovered EK-bound blob: %q, %v", out, err)
	}
	socks = append(socks, serveTPM(t, dir, "fresh", kc))
	if out, err := runCLI(t, "", "cluster-check", "--sockets", strings.Join(socks, ",")); err != nil || !strings.Contains(out, "cluster-check: ok, 3 nodes, key_id "+keyID) {
		t.Fatalf("cluster-check: %v\n%s", err, out)
	}
}
