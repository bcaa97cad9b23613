package e2e

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The device fixtures below are deliberately local rather than imported from the
// plugin's softhsm and tpm/swtpm packages: depending on the root module would tie this
// module's go.mod to every change of the root's requirements.

// softhsmModulePaths are where Debian and source builds put libsofthsm2.so.
var softhsmModulePaths = []string{
	"/usr/lib/softhsm/libsofthsm2.so",
	"/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
	"/usr/local/lib/softhsm/libsofthsm2.so",
}

// softhsmToken writes a softhsm2.conf with its token directory under dir, initialises
// a token labelled label with softhsm2-util and returns the module path and the
// SOFTHSM2_CONF=... setting for child processes. The PINs are on softhsm2-util's
// command line: acceptable for a throwaway test token only.
func softhsmToken(t testing.TB, dir, label, soPIN, userPIN string) (module, confEnv string) {
	t.Helper()
	if p := os.Getenv("SOFTHSM2_MODULE"); p != "" {
		module = p
	}
	for _, p := range softhsmModulePaths {
		if module != "" {
			break
		}
		if _, err := os.Stat(p); err == nil {
			module = p
		}
	}
	if module == "" {
		t.Fatalf("libsofthsm2.so not found in %s: install softhsm2 (make deps) or set SOFTHSM2_MODULE", strings.Join(softhsmModulePaths, ", "))
	}
	util, err := exec.LookPath("softhsm2-util")
	if err != nil {
		t.Fatalf("softhsm2-util not in PATH: install softhsm2 (make deps)")
	}
	tokens := mkdir(t, filepath.Join(dir, "tokens"))
	conf := filepath.Join(dir, "softhsm2.conf")
	body := fmt.Sprintf("directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n", tokens)
	if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	confEnv = "SOFTHSM2_CONF=" + conf
	cmd := exec.Command(util, "--init-token", "--free", "--label", label, "--so-pin", soPIN, "--pin", userPIN)
	cmd.Env = append(os.Environ(), confEnv)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("softhsm2-util --init-token --label %s: %v: %s", label, err, out)
	}
	return module, confEnv
}

// swtpmSim is a swtpm serving the raw TPM 2.0 command stream on a unix socket.
type swtpmSim struct {
	proc   *proc
	socket string
	Device string // for the hwkms config: unix:///path
}

// startSwtpm starts `swtpm socket --tpm2` with its state in dir, powered on and
// started (TPM2_Startup(CLEAR)), and waits until TPM2_GetRandom answers. It is
// stopped by PID in t.Cleanup.
func startSwtpm(t testing.TB, dir string) *swtpmSim {
	t.Helper()
	bin, err := exec.LookPath("swtpm")
	if err != nil {
		t.Fatalf("swtpm not in PATH: install swtpm and swtpm-tools (make deps)")
	}
	mkdir(t, dir)
	sock := filepath.Join(shortTempDir(t), "tpm.sock")
	p := startProc(t, "swtpm", dir+".log", bin, []string{
		"socket", "--tpm2",
		"--tpmstate", "dir=" + dir,
		"--server", "type=unixio,path=" + sock,
		"--flags", "not-need-init,startup-clear",
		"--log", "level=1",
	}, nil)
	t.Cleanup(func() { p.stop(syscall.SIGTERM, 5*time.Second) })
	err = waitFor(context.Background(), 30*time.Second, 20*time.Millisecond, p, func(ctx context.Context) error {
		return tpmGetRandom(ctx, sock)
	})
	if err != nil {
		t.Fatalf("swtpm did not answer: %v\n%s", err, p.logTail(10))
	}
	return &swtpmSim{proc: p, socket: sock, Device: "unix://" + sock}
}

// tpmGetRandom sends TPM2_GetRandom(8) (TPM 2.0 Part 3, 16.1) and checks the
// response code is TPM_RC_SUCCESS.
func tpmGetRandom(ctx context.Context, sock string) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", sock)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	// tag TPM_ST_NO_SESSIONS, size 12, TPM_CC_GetRandom, bytesRequested 8
	if _, err := c.Write([]byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 8}); err != nil {
		return err
	}
	var hdr [10]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		return err
	}
	if rc := binary.BigEndian.Uint32(hdr[6:]); rc != 0 {
		return fmt.Errorf("TPM2_GetRandom: rc 0x%x", rc)
	}
	return nil
}
