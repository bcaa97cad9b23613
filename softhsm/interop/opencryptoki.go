package interop

import (
	"errors"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// opencryptoki's machine-global paths (compiled into opencryptoki 3.8; not
// configurable through the environment).
const (
	ockTokenDir = "/var/lib/opencryptoki/swtok"
	ockShm      = "/dev/shm/var.lib.opencryptoki.swtok"
	ockLockDir  = "/var/lock/opencryptoki"
	ockPIDFile  = "/var/run/pkcsslotd.pid"
	ockGroup    = "pkcs11"
	// ockSlot is the soft token's slot in the packaged /etc/opencryptoki/opencryptoki.conf.
	ockSlot = 3
	// ockDefaultSOPIN is the SO PIN of a never-initialised soft token.
	ockDefaultSOPIN = "87654321"
	// ockMarker, in ockTokenDir, says the token there was made by this fixture and
	// may be wiped.
	ockMarker = ".hwkms-interop"
)

var ockPackages = []string{"opencryptoki"}

// ockMu serialises the fixture inside a process; the flock serialises processes.
var ockMu sync.Mutex

// StartOpencryptoki wipes and initialises the opencryptoki soft token (slot 3) with a
// fresh label, SO PIN and user PIN, starts pkcsslotd in the foreground and returns
// the token. It holds the machine-wide opencryptoki lock until t's cleanup, which
// stops pkcsslotd and wipes the token again. It needs root.
func StartOpencryptoki(t testing.TB) *Token {
	t.Helper()
	libs := need(t, "opencryptoki", ockPackages,
		[]string{"pkcsslotd", "pkcsconf"},
		[]string{"/usr/lib/*/pkcs11/libopencryptoki.so", "/usr/lib/*/opencryptoki/stdll/libpkcs11_sw.so*"})
	if os.Geteuid() != 0 {
		t.Fatal("interop: the opencryptoki fixture must run as root: it owns the machine's pkcsslotd and " + ockTokenDir)
	}
	grp, err := user.LookupGroup(ockGroup)
	if err != nil {
		t.Fatalf("interop: opencryptoki needs the %q group (created by the opencryptoki package): %v", ockGroup, err)
	}
	gid, _ := strconv.Atoi(grp.Gid)

	lockOpencryptoki(t)
	if pid, ok := runningSlotd(); ok {
		t.Fatalf("interop: a pkcsslotd not started by this fixture is running (pid %d, %s); stop it first: the soft token is machine-wide", pid, ockPIDFile)
	}
	if err := ockWipe(gid, false); err != nil {
		t.Fatal(err)
	}
	var slotd *proc
	t.Cleanup(func() {
		// Runs after pkcsslotd was stopped (cleanups run last-registered first).
		if slotd != nil {
			// pkcsslotd leaves its PID file behind on SIGTERM; remove it if it is ours.
			if b, err := os.ReadFile(ockPIDFile); err == nil && strings.TrimSpace(string(b)) == strconv.Itoa(slotd.cmd.Process.Pid) {
				_ = os.Remove(ockPIDFile)
			}
		}
		if err := ockWipe(gid, true); err != nil {
			t.Errorf("interop: leaving the opencryptoki token clean: %v", err)
		}
	})

	slotd = startProc(t, nil, "pkcsslotd", "-f")
	slot := strconv.Itoa(ockSlot)
	waitFor(t, "pkcsslotd and the soft token", 30*time.Second, func() error {
		_, err := run(nil, "", nil, "pkcsconf", "-t", "-c", slot)
		return err
	}, slotd)

	tk := &Token{
		Impl:       "opencryptoki",
		Package:    "opencryptoki",
		Version:    dpkgVersion("opencryptoki"),
		Module:     libs[0],
		TokenLabel: "hwkms-ock-" + randHex(t, 4),
		PIN:        randHex(t, 4), // the soft token accepts PINs of 4 to 8 characters
	}
	so := randHex(t, 4)
	secrets := []string{so, tk.PIN}
	steps := []struct {
		stdin string
		args  []string
	}{
		// C_InitToken with the default SO PIN; pkcsconf reads the label on stdin.
		{tk.TokenLabel + "\n", []string{"-I", "-c", slot, "-S", ockDefaultSOPIN}},
		// A fresh SO PIN clears CKF_SO_PIN_TO_BE_CHANGED.
		{"", []string{"-P", "-c", slot, "-S", ockDefaultSOPIN, "-n", so}},
		// C_InitPIN as SO sets the user PIN (and clears CKF_USER_PIN_TO_BE_CHANGED).
		{"", []string{"-u", "-c", slot, "-S", so, "-n", tk.PIN}},
	}
	for _, s := range steps {
		if _, err := run(nil, s.stdin, secrets, "pkcsconf", s.args...); err != nil {
			t.Fatalf("interop: initialising the opencryptoki token: %v", err)
		}
	}
	tk.PINFile = writePIN(t, tk.PIN)
	describe(t, tk)
	return tk
}

// lockOpencryptoki takes the process mutex and the machine-wide flock, and releases
// both in t.Cleanup (registered first, so it runs after every other cleanup of the
// fixture).
func lockOpencryptoki(t testing.TB) {
	t.Helper()
	ockMu.Lock()
	path := filepath.Join(os.TempDir(), "hwkms-interop-opencryptoki.lock")
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		ockMu.Unlock()
		t.Fatalf("interop: opencryptoki lock: %v", err)
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
			t.Fatalf("interop: opencryptoki lock %s: %v (another test process holds the machine's soft token)", path, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Cleanup(func() {
		_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
		f.Close()
		ockMu.Unlock()
	})
}

// runningSlotd reports a live pkcsslotd named by the PID file.
func runningSlotd() (int, bool) {
	b, err := os.ReadFile(ockPIDFile)
	if err != nil {
		return 0, false
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, false
	}
	comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	if err != nil || strings.TrimSpace(string(comm)) != "pkcsslotd" {
		return 0, false
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err == nil {
		// A zombie (state Z) is not running.
		if f := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:])); len(f) > 0 && f[0] == "Z" {
			return 0, false
		}
	}
	return pid, true
}

