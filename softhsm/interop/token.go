package interop

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/miekg/pkcs11"
)

// Token is a PKCS#11 token made for one test by one of the Start functions.
type Token struct {
	// Impl names the implementation: "SoftHSM2", "opencryptoki", "tpm2-pkcs11" or
	// "NSS softoken".
	Impl string
	// Package is the Debian package that ships Module; Version is its version
	// (dpkg-query).
	Package, Version string
	// LibraryVersion is C_GetInfo's libraryVersion ("major.minor"); Library is its
	// manufacturerID and libraryDescription.
	LibraryVersion, Library string
	// Module is the absolute path of the PKCS#11 module.
	Module string
	// TokenLabel is the token's label (CK_TOKEN_INFO.label, trailing blanks removed)
	// and Slot the slot it is in.
	TokenLabel string
	Slot       uint
	// PIN is the user PIN, a throw-away random value; PINFile holds PIN and a newline,
	// mode 0600, in the test's temp dir.
	PIN, PINFile string
	// InitArgs is the string C_Initialize must get in CK_C_INITIALIZE_ARGS.pReserved,
	// or "" when the module needs none.
	InitArgs string
	// Env holds the environment variables the module reads (already set in this
	// process by the fixture), for tests that start hwkms as a separate process.
	Env map[string]string
}

// String is "Impl Version".
func (tk *Token) String() string { return tk.Impl + " " + tk.Version }

// Initialize calls C_Initialize on c with tk.InitArgs, if any, as pReserved (and
// CKF_OS_LOCKING_OK, miekg/pkcs11's default flags).
func (tk *Token) Initialize(c *pkcs11.Ctx) error {
	if tk.InitArgs == "" {
		return c.Initialize()
	}
	// A NUL-terminated copy in Go memory without pointers: cgo lets C read it for
	// the duration of the call, and C_Initialize does not keep it.
	b := append([]byte(tk.InitArgs), 0)
	err := c.Initialize(pkcs11.InitializeWithReserved(unsafe.Pointer(&b[0])))
	runtime.KeepAlive(b)
	return err
}

// Open loads and initialises tk's module and finalises and unloads it in t.Cleanup.
func (tk *Token) Open(t testing.TB) *pkcs11.Ctx {
	t.Helper()
	c := pkcs11.New(tk.Module)
	if c == nil {
		t.Fatalf("interop: cannot load %s", tk.Module)
	}
	if err := tk.Initialize(c); err != nil {
		c.Destroy()
		t.Fatalf("interop: C_Initialize of %s: %v", tk.Module, err)
	}
	t.Cleanup(func() {
		if err := c.Finalize(); err != nil {
			t.Errorf("interop: C_Finalize of %s: %v", tk.Module, err)
		}
		c.Destroy()
	})
	return c
}

// describe fills the C_GetInfo fields and Slot of tk by loading the module once,
// which also proves the token answers. The module is finalised again.
func describe(t testing.TB, tk *Token) {
	t.Helper()
	c := pkcs11.New(tk.Module)
	if c == nil {
		t.Fatalf("interop: cannot load %s", tk.Module)
	}
	defer c.Destroy()
	if err := tk.Initialize(c); err != nil {
		t.Fatalf("interop: C_Initialize of %s: %v", tk.Module, err)
	}
	defer c.Finalize() //nolint:errcheck // reported by the next C_Initialize if it matters
	info, err := c.GetInfo()
	if err != nil {
		t.Fatalf("interop: C_GetInfo of %s: %v", tk.Module, err)
	}
	tk.LibraryVersion = fmt.Sprintf("%d.%d", info.LibraryVersion.Major, info.LibraryVersion.Minor)
	tk.Library = strings.TrimSpace(info.ManufacturerID) + " / " + strings.TrimSpace(info.LibraryDescription)
	slot, err := findSlot(c, tk.TokenLabel)
	if err != nil {
		t.Fatalf("interop: %s: %v", tk.Impl, err)
	}
	tk.Slot = slot
}

// findSlot returns the slot whose token has label.
func findSlot(c *pkcs11.Ctx, label string) (uint, error) {
	slots, err := c.GetSlotList(true)
	if err != nil {
		return 0, fmt.Errorf("C_GetSlotList: %w", err)
	}
	var seen []string
	for _, s := range slots {
		ti, err := c.GetTokenInfo(s)
		if err != nil {
			continue
		}
		l := strings.TrimRight(ti.Label, " \x00")
		if l == label {
			return s, nil
		}
		seen = append(seen, fmt.Sprintf("%d:%q", s, l))
	}
	return 0, fmt.Errorf("no token labelled %q (slots with tokens: %s)", label, strings.Join(seen, " "))
}

