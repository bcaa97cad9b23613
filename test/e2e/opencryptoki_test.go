package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Scenario: a token without AES-GCM. opencryptoki 3.8's soft token has no CKM_AES_GCM
// (docs/tokens.md), so `hwkms key create` with a config that names no mechanism makes
// an aes-cbc-hmac key (an AES key and an HMAC key, one key_id) and `hwkms serve` wraps
// with CKM_AES_CBC_PAD then CKM_SHA256_HMAC. Secrets created through kube-apiserver
// are stored in etcd as KMS v2 values whose DEK seed is an hwkms body of version 0x03,
// and read back equal, also after a kube-apiserver restart (a fresh Decrypt through
// the token).
func TestSecretsThroughTokenWithoutGCM(t *testing.T) {
	c := newCluster(t, "pkcs11", clusterOptions{Device: newOpencryptokiDevice})
	var mech []string
	for _, r := range c.kms.logRecords("key opened") {
		mech = append(mech, fmt.Sprint(r["mechanism"]))
	}
	if len(mech) != 1 || mech[0] != "aes-cbc-hmac" {
		t.Fatalf("hwkms serve logged key opened with mechanism %q, want one key with aes-cbc-hmac", mech)
	}

	const n = 10
	want := map[string]map[string][]byte{}
	for i := range n {
		name := fmt.Sprintf("ock-%d", i)
		data, plain := newSecretData(t)
		want[name] = data
		c.createSecret(name, data)
		obj, raw := c.stored(name)
		if bytes.Contains(raw, plain) {
			t.Errorf("Secret default/%s: plaintext appears in the raw etcd value", name)
		}
		if obj.KeyID != c.KeyID {
			t.Errorf("Secret default/%s: stored key_id %q, want hwkms's %q", name, obj.KeyID, c.KeyID)
		}
		// hwkms's frame: version, backend byte (pkcs11 = 0x01), then the backend body,
		// whose first byte is its version: 0x03 is aes-cbc-hmac (hsm/doc.go).
		if src := obj.EncryptedDEKSource; len(src) < 3 || src[1] != 0x01 || src[2] != 0x03 {
			t.Errorf("Secret default/%s: DEK seed ciphertext starts % x, want a pkcs11 frame with body version 0x03 (aes-cbc-hmac)", name, src[:min(len(src), 3)])
		}
	}
	for name, data := range want {
		c.mustReadSecret(name, data)
	}
	since := len(c.kms.logRecords(""))
	c.api.restart()
	for name, data := range want {
		c.mustReadSecret(name, data)
	}
	counts := c.kms.requestCounts(since)
	t.Logf("after the kube-apiserver restart hwkms served: %v", counts)
	if counts["Decrypt OK"] == 0 {
		t.Errorf("the Secrets read after the kube-apiserver restart without a Decrypt through hwkms")
	}
}

// The opencryptoki fixture. It is a copy of softhsm/interop's StartOpencryptoki (kept
// local: this module does not depend on the root module) and shares its lock file and
// marker, so the two never use the machine's one soft token at once.
const (
	ockTokenDir     = "/var/lib/opencryptoki/swtok"
	ockShm          = "/dev/shm/var.lib.opencryptoki.swtok"
	ockLockDir      = "/var/lock/opencryptoki"
	ockPIDFile      = "/var/run/pkcsslotd.pid"
	ockSlot         = "3"
	ockDefaultSOPIN = "87654321"
	ockMarker       = ".hwkms-interop"
)

var ockModuleGlob = "/usr/lib/*/pkcs11/libopencryptoki.so"

// ockMu serialises the fixture inside this process; the flock, processes.
var ockMu sync.Mutex