// ockWipe empties the soft token's directory (refusing, unless final, a token with
// objects that this fixture did not make), recreates TOK_OBJ (the soft token silently keeps new token
// objects only in memory when it is missing; docs/tokens.md), removes the token's
// shared memory file and makes the lock directories pkcsslotd and the token use. When
// not final it leaves the marker that allows the next wipe.
func ockWipe(gid int, final bool) error {
	entries, err := os.ReadDir(ockTokenDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("interop: %w", err)
	}
	if !final {
		// Any opencryptoki client creates a default, uninitialised NVTOK.DAT, so only
		// a token holding objects counts as someone's.
		objs, _ := os.ReadDir(filepath.Join(ockTokenDir, "TOK_OBJ"))
		_, mkErr := os.Stat(filepath.Join(ockTokenDir, ockMarker))
		if len(objs) > 0 && mkErr != nil {
			return fmt.Errorf("interop: refusing to wipe the opencryptoki soft token in %s: it holds %d object files and was not made by this fixture (no %s); move it away to run these tests", ockTokenDir, len(objs), ockMarker)
		}
	}
	for _, e := range entries {
		if err := os.RemoveAll(filepath.Join(ockTokenDir, e.Name())); err != nil {
			return fmt.Errorf("interop: %w", err)
		}
	}
	if err := os.Remove(ockShm); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("interop: %w", err)
	}
	for _, d := range []string{ockTokenDir, filepath.Join(ockTokenDir, "TOK_OBJ"), ockLockDir, filepath.Join(ockLockDir, "swtok")} {
		if err := os.MkdirAll(d, 0o770); err != nil {
			return fmt.Errorf("interop: %w", err)
		}
		if err := os.Chown(d, 0, gid); err != nil {
			return fmt.Errorf("interop: %w", err)
		}
		if err := os.Chmod(d, 0o770); err != nil {
			return fmt.Errorf("interop: %w", err)
		}
	}
	if final {
		return nil
	}
	return os.WriteFile(filepath.Join(ockTokenDir, ockMarker), []byte("made by hwkms softhsm/interop; wiped by its next run\n"), 0o600)
}
