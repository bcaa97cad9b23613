// Package softhsm is a SoftHSM2 fixture for tests and for `hwkms dev`: it finds
// libsofthsm2.so, writes a softhsm2.conf whose token directory lives under a directory
// the caller owns, and initialises tokens with softhsm2-util.
//
// It owns nothing on a production path. InitToken passes the SO and user PINs to
// softhsm2-util on its command line, where other local users can read them (ps,
// /proc/PID/cmdline); that is acceptable only for throw-away test and dev tokens and is
// the reason this package must never be used against a real token.
//
// SoftHSM2 reads SOFTHSM2_CONF once, in C_Initialize. This package never sets it in the
// current process: a caller that loads the module in-process sets it (see
// softhsm/softhsmtest), and a child process gets it from Env.
package softhsm

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// ModuleEnv is the environment variable that overrides where Module looks for
// libsofthsm2.so.
const ModuleEnv = "SOFTHSM2_MODULE"

// ConfEnv is the environment variable SoftHSM2 reads its configuration path from.
const ConfEnv = "SOFTHSM2_CONF"

// modulePaths are the places Module looks, in order, after ModuleEnv.
var modulePaths = []string{
	"/usr/lib/softhsm/libsofthsm2.so",
	"/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
	"/usr/local/lib/softhsm/libsofthsm2.so",
}

// Module returns the path of libsofthsm2.so: the value of SOFTHSM2_MODULE if set (it
// must exist), else the first of /usr/lib/softhsm/libsofthsm2.so,
// /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so and
// /usr/local/lib/softhsm/libsofthsm2.so that exists. It returns an error if none does.
func Module() (string, error) {
	if p := os.Getenv(ModuleEnv); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("softhsm: %s=%q: %w", ModuleEnv, p, err)
		}
		return p, nil
	}
	for _, p := range modulePaths {
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() {
			return p, nil
		}
	}
	return "", fmt.Errorf("softhsm: libsofthsm2.so not found (set %s or install softhsm2; looked in %s)",
		ModuleEnv, strings.Join(modulePaths, ", "))
}

// Util returns the path of softhsm2-util from PATH, or an error if it is not installed.
func Util() (string, error) {
	p, err := exec.LookPath("softhsm2-util")
	if err != nil {
		return "", fmt.Errorf("softhsm: softhsm2-util not found in PATH (install softhsm2): %w", err)
	}
	return p, nil
}

// Fixture is a SoftHSM2 configuration and token directory. Dir is the directory the
// caller gave New; ConfPath is Dir/softhsm2.conf; TokenDir is Dir/tokens; Module is the
// path of libsofthsm2.so.
type Fixture struct {
	Dir, ConfPath, TokenDir, Module string
}

// New writes Dir/softhsm2.conf (directories.tokendir = Dir/tokens, objectstore.backend =
// file, log.level = ERROR) and creates Dir/tokens. It does not set SOFTHSM2_CONF in this
// process; callers that load the module in-process do, and Env returns the setting for
// child processes. dir must exist.
func New(dir string) (*Fixture, error) {
	mod, err := Module()
	if err != nil {
		return nil, err
	}
	dir, err = filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("softhsm: %w", err)
	}
	f := &Fixture{
		Dir:      dir,
		ConfPath: filepath.Join(dir, "softhsm2.conf"),
		TokenDir: filepath.Join(dir, "tokens"),
		Module:   mod,
	}
	if err := os.MkdirAll(f.TokenDir, 0o700); err != nil {
		return nil, fmt.Errorf("softhsm: %w", err)
	}
	conf := fmt.Sprintf("directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n", f.TokenDir)
	if err := os.WriteFile(f.ConfPath, []byte(conf), 0o600); err != nil {
		return nil, fmt.Errorf("softhsm: %w", err)
	}
	return f, nil
}

// Env returns "SOFTHSM2_CONF=<ConfPath>", for a child process's environment.
func (f *Fixture) Env() string { return ConfEnv + "=" + f.ConfPath }

// InitToken initialises the first free slot of this fixture as a token labelled label,
// with the given SO and user PINs, by running
// `softhsm2-util --init-token --free --label L --so-pin SO --pin PIN` with SOFTHSM2_CONF
// set to ConfPath. It returns the new token's serial number.
//
// The PINs appear on softhsm2-util's command line, visible to other local users: use it
// only for test and dev tokens. The PINs never appear in a returned error.
//
// A process that has already called C_Initialize on libsofthsm2 does not see tokens
// created afterwards until it finalises and initialises the module again.
func (f *Fixture) InitToken(label, soPIN, userPIN string) (serial string, err error) {
	if label == "" || len(label) > 32 {
		return "", fmt.Errorf("softhsm: token label must be 1..32 bytes, got %d", len(label))
	}
	if soPIN == "" || userPIN == "" {
		return "", errors.New("softhsm: SO PIN and user PIN must not be empty")
	}
	util, err := Util()
	if err != nil {
		return "", err
	}
	cmd := exec.Command(util, "--init-token", "--free", "--label", label, "--so-pin", soPIN, "--pin", userPIN)
	cmd.Env = append(os.Environ(), f.Env())
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		// softhsm2-util does not echo PINs; scrub them anyway before quoting its output.
		return "", fmt.Errorf("softhsm: softhsm2-util --init-token --label %q: %w: %s",
			label, err, scrub(out.String(), soPIN, userPIN))
	}
	return f.serialOf(util, label)
}

// serialOf finds the serial number of the token labelled label with --show-slots.
func (f *Fixture) serialOf(util, label string) (string, error) {
	cmd := exec.Command(util, "--show-slots")
	cmd.Env = append(os.Environ(), f.Env())
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("softhsm: softhsm2-util --show-slots: %w", err)
	}
	// The output is one block per slot, each starting with "Slot <id>" at the start of
	// a line and holding indented "Serial number:" and "Label:" lines.
	var found []string
	for _, block := range strings.Split(string(out), "\nSlot ") {
		var lbl, ser string
		for _, line := range strings.Split(block, "\n") {
			k, v, ok := strings.Cut(strings.TrimSpace(line), ":")
			if !ok {
				continue
			}
			switch strings.TrimSpace(k) {
			case "Label":
				lbl = strings.TrimSpace(v)
			case "Serial number":
				ser = strings.TrimSpace(v)
			}
		}
		if lbl == label && ser != "" {
			found = append(found, ser)
		}
	}
	switch len(found) {
	case 0:
		return "", fmt.Errorf("softhsm: token %q not found after init", label)
	case 1:
		return found[0], nil
	default:
		return "", fmt.Errorf("softhsm: %d tokens are labelled %q", len(found), label)
	}
}

func scrub(s string, secrets ...string) string {
	for _, sec := range secrets {
		if sec != "" {
			s = strings.ReplaceAll(s, sec, "<redacted>")
		}
	}
	return strings.TrimSpace(s)
}
