package test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/hwkms/hwkms/hsm"
	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/plugin/kek/kektest"
	"github.com/hwkms/hwkms/softhsm/interop"
)

// matrixRow is one line of the "PKCS#11 implementations tested in CI" table.
type matrixRow struct {
	impl, version, mechanism, created string
	results                           []string // "kektest ok", ...
}

// TestInteropMatrix runs, on every PKCS#11 implementation of interop.Starters, with a
// config that names NO mechanism (auto):
//
//  1. `hwkms key create` (the real binary); on tpm2-pkcs11, which has no C_GenerateKey,
//     it must fail with the tpm2_ptool commands that make an acceptable key, and the
//     test runs exactly those commands;
//  2. `hwkms key list`, which must show the key and the mechanism;
//  3. kektest.Run on an hsm.KEK opened in this process on that key;
//  4. `hwkms serve` (the real binary), then the apiserver-client suite
//     (k8s.io/apiserver's KMS v2 envelope transformer, a restart of each side), the
//     tampered-etcd suite and the bad-input suite over its socket.
//
// A missing implementation fails the test when CI is set (the fixtures decide). It
// logs the table README.md shows; the token-IV emulations (CloudHSM, Luna before
// 7.9.3, Cloud KMS) run in hsm's own tests (TestMechanismConformance), where the fault
// seam is. Starters lists opencryptoki first: a process that loaded SoftHSM2 before
// opencryptoki crashes at opencryptoki's second C_Initialize (docs/tokens.md).
func TestInteropMatrix(t *testing.T) {
	if testing.Short() && os.Getenv("CI") == "" {
		t.Skip("the interop matrix starts four PKCS#11 implementations; not in -short (with CI set it runs)")
	}
	var rows []*matrixRow
	for _, st := range interop.Starters {
		t.Run(strings.ReplaceAll(st.Name, " ", "_"), func(t *testing.T) {
			row := &matrixRow{impl: st.Name, mechanism: "-", created: "-"}
			rows = append(rows, row)
			interopRun(t, st, row)
		})
	}
	var b strings.Builder
	b.WriteString("| implementation | version | mechanism chosen (auto) | how the key is created | result |\n| --- | --- | --- | --- | --- |\n")
	for _, r := range rows {
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s |\n", r.impl, r.version, r.mechanism, r.created, strings.Join(r.results, ", "))
	}
	t.Log("\n" + b.String())
	if p := os.Getenv("INTEROP_MATRIX_TABLE"); p != "" {
		if err := os.WriteFile(p, []byte(b.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// interopRun is one implementation's column of the matrix.
func interopRun(t *testing.T, st interop.Starter, row *matrixRow) {
	tk := st.Start(t)
	row.version = tk.Version
	var env []string
	for k, v := range tk.Env {
		env = append(env, k+"="+v)
	}
	key := hsm.Config{Module: tk.Module, TokenLabel: tk.TokenLabel, PINFile: tk.PINFile, KeyLabel: "kek-matrix", InitArgs: tk.InitArgs}
	sock := socketPath(t)
	cfgPath := writeServeConfig(t, sock, key)

	// 1. key create through the binary, with the vendor tool where the token cannot.
	var createdMech string
	row.created, createdMech = interopCreate(t, tk, env, cfgPath)
	row.results = append(row.results, "key create ok")

	// 2. key list names the key and the mechanism.
	out, err := hwkmsCmd(env, "key", "list", "--config", cfgPath)
	if err != nil {
		t.Fatalf("hwkms key list: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`; mechanism ([a-z0-9-]+)`).FindStringSubmatch(out)
	if m == nil || !strings.Contains(out, " yes ") {
		why := "no mechanism"
		if r := regexp.MustCompile(`aes-cbc-hmac: (round trip failed: [^;]*)`).FindStringSubmatch(out); r != nil {
			why = "aes-cbc-hmac " + r[1]
		}
		row.results = append(row.results, "key list FAILED: "+why)
		if kb, ok := knownBroken[tk.Impl]; ok && strings.Contains(out, kb.contains) {
			// Asserted, not skipped: when this stops failing the test fails too, so
			// the table and docs/tokens.md get updated.
			row.results[len(row.results)-1] = "FAILS (known): " + kb.why
			t.Logf("%s: known failure (%s); hwkms key list:\n%s", tk.Impl, kb.why, out)
			return
		}
		t.Fatalf("hwkms key list does not show the key as present with a mechanism:\n%s", out)
	}
	if kb, ok := knownBroken[tk.Impl]; ok {
		t.Errorf("%s works now (known failure was: %s): remove it from knownBroken and update README.md and docs/tokens.md", tk.Impl, kb.why)
	}
	row.mechanism = m[1]
	if createdMech != "" && createdMech != row.mechanism {
		t.Errorf("hwkms key create reported mechanism %s, key list %s", createdMech, row.mechanism)
	}
	if tk.Impl == "SoftHSM2" && row.mechanism != hsm.MechanismAESGCM {
		t.Errorf("SoftHSM2 has CKM_AES_GCM with caller IVs: auto chose %s, want aes-gcm", row.mechanism)
	}
	if (tk.Impl == "opencryptoki" || tk.Impl == "tpm2-pkcs11") && row.mechanism != hsm.MechanismAESCBCHMAC {
		t.Errorf("%s has no CKM_AES_GCM: auto chose %s, want aes-cbc-hmac", tk.Impl, row.mechanism)
	}

	// 2b. doctor runs its checks, including the mechanism, and passes.
	out, err = hwkmsCmd(env, "doctor", "--config", cfgPath)
	if want := "[ok] keys[0] (pkcs11, primary) mechanism: " + row.mechanism + " (chosen by auto)"; err != nil || !strings.Contains(out, want) {
		t.Errorf("hwkms doctor: %v; want a line %q:\n%s", err, want, out)
	} else {
		row.results = append(row.results, "key list + doctor ok")
	}

	// 3. the conformance suite on an hsm.KEK in this process, config naming no
	// mechanism, with a second key on the same token made the same way.
	other := key
	other.KeyLabel = "kek-matrix-other"
	interopCreate(t, tk, env, writeServeConfig(t, socketPath(t), other))
	opener := func(c hsm.Config) func(t *testing.T) kek.KEK {
		return func(t *testing.T) kek.KEK {
			k, err := hsm.Open(context.Background(), c)
			if err != nil {
				t.Fatalf("hsm.Open on %s: %v", tk, err)
			}
			t.Cleanup(func() { k.Close() })
			if got := k.Mechanism(); got != row.mechanism {
				t.Errorf("hsm.Open chose %s, hwkms key list showed %s", got, row.mechanism)
			}
			return k
		}
	}
	ok := t.Run("kektest", func(t *testing.T) { kektest.Run(t, opener(key), kektest.WithOther(opener(other))) })
	row.results = append(row.results, result("kektest", ok))

	// 4. hwkms serve, and the apiserver, tamper and bad-input suites over its socket.
	serve := func(t *testing.T) *proc {
		p := startHwkms(t, sock, env, "serve", "--config", cfgPath)
		if !strings.Contains(p.Stderr.String(), "mechanism="+row.mechanism) {
			t.Errorf("hwkms serve's log does not name the mechanism %s:\n%s", row.mechanism, p.Stderr.String())
		}
		return p
	}
	ok = t.Run("apiserver", func(t *testing.T) { apiserverSuite(t, serve(t), serve) })
	row.results = append(row.results, result("apiserver suite", ok))
	ok = t.Run("tampered", func(t *testing.T) { tamperSuite(t, serve(t)) })
	row.results = append(row.results, result("tampered etcd", ok))
	ok = t.Run("badinput", func(t *testing.T) { badInputSuite(t, serve(t), tk.PIN) })
	row.results = append(row.results, result("bad input", ok))
}

// interopCreate creates the key cfgPath configures with `hwkms key create`, or, on
// tpm2-pkcs11, with exactly the tpm2_ptool commands its error prints, and says how,
// with the mechanism `hwkms key create` reported ("" when the vendor tool made it).
func interopCreate(t *testing.T, tk *interop.Token, env []string, cfgPath string) (how, mech string) {
	t.Helper()
	out, err := hwkmsCmd(env, "key", "create", "--config", cfgPath)
	switch {
	case err == nil:
		m := regexp.MustCompile(`, mechanism ([a-z0-9-]+)\n`).FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("hwkms key create does not name the mechanism:\n%s", out)
		}
		return "`hwkms key create`", m[1]
	case tk.Impl == "tpm2-pkcs11":
		for _, c := range ptoolAdvice(t, out) {
			sh := exec.Command("sh", "-c", c)
			sh.Env = append(os.Environ(), env...)
			if b, err := sh.CombinedOutput(); err != nil {
				t.Fatalf("running the command hwkms key create printed, %q: %v\n%s", c, err, b)
			}
		}
		return "`tpm2_ptool addkey` aes256 + hmac:sha256 (the commands `hwkms key create` prints)", ""
	}
	t.Fatalf("hwkms key create on %s: %v\n%s", tk, err, out)
	return "", ""
}

// knownBroken lists implementations the matrix measures as failing today, with the
// text their `hwkms key list` must show and why (docs/tokens.md). The matrix asserts
// the failure, and fails when it changes.
var knownBroken = map[string]struct{ contains, why string }{
	// None today. tpm2-pkcs11 1.9.0 was here (its single-part CKM_AES_CBC_PAD C_Decrypt
	// of more than 32 bytes answers CKR_GENERAL_ERROR) until hsm fell back to
	// CKM_AES_CBC with the padding removed in software for such tokens.
}

func result(name string, ok bool) string {
	if ok {
		return name + " ok"
	}
	return name + " FAILED"
}

// writeServeConfig writes an hwkms config serving key on sock at log level debug.
func writeServeConfig(t *testing.T, sock string, key hsm.Config) string {
	t.Helper()
	cfg := map[string]any{
		"socket": map[string]any{"path": sock},
		"log":    map[string]any{"level": "debug"},
		"keys":   []any{map[string]any{"pkcs11": key}},
	}
	b, err := yaml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(b), "mechanism") {
		t.Fatalf("the matrix config must name no mechanism:\n%s", b)
	}
	path := filepath.Join(t.TempDir(), "hwkms.yaml")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// hwkmsCmd runs the hwkms binary to completion (at most a minute) and returns its
// combined output.
func hwkmsCmd(env []string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, hwkmsBin, args...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

var ptoolLine = regexp.MustCompile(`(?m)^\s+((?:TPM2TOOLS_TCTI=\S+ )?tpm2_ptool addkey .*)$`)

// ptoolAdvice checks the error of `hwkms key create` on tpm2-pkcs11: one message that
// says why (CKR_FUNCTION_NOT_SUPPORTED) and gives the two tpm2_ptool commands, and
// returns the commands.
func ptoolAdvice(t *testing.T, out string) []string {
	t.Helper()
	if !strings.Contains(out, "CKR_FUNCTION_NOT_SUPPORTED") || !strings.Contains(out, "no C_GenerateKey") {
		t.Fatalf("hwkms key create on tpm2-pkcs11 does not say the token cannot generate keys:\n%s", out)
	}
	var cmds []string
	for _, m := range ptoolLine.FindAllStringSubmatch(out, -1) {
		cmds = append(cmds, m[1])
	}
	if len(cmds) != 2 || !strings.Contains(cmds[0], "--algorithm aes256") || !strings.Contains(cmds[1], "--algorithm hmac:sha256") {
		t.Fatalf("hwkms key create on tpm2-pkcs11 printed %d tpm2_ptool commands, want aes256 and hmac:sha256:\n%s", len(cmds), out)
	}
	return cmds
}

// TestNoMechanismThroughTheBinary: a token without what the configured mechanism
// needs gets ONE error wrapping hsm.ErrNoMechanism's text, naming what is missing, at
// `hwkms key create` and at `hwkms serve`, with no stack of repeated prefixes. On
// opencryptoki (no CKM_AES_GCM) with mechanism aes-gcm.
func TestNoMechanismThroughTheBinary(t *testing.T) {
	tk := interop.StartOpencryptoki(t)
	key := hsm.Config{Module: tk.Module, TokenLabel: tk.TokenLabel, PINFile: tk.PINFile, KeyLabel: "kek-nomech", Mechanism: hsm.MechanismAESGCM}
	cfgPath := writeServeConfigNamed(t, socketPath(t), key)
	want := fmt.Sprintf(`has no usable mechanism for key "kek-nomech": aes-gcm: CKM_AES_GCM missing: %s`, hsm.ErrNoMechanism)

	out, err := hwkmsCmd(nil, "key", "create", "--config", cfgPath)
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 {
		t.Fatalf("hwkms key create with mechanism aes-gcm on opencryptoki: %v, want exit 1\n%s", err, out)
	}
	checkOneError(t, "key create", out, want)

	// serve on a key that exists (made with auto: on opencryptoki an aes-cbc-hmac
	// pair) with mechanism aes-gcm named, which the token cannot give it.
	auto := key
	auto.Mechanism = ""
	if out, err := hwkmsCmd(nil, "key", "create", "--config", writeServeConfigNamed(t, socketPath(t), auto)); err != nil {
		t.Fatalf("hwkms key create (auto): %v\n%s", err, out)
	}
	sock := socketPath(t)
	p := launch(t, nil, "serve", "--config", writeServeConfigNamed(t, sock, key))
	p.Socket = sock
	if code := p.wait(t, readyTimeout); code == 0 {
		t.Fatalf("hwkms serve on a key without its mechanism exited 0:\n%s", p.Stderr.String())
	}
	checkOneError(t, "serve", p.Stderr.String(), want)
}

// writeServeConfigNamed is writeServeConfig for a key that may name a mechanism.
func writeServeConfigNamed(t *testing.T, sock string, key hsm.Config) string {
	t.Helper()
	b, err := yaml.Marshal(map[string]any{"socket": map[string]any{"path": sock}, "keys": []any{map[string]any{"pkcs11": key}}})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "hwkms.yaml")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// checkOneError wants out to contain want exactly once, on one line starting "hwkms:",
// with ErrNoMechanism's text once.
func checkOneError(t *testing.T, what, out, want string) {
	t.Helper()
	t.Logf("%s: %s", what, strings.TrimSpace(out))
	if strings.Count(out, want) != 1 {
		t.Errorf("%s: output does not say %q exactly once:\n%s", what, want, out)
	}
	if n := strings.Count(out, hsm.ErrNoMechanism.Error()); n != 1 {
		t.Errorf("%s: %q appears %d times, want once:\n%s", what, hsm.ErrNoMechanism, n, out)
	}
	var lines []string
	for _, l := range strings.Split(out, "\n") {
		if strings.Contains(l, want) {
			lines = append(lines, l)
		}
	}
	if len(lines) != 1 || !strings.Contains(lines[0], "hwkms: ") && !strings.Contains(lines[0], "err=") {
		t.Errorf("%s: the error is not one hwkms error line: %q", what, lines)
	}
}

// TestNoMechanismAutoWithoutHMACKey: on tpm2-pkcs11 (no CKM_AES_GCM) an AES key made
// by tpm2_ptool without its HMAC key has no usable mechanism under auto. `hwkms key
// list` shows the key with the reason and `hwkms serve` fails with one error naming
// every candidate and what it lacks, including the missing HMAC key.
func TestNoMechanismAutoWithoutHMACKey(t *testing.T) {
	tk := interop.StartTPM2PKCS11(t)
	var env []string
	for k, v := range tk.Env {
		env = append(env, k+"="+v)
	}
	key := hsm.Config{Module: tk.Module, TokenLabel: tk.TokenLabel, PINFile: tk.PINFile, KeyLabel: "kek-aes-only"}
	sh := exec.Command("tpm2_ptool", "addkey", "--label", tk.TokenLabel, "--key-label", key.KeyLabel,
		"--algorithm", "aes256", "--userpin", tk.PIN)
	sh.Env = append(append(os.Environ(), env...), "TPM2TOOLS_TCTI="+tk.Env["TPM2_PKCS11_TCTI"])
	if out, err := sh.CombinedOutput(); err != nil {
		t.Fatalf("tpm2_ptool addkey: %v\n%s", err, out)
	}
	sock := socketPath(t)
	cfgPath := writeServeConfig(t, sock, key)
	want := `has no usable mechanism for key "kek-aes-only": aes-gcm: CKM_AES_GCM missing; aes-gcm-token-iv: CKM_AES_GCM missing; aes-cbc-hmac: no HMAC key`

	out, err := hwkmsCmd(env, "key", "list", "--config", cfgPath)
	if err != nil || !strings.Contains(out, "mechanism: none: ") || !strings.Contains(out, want) {
		t.Errorf("hwkms key list: %v; want the key present with %q:\n%s", err, want, out)
	}
	p := launch(t, env, "serve", "--config", cfgPath)
	p.Socket = sock
	if code := p.wait(t, readyTimeout); code == 0 {
		t.Fatalf("hwkms serve on a key without a usable mechanism exited 0:\n%s", p.Stderr.String())
	}
	checkOneError(t, "serve", p.Stderr.String(), want)
	if strings.Contains(out+p.Stderr.String(), tk.PIN) {
		t.Fatal("hwkms printed the PIN")
	}
}
