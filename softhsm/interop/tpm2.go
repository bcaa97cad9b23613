package interop

import (
	"net"
	"os"
	"path/filepath"
	"regexp"
	"testing"
	"time"
)

var tpm2Packages = []string{"libtpm2-pkcs11-1", "libtpm2-pkcs11-tools", "tpm2-abrmd", "libtss2-tcti-tabrmd0", "swtpm", "dbus-daemon"}

// tpm2TCTI is the TCTI the module and the tpm2 tools use: tpm2-abrmd on the session
// bus named by DBUS_SESSION_BUS_ADDRESS.
const tpm2TCTI = "tabrmd:bus_type=session"

var ptoolID = regexp.MustCompile(`(?m)^id: (\d+)$`)

// StartTPM2PKCS11 starts a swtpm (state in t.TempDir()), a private D-Bus session
// daemon and a tpm2-abrmd on it connected to the swtpm, makes a tpm2-pkcs11 store
// with tpm2_ptool (a primary object and one token with random PINs) and returns the
// token. It sets TPM2_PKCS11_STORE, TPM2_PKCS11_TCTI and DBUS_SESSION_BUS_ADDRESS
// with t.Setenv (the module reads them at C_Initialize), so t must not be parallel.
// The processes are stopped by PID in t.Cleanup.
func StartTPM2PKCS11(t testing.TB) *Token {
	t.Helper()
	libs := need(t, "tpm2-pkcs11", tpm2Packages,
		[]string{"swtpm", "dbus-daemon", "tpm2-abrmd", "tpm2_ptool", "tpm2_getrandom"},
		[]string{"/usr/lib/*/pkcs11/libtpm2_pkcs11.so", "/usr/lib/*/libtss2-tcti-tabrmd.so.0"})

	// unix socket paths are limited to 108 bytes and t.TempDir() is long.
	sock, err := os.MkdirTemp("", "hwkms-tp")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sock) }) // runs after the processes are stopped
	state := filepath.Join(t.TempDir(), "tpm")
	store := filepath.Join(t.TempDir(), "store")
	for _, d := range []string{state, store} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}

	// swtpm serves one connection at a time: only tpm2-abrmd talks to it. The swtpm
	// TCTI finds the control channel at the server path plus ".ctrl".
	tpmSock := filepath.Join(sock, "tpm")
	swtpm := startProc(t, nil, "swtpm", "socket", "--tpm2",
		"--tpmstate", "dir="+state,
		"--server", "type=unixio,path="+tpmSock,
		"--ctrl", "type=unixio,path="+tpmSock+".ctrl",
		"--flags", "not-need-init,startup-clear")
	waitFor(t, "swtpm", 30*time.Second, dialer(tpmSock), swtpm)

	busSock := filepath.Join(sock, "bus")
	bus := startProc(t, nil, "dbus-daemon", "--session", "--nofork", "--nopidfile", "--address=unix:path="+busSock)
	waitFor(t, "dbus-daemon", 30*time.Second, dialer(busSock), bus)
	busAddr := "unix:path=" + busSock

	env := []string{"DBUS_SESSION_BUS_ADDRESS=" + busAddr, "TPM2TOOLS_TCTI=" + tpm2TCTI}
	abrmdArgs := []string{"--session", "--tcti=swtpm:path=" + tpmSock}
	if os.Geteuid() == 0 {
		abrmdArgs = append(abrmdArgs, "--allow-root")
	}
	abrmd := startProc(t, env, "tpm2-abrmd", abrmdArgs...)
	waitFor(t, "tpm2-abrmd", 30*time.Second, func() error {
		_, err := run(env, "", nil, "tpm2_getrandom", "--hex", "8")
		return err
	}, abrmd, swtpm, bus)

	tk := &Token{
		Impl:       "tpm2-pkcs11",
		Package:    "libtpm2-pkcs11-1",
		Version:    dpkgVersion("libtpm2-pkcs11-1"),
		Module:     libs[0],
		TokenLabel: "hwkms-tpm-" + randHex(t, 4),
		PIN:        randHex(t, 8),
	}
	so := randHex(t, 8)
	out, err := run(env, "", nil, "tpm2_ptool", "init", "--path", store)
	if err != nil {
		t.Fatalf("interop: tpm2_ptool init: %v", err)
	}
	m := ptoolID.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("interop: tpm2_ptool init printed no primary object id: %q", out)
	}
	if _, err := run(env, "", []string{so, tk.PIN}, "tpm2_ptool", "addtoken", "--pid", m[1],
		"--sopin", so, "--userpin", tk.PIN, "--label", tk.TokenLabel, "--path", store); err != nil {
		t.Fatalf("interop: tpm2_ptool addtoken: %v", err)
	}
	tk.PINFile = writePIN(t, tk.PIN)
	tk.Env = map[string]string{
		"TPM2_PKCS11_STORE":        store,
		"TPM2_PKCS11_TCTI":         tpm2TCTI,
		"DBUS_SESSION_BUS_ADDRESS": busAddr,
	}
	for k, v := range tk.Env {
		t.Setenv(k, v)
	}
	describe(t, tk)
	return tk
}

// dialer reports whether a unix socket accepts a connection.
func dialer(path string) func() error {
	return func() error {
		c, err := net.DialTimeout("unix", path, time.Second)
		if err != nil {
			return err
		}
		return c.Close()
	}
}