// newOpencryptokiDevice wipes and initialises the opencryptoki soft token (slot 3)
// with a fresh label and random PINs, starts pkcsslotd in the foreground and returns
// the token as a pkcs11 device. It holds the machine-wide lock until t's cleanup,
// which stops pkcsslotd and wipes the token again. It needs root, the opencryptoki
// package and no other pkcsslotd running; it refuses to wipe a soft token it did not
// make (no marker file) that holds objects.
func newOpencryptokiDevice(t testing.TB, dir string) *device {
	t.Helper()
	mods, _ := filepath.Glob(ockModuleGlob)
	for _, b := range []string{"pkcsslotd", "pkcsconf"} {
		if _, err := exec.LookPath(b); err != nil || len(mods) == 0 {
			t.Fatalf("opencryptoki is not installed (%s, %s): apt-get install opencryptoki (make deps)", b, ockModuleGlob)
		}
	}
	if os.Geteuid() != 0 {
		t.Fatal("the opencryptoki scenario must run as root: it owns the machine's pkcsslotd and " + ockTokenDir)
	}
	grp, err := user.LookupGroup("pkcs11")
	if err != nil {
		t.Fatalf("opencryptoki needs the pkcs11 group: %v", err)
	}
	gid, _ := strconv.Atoi(grp.Gid)
	ockLock(t)
	if b, err := os.ReadFile(ockPIDFile); err == nil {
		if pid, _ := strconv.Atoi(strings.TrimSpace(string(b))); pid > 0 && syscall.Kill(pid, 0) == nil {
			if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); strings.TrimSpace(string(comm)) == "pkcsslotd" {
				t.Fatalf("a pkcsslotd not started by this test runs (pid %d); stop it first: the soft token is machine-wide", pid)
			}
		}
	}
	if err := ockWipe(gid, false); err != nil {
		t.Fatal(err)
	}
	var slotd *proc
	t.Cleanup(func() {
		if slotd != nil {
			if b, err := os.ReadFile(ockPIDFile); err == nil && strings.TrimSpace(string(b)) == strconv.Itoa(slotd.pid()) {
				_ = os.Remove(ockPIDFile)
			}
		}
		if err := ockWipe(gid, true); err != nil {
			t.Errorf("leaving the opencryptoki token clean: %v", err)
		}
	})
	slotd = startProc(t, "pkcsslotd", filepath.Join(dir, "pkcsslotd.log"), "pkcsslotd", []string{"-f"}, nil)
	t.Cleanup(func() { slotd.stop(syscall.SIGTERM, 5*time.Second) })
	if err := waitFor(context.Background(), 30*time.Second, 20*time.Millisecond, slotd, func(ctx context.Context) error {
		return exec.CommandContext(ctx, "pkcsconf", "-t", "-c", ockSlot).Run()
	}); err != nil {
		t.Fatalf("pkcsslotd did not answer: %v\n%s", err, slotd.logTail(10))
	}

	label := "hwkms-e2e-ock-" + randomHex(t, 4)
	pin, so := randomHex(t, 4), randomHex(t, 4) // the soft token takes PINs of 4 to 8 characters
	for _, s := range []struct {
		stdin string
		args  []string
	}{
		{label + "\n", []string{"-I", "-c", ockSlot, "-S", ockDefaultSOPIN}}, // C_InitToken
		{"", []string{"-P", "-c", ockSlot, "-S", ockDefaultSOPIN, "-n", so}}, // new SO PIN
		{"", []string{"-u", "-c", ockSlot, "-S", so, "-n", pin}},             // C_InitPIN
	} {
		cmd := exec.Command("pkcsconf", s.args...)
		cmd.Stdin = strings.NewReader(s.stdin)
		if out, err := cmd.CombinedOutput(); err != nil {
			// The PINs are throw-away, but keep them out of the log anyway.
			msg := strings.NewReplacer(pin, "***", so, "***").Replace(string(out))
			t.Fatalf("initialising the opencryptoki token (pkcsconf %s): %v: %s", s.args[0], err, msg)
		}
	}
	d := &device{t: t, kind: "pkcs11", dir: dir, module: mods[0], tokenLabel: label, pinFile: filepath.Join(dir, "user.pin")}
	if err := os.WriteFile(d.pinFile, []byte(pin+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return d
}

// ockLock takes the process mutex and the machine-wide flock (softhsm/interop's
// file), released in t.Cleanup after every other cleanup of the fixture.
func ockLock(t testing.TB) {
	t.Helper()
	ockMu.Lock()
	f, err := os.OpenFile(filepath.Join(os.TempDir(), "hwkms-interop-opencryptoki.lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		ockMu.Unlock()
		t.Fatalf("opencryptoki lock: %v", err)
	}
	deadline := time.Now().Add(5 * time.Minute)
	for {
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			break
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) || time.Now().After(deadline) {
			f.Close()
			ockMu.Unlock()
			t.Fatalf("opencryptoki lock %s: %v (another test process holds the machine's soft token)", f.Name(), err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Cleanup(func() {
		_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
		f.Close()
		ockMu.Unlock()
	})
}

// ockWipe empties the soft token's directory (refusing, unless final, a token with
// objects and no marker), recreates TOK_OBJ (without it the soft token keeps new
// token objects in memory only; docs/tokens.md), removes its shared memory file and
// makes the lock directories. When not final it leaves the marker.
func ockWipe(gid int, final bool) error {
	entries, err := os.ReadDir(ockTokenDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if !final {
		objs, _ := os.ReadDir(filepath.Join(ockTokenDir, "TOK_OBJ"))
		if _, mk := os.Stat(filepath.Join(ockTokenDir, ockMarker)); len(objs) > 0 && mk != nil {
			return fmt.Errorf("refusing to wipe the opencryptoki soft token in %s: it holds %d object files and was not made by hwkms's tests (no %s)", ockTokenDir, len(objs), ockMarker)
		}
	}
	for _, e := range entries {
		if err := os.RemoveAll(filepath.Join(ockTokenDir, e.Name())); err != nil {
			return err
		}
	}
	if err := os.Remove(ockShm); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	for _, d := range []string{ockTokenDir, filepath.Join(ockTokenDir, "TOK_OBJ"), ockLockDir, filepath.Join(ockLockDir, "swtok")} {
		if err := os.MkdirAll(d, 0o770); err != nil {
			return err
		}
		if err := os.Chown(d, 0, gid); err != nil {
			return err
		}
		if err := os.Chmod(d, 0o770); err != nil {
			return err
		}
	}
	if final {
		return nil
	}
	return os.WriteFile(filepath.Join(ockTokenDir, ockMarker), []byte("made by hwkms's tests; wiped by their next run\n"), 0o600)
}