// unavailable skips t when CI is unset, and fails it otherwise, naming the packages.
func unavailable(t testing.TB, impl string, pkgs []string, err error) {
	t.Helper()
	cmd := "apt-get install --no-install-recommends " + strings.Join(pkgs, " ")
	if os.Getenv("CI") != "" {
		t.Fatalf("interop: %s is required when CI is set (%s): %v", impl, cmd, err)
	}
	t.Skipf("interop: %s not installed, skipping (install with: %s; with CI set this fails): %v", impl, cmd, err)
}

// need checks that every binary is in PATH and every library glob matches, and
// returns the first match of each glob. It skips or fails t (unavailable) otherwise.
func need(t testing.TB, impl string, pkgs, bins, libGlobs []string) []string {
	t.Helper()
	var missing []string
	for _, b := range bins {
		if _, err := exec.LookPath(b); err != nil {
			missing = append(missing, b)
		}
	}
	var libs []string
	for _, g := range libGlobs {
		m, _ := filepath.Glob(g)
		if len(m) == 0 {
			missing = append(missing, g)
			continue
		}
		libs = append(libs, m[0])
	}
	if len(missing) > 0 {
		unavailable(t, impl, pkgs, fmt.Errorf("missing %s", strings.Join(missing, ", ")))
	}
	return libs
}

// dpkgVersion returns the installed version of a Debian package, or "unknown".
func dpkgVersion(pkg string) string {
	out, err := exec.Command("dpkg-query", "-W", "-f=${Version}", pkg).Output()
	if err != nil || len(out) == 0 {
		return "unknown"
	}
	return string(out)
}

func randHex(t testing.TB, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// writePIN writes pin and a newline to a 0600 file in t's temp dir.
func writePIN(t testing.TB, pin string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "pin")
	if err := os.WriteFile(p, []byte(pin+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// run runs a command to completion (at most a minute) with extra environment and
// stdin, and returns its combined output. Secrets passed as arguments are scrubbed
// from the error.
func run(env []string, stdin string, secrets []string, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), env...)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		msg := fmt.Sprintf("%s %s: %v: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(out))
		for _, s := range secrets {
			if s != "" {
				msg = strings.ReplaceAll(msg, s, "***")
			}
		}
		return string(out), errors.New(msg)
	}
	return string(out), nil
}

// proc is a fixture process started by startProc.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
}

// startProc starts a long-running process in its own process group, with its output
// in a log file in t's temp dir, and stops it by PID in t.Cleanup.
func startProc(t testing.TB, env []string, name string, args ...string) *proc {
	t.Helper()
	logPath := filepath.Join(t.TempDir(), filepath.Base(name)+".log")
	lf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer lf.Close()
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("interop: start %s: %v", name, err)
	}
	p := &proc{name: filepath.Base(name), cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		if err := p.stop(); err != nil {
			t.Errorf("interop: %v", err)
		}
	})
	return p
}

// stop sends SIGTERM to the process, then SIGKILL after 5 s, and waits for it.
func (p *proc) stop() error {
	select {
	case <-p.done:
		return nil
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return nil
	case <-time.After(5 * time.Second):
	}
	_ = p.cmd.Process.Kill()
	select {
	case <-p.done:
		return fmt.Errorf("%s (pid %d) ignored SIGTERM for 5 s and was killed", p.name, p.cmd.Process.Pid)
	case <-time.After(5 * time.Second):
		return fmt.Errorf("%s (pid %d) did not exit after SIGKILL", p.name, p.cmd.Process.Pid)
	}
}

// logTail returns the end of the process's log.
func (p *proc) logTail() string {
	b, _ := os.ReadFile(p.log)
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return string(bytes.TrimSpace(b))
}

// waitFor polls ready with a growing interval until it succeeds, one of procs exits
// or timeout passes, and fails t in the last two cases.
func waitFor(t testing.TB, what string, timeout time.Duration, ready func() error, procs ...*proc) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	interval := 5 * time.Millisecond
	for {
		err := ready()
		if err == nil {
			return
		}
		for _, p := range procs {
			select {
			case <-p.done:
				t.Fatalf("interop: %s exited while waiting for %s: %v; log: %s", p.name, what, p.cmd.ProcessState, p.logTail())
			default:
			}
		}
		if time.Now().After(deadline) {
			var logs []string
			for _, p := range procs {
				logs = append(logs, p.name+": "+p.logTail())
			}
			t.Fatalf("interop: %s not ready after %v: %v; logs: %s", what, timeout, err, strings.Join(logs, " | "))
		}
		time.Sleep(interval)
		interval = min(2*interval, 250*time.Millisecond)
	}
}
