package test

import (
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

// TestSocketGroupOtherUser is what a non-root kube-apiserver sees (docs/operations.md,
// "Socket permissions"): hwkms runs as root, its socket directory is root:root 0750
// (what systemd's RuntimeDirectory makes), the config sets socket.mode 0660 and
// socket.group. A process of another user in that group must be able to call Status
// through the socket; one outside the group must not. Needs root (to serve as root and
// run the client as another user with setpriv).
func TestSocketGroupOtherUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("skipping: needs root to run the client as another user (CI runs as root)")
	}
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		t.Fatalf("setpriv (util-linux) is missing: %v", err)
	}
	const member, outsider = "65534", "65533" // nobody/nogroup, and a group nobody is in
	dev := startDev(t, "warn")
	base, err := os.ReadFile(filepath.Join(dev.Dir, "hwkms.yaml"))
	if err != nil {
		t.Fatal(err)
	}

	// Everything the other user needs on the way: a world-searchable base, the socket
	// directory as systemd makes it, and a copy of the binary it may execute.
	root, err := os.MkdirTemp("", "hwkms-grp")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	if err := os.Chmod(root, 0o755); err != nil {
		t.Fatal(err)
	}
	runDir := filepath.Join(root, "run")
	if err := os.Mkdir(runDir, 0o750); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(root, "hwkms")
	copyFile(t, hwkmsBin, bin, 0o755)
	sock := filepath.Join(runDir, "kms.sock")

	var cfg map[string]any
	if err := yaml.Unmarshal(base, &cfg); err != nil {
		t.Fatal(err)
	}
	cfg["socket"] = map[string]any{"path": sock, "mode": "0660", "group": member}
	out, err := yaml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "hwkms.yaml")
	if err := os.WriteFile(path, out, 0o600); err != nil {
		t.Fatal(err)
	}
	startHwkms(t, sock, softhsmEnv(dev.Dir), "serve", "--config", path)

	status := func(gid string) (string, error) {
		cmd := exec.Command(setpriv, "--reuid", "65534", "--regid", gid, "--clear-groups", bin, "status", "--socket", sock)
		cmd.Env = []string{"PATH=/usr/bin:/bin"}
		b, err := cmd.CombinedOutput()
		return string(b), err
	}
	if out, err := status(member); err != nil || !strings.Contains(out, "healthz: ok") {
		t.Fatalf("a member of socket.group cannot call Status: %v\n%s", err, out)
	}
	if out, err := status(outsider); err == nil || !strings.Contains(out, "permission denied") {
		t.Fatalf("a user outside socket.group reached the socket: %v\n%s", err, out)
	}
	di, err := os.Stat(runDir)
	if err != nil {
		t.Fatal(err)
	}
	if di.Mode().Perm() != 0o750 {
		t.Errorf("socket directory mode %04o, want 0750 (only its group changes)", di.Mode().Perm())
	}
}

func copyFile(t *testing.T, from, to string, mode os.FileMode) {
	t.Helper()
	src, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := os.OpenFile(to, os.O_CREATE|os.O_EXCL|os.O_WRONLY, mode)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		dst.Close()
		t.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
}
