package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"strings"
	"testing"
)

// runArgs runs hwkms with args and returns stdout, stderr and the error.
func runArgs(t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	var out, errb bytes.Buffer
	err := run(context.Background(), args, strings.NewReader(""), &out, &errb)
	return out.String(), errb.String(), err
}

// TestUsageListsEveryCommand: the top-level usage is generated from the command table
// and names every runnable command with its summary.
func TestUsageListsEveryCommand(t *testing.T) {
	out, _, err := runArgs(t, "help")
	if err != nil {
		t.Fatal(err)
	}
	var walk func(c *command)
	n := 0
	walk = func(c *command) {
		for _, s := range c.sub {
			if s.sub != nil {
				walk(s)
				continue
			}
			n++
			if !strings.Contains(out, "hwkms "+s.path()) || !strings.Contains(out, strings.Split(s.summary, "\n")[0]) {
				t.Errorf("usage lacks %q or its summary", s.path())
			}
		}
	}
	walk(root)
	if n < 18 {
		t.Fatalf("command table has %d commands, want the 18 or more hwkms has", n)
	}
	if _, errOut, err := runArgs(t); !errors.Is(err, exitError(2)) || !strings.Contains(errOut, "hwkms serve") {
		t.Errorf("no arguments: %v, stderr %q; want exit 2 and the usage", err, errOut)
	}
}

// TestHelpMatchesDashH: "hwkms help CMD" prints what "hwkms CMD -h" prints, flags
// included, and unknown commands exit 2.
func TestHelpMatchesDashH(t *testing.T) {
	for _, tc := range []struct {
		words []string
		flag  string
	}{
		{[]string{"serve"}, "-config"},
		{[]string{"key", "create"}, "-import-for"},
		{[]string{"key", "destroy"}, "-tpm-blob-file"},
		{[]string{"tpm", "provision"}, "-ek-roots"},
		{[]string{"bench"}, "-concurrency"},
	} {
		help, _, err := runArgs(t, append([]string{"help"}, tc.words...)...)
		if err != nil {
			t.Fatalf("help %v: %v", tc.words, err)
		}
		_, dashH, err := runArgs(t, append(tc.words, "-h")...)
		if !errors.Is(err, flag.ErrHelp) {
			t.Fatalf("%v -h: %v, want flag.ErrHelp", tc.words, err)
		}
		if help != dashH || !strings.Contains(help, "hwkms "+strings.Join(tc.words, " ")) || !strings.Contains(help, tc.flag) {
			t.Errorf("help %v = %q\n-h = %q; want the same text, naming the command and %s", tc.words, help, dashH, tc.flag)
		}
	}
	for _, args := range [][]string{{"nope"}, {"key", "nope"}, {"tpm"}, {"help", "nope"}} {
		if _, errOut, err := runArgs(t, args...); !errors.Is(err, exitError(2)) || !strings.Contains(errOut, "Usage:") {
			t.Errorf("%v: %v, stderr %q; want exit 2 and a usage", args, err, errOut)
		}
	}
}

// TestKeyCreateModes: key create's provisioning and replicable flags are ordinary
// flags; mixing the modes is refused before anything is read or written.
func TestKeyCreateModes(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--backend", "pkcs11", "--import-for", "a.pub", "--out-dir", "x"}, "--import-for needs --backend tpm"},
		{[]string{"--import-for", "a.pub", "--out-dir", "x", "--config", "c.yaml"}, "does not take --config"},
		{[]string{"--out-dir", "x", "--config", "c.yaml"}, "--out-dir needs --import-for"},
		{[]string{"--wrap-with-trusted", "--config", "c.yaml"}, "--wrap-with-trusted needs --replicable"},
		{[]string{"--backend", "tpm", "--import-for", "", "--out-dir", "x"}, "--import-for is required"},
	} {
		_, _, err := runArgs(t, append([]string{"key", "create"}, tc.args...)...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("key create %v: %v, want an error containing %q", tc.args, err, tc.want)
		}
	}
}
