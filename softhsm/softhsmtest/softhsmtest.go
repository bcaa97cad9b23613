// Package softhsmtest gives tests in any package a SoftHSM2 token of their own.
//
// SoftHSM2 reads SOFTHSM2_CONF once per process, in C_Initialize, so there is one
// fixture per test process: call Main from TestMain, which creates it in a temporary
// directory, sets SOFTHSM2_CONF, runs the tests and removes the directory.
//
//	func TestMain(m *testing.M) { softhsmtest.Main(m) }
//
// Each test then asks for a fresh token with a unique label (NewToken or Token), so
// tests never share token state.
//
// SoftHSM2 enumerates tokens at C_Initialize: a token made while the module is
// initialised in this process (some KEK still open) stays invisible until every user has
// closed and the module is initialised again. Make the tokens a test needs before it
// opens its first KEK, and close KEKs in t.Cleanup.
//
// When softhsm2-util or libsofthsm2.so is missing, New skips the test, or fails it if the
// CI environment variable is set, so a CI runner without SoftHSM2 cannot pass silently.
package softhsmtest

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/hwkms/hwkms/softhsm"
)

var (
	fixture    *softhsm.Fixture
	setupErr   error
	mainCalled bool
	seq        atomic.Uint64
)

// Main creates the process's SoftHSM2 fixture in a new temporary directory, sets
// SOFTHSM2_CONF to it, runs the tests, removes the directory and exits with m.Run's
// code. Call it from TestMain. If SoftHSM2 is missing, tests still run and New decides
// whether to skip or fail.
func Main(m *testing.M) {
	os.Exit(run(m))
}

// Run is Main without the exit: it creates the fixture, sets SOFTHSM2_CONF, runs m and
// removes the fixture, and returns m.Run's code, for a TestMain that has its own
// cleanup to do before it exits.
func Run(m *testing.M) int { return run(m) }

func run(m *testing.M) int {
	mainCalled = true
	dir, err := os.MkdirTemp("", "hwkms-softhsm-")
	if err != nil {
		setupErr = err
		return m.Run()
	}
	defer os.RemoveAll(dir)
	fixture, setupErr = setup(dir)
	return m.Run()
}

func setup(dir string) (*softhsm.Fixture, error) {
	if _, err := softhsm.Util(); err != nil {
		return nil, err
	}
	f, err := softhsm.New(dir)
	if err != nil {
		return nil, err
	}
	if err := os.Setenv(softhsm.ConfEnv, f.ConfPath); err != nil {
		return nil, err
	}
	return f, nil
}

// New returns the process's fixture. It fails the test if TestMain did not call Main, and
// skips it (fails it when CI is set) if SoftHSM2 is not installed.
func New(t testing.TB) *softhsm.Fixture {
	t.Helper()
	if !mainCalled {
		t.Fatal("softhsmtest: call softhsmtest.Main(m) from TestMain: SoftHSM2 reads SOFTHSM2_CONF once per process")
	}
	if setupErr != nil {
		unavailable(t, setupErr)
	}
	return fixture
}

// unavailable skips t, or fails it when the CI environment variable is set.
func unavailable(t testing.TB, err error) {
	t.Helper()
	if os.Getenv("CI") != "" {
		t.Fatalf("softhsmtest: SoftHSM2 is required when CI is set: %v", err)
		return
	}
	t.Skipf("softhsmtest: SoftHSM2 not available, skipping (install softhsm2; with CI set this fails): %v", err)
}

// TokenInfo is a token made for one test. PIN and SOPIN are random throw-away values;
// PINFile holds PIN followed by a newline, mode 0600, in the test's temp dir.
type TokenInfo struct {
	Label, Serial, PIN, SOPIN, PINFile string
}

// NewToken initialises a fresh token with a unique label and random PINs in fx and
// returns it. Call it before the test opens its first KEK on the module (see the
// package comment).
func NewToken(t testing.TB, fx *softhsm.Fixture) TokenInfo {
	t.Helper()
	tok := TokenInfo{
		Label: fmt.Sprintf("hwkms-%d-%s", seq.Add(1), randHex(t, 4)),
		PIN:   randHex(t, 8),
		SOPIN: randHex(t, 8),
	}
	tok.PINFile = filepath.Join(t.TempDir(), "pin")
	if err := os.WriteFile(tok.PINFile, []byte(tok.PIN+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	serial, err := fx.InitToken(tok.Label, tok.SOPIN, tok.PIN)
	if err != nil {
		t.Fatal(err)
	}
	tok.Serial = serial
	return tok
}

// Token is NewToken returning only the label and the PIN file.
func Token(t testing.TB, fx *softhsm.Fixture) (label, pinFile string) {
	t.Helper()
	tok := NewToken(t, fx)
	return tok.Label, tok.PINFile
}

func randHex(t testing.TB, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}
