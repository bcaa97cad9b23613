package config

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/hwkms/hwkms/hsm"
	"github.com/hwkms/hwkms/plugin"
	"github.com/hwkms/hwkms/softhsm/softhsmtest"
)

// TestHistoryGoldenV1 reads the version 1 file kept in testdata and checks that this
// code writes the same bytes for the same history: the format is stored, so it must
// stay readable and stable.
func TestHistoryGoldenV1(t *testing.T) {
	golden := filepath.Join("testdata", "primary-key-history-v1.json")
	data, err := os.ReadFile(golden)
	if err != nil {
		t.Fatal(err)
	}
	// ReadSecret refuses files other users can read; the checked-out copy may be 0644.
	path := filepath.Join(t.TempDir(), "kms.sock"+HistorySuffix)
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	h, err := OpenHistory(path)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"p11:0f3a8c1e5b7d9a2c4e6f8a0b1c3d5e7f", "tpm:9c2e4a6b8d0f1a3c5e7b9d1f3a5c7e9b"}
	if got := h.Primaries(); !slices.Equal(got, want) {
		t.Fatalf("golden history reads as %q, want %q", got, want)
	}
	out, err := marshalHistory(want)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out, data) {
		t.Fatalf("version 1 encoding changed:\n got %s\nwant %s", out, data)
	}
	if err := h.Check(want[0]); !errors.Is(err, ErrPrimaryReused) {
		t.Fatalf("Check of the replaced primary = %v, want ErrPrimaryReused", err)
	}
	for _, id := range []string{want[1], "p11:new"} {
		if err := h.Check(id); err != nil {
			t.Fatalf("Check(%s) = %v, want nil", id, err)
		}
	}
}

// TestHistoryUnreadableRefuses: every damaged or unknown file is an error wrapping
// ErrHistoryUnreadable that names the file, never an empty history.
func TestHistoryUnreadableRefuses(t *testing.T) {
	many := make([]string, MaxHistory+1)
	for i := range many {
		many[i] = fmt.Sprintf("%q", fmt.Sprintf("p11:%d", i))
	}
	for _, tc := range []struct {
		name, body string
		mode       os.FileMode
	}{
		{"empty", "", 0o600},
		{"not json", "primaries: [a]", 0o600},
		{"truncated", `{"version": 1, "primaries": ["a"`, 0o600},
		{"no version", `{"primaries": ["a"]}`, 0o600},
		{"future version", `{"version": 2, "primaries": ["a"]}`, 0o600},
		{"unknown field", `{"version": 1, "primaries": ["a"], "next": "b"}`, 0o600},
		{"trailing data", `{"version": 1, "primaries": ["a"]} {}`, 0o600},
		{"empty key_id", `{"version": 1, "primaries": ["a", ""]}`, 0o600},
		{"duplicate key_id", `{"version": 1, "primaries": ["a", "b", "a"]}`, 0o600},
		{"too many", `{"version": 1, "primaries": [` + strings.Join(many, ",") + `]}`, 0o600},
		{"other users may write", `{"version": 1, "primaries": ["a"]}`, 0o606},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "kms.sock"+HistorySuffix)
			if err := os.WriteFile(path, []byte(tc.body), tc.mode); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(path, tc.mode); err != nil {
				t.Fatal(err)
			}
			h, err := OpenHistory(path)
			if !errors.Is(err, ErrHistoryUnreadable) || h != nil {
				t.Fatalf("OpenHistory = %v, %v; want ErrHistoryUnreadable", h, err)
			}
			if !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "docs/reliability.md") {
				t.Fatalf("error does not name the file and how to reset it: %v", err)
			}
		})
	}
	// A directory where the file should be cannot be read either.
	dir := filepath.Join(t.TempDir(), "kms.sock"+HistorySuffix)
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenHistory(dir); !errors.Is(err, ErrHistoryUnreadable) {
		t.Fatalf("OpenHistory of a directory = %v, want ErrHistoryUnreadable", err)
	}
}

// TestHistoryBounded: the history keeps the newest MaxHistory key_ids, reports the
// one it drops, and the file it writes reads back.
func TestHistoryBounded(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state", "kms.sock"+HistorySuffix)
	h, err := OpenHistory(path)
	if err != nil {
		t.Fatal(err)
	}
	for i := range MaxHistory + 1 {
		id := fmt.Sprintf("p11:%04d%s", i, strings.Repeat("x", 1000))
		dropped, err := h.Admit(id)
		if err != nil {
			t.Fatal(err)
		}
		if want := ""; i == MaxHistory {
			want = fmt.Sprintf("p11:%04d%s", 0, strings.Repeat("x", 1000))
			if dropped != want {
				t.Fatalf("admit %d dropped %.8q, want %.8q", i, dropped, want)
			}
		} else if dropped != want {
			t.Fatalf("admit %d dropped %.8q", i, dropped)
		}
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 || fi.Size() > maxHistorySize {
		t.Fatalf("history file mode %o size %d (max %d)", fi.Mode().Perm(), fi.Size(), maxHistorySize)
	}
	again, err := OpenHistory(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := again.Primaries(); len(got) != MaxHistory || !slices.Equal(got, h.Primaries()) {
		t.Fatalf("reread %d entries, want the %d written", len(got), MaxHistory)
	}
}

// TestReloaderHistorySurvivesRestart is A -> B by reload in one "process", then a
// new Reloader and History from the same file (a restart) with the config reverted to
// A: A is refused at start (serve's Admit) and by reload, naming A, B and the file.
// Before the history was persisted, the restarted process served A again.
func TestReloaderHistorySurvivesRestart(t *testing.T) {
	fx := softhsmtest.New(t)
	tok := softhsmtest.NewToken(t, fx)
	ctx := context.Background()
	mk := func(label string) hsm.Config {
		c := hsm.Config{Module: fx.Module, TokenLabel: tok.Label, PINFile: tok.PINFile, KeyLabel: label}
		if _, err := hsm.CreateKey(ctx, c); err != nil {
			t.Fatal(err)
		}
		return c
	}
	a, b, c := mk("kek-a"), mk("kek-b"), mk("kek-c")
	dir := t.TempDir()
	path := filepath.Join(dir, "hwkms.yaml")
	histPath := filepath.Join(dir, "state", "kms.sock"+HistorySuffix)

	// start opens the history and the keys and admits the primary, as serve does.
	start := func(t *testing.T) (*Reloader, *plugin.Service, error) {
		t.Helper()
		hist, err := OpenHistory(histPath)
		if err != nil {
			t.Fatal(err)
		}
		cfg, err := Load(path)
		if err != nil {
			t.Fatal(err)
		}
		ring, err := OpenKeyring(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := hist.Admit(ring.Primary().ID()); err != nil {
			ring.Close()
			return nil, nil, err
		}
		svc := plugin.NewService(ring, plugin.Options{})
		t.Cleanup(func() { svc.Keyring().Close() })
		return NewReloader(svc, cfg, path, discard(), hist), svc, nil
	}

	writeConfig(t, path, a)
	rl, svc, err := start(t)
	if err != nil {
		t.Fatal(err)
	}
	idA := svc.Keyring().Primary().ID()
	writeConfig(t, path, b, a)
	if err := rl.Reload(ctx, false); err != nil {
		t.Fatalf("reload to B: %v", err)
	}
	idB := svc.Keyring().Primary().ID()
	svc.Keyring().Close()

	// Restart with the config reverted to A.
	writeConfig(t, path, a, b)
	_, _, err = start(t)
	if !errors.Is(err, ErrPrimaryReused) {
		t.Fatalf("restart with A primary again = %v, want ErrPrimaryReused", err)
	}
	for _, want := range []string{idA, idB, histPath} {
		if !strings.Contains(err.Error(), want) {
			t.Fatalf("refusal %q does not name %s", err, want)
		}
	}

	// Restart with B, then a reload back to A is refused too.
	writeConfig(t, path, b, a)
	rl, svc, err = start(t)
	if err != nil {
		t.Fatalf("restart with B: %v", err)
	}
	writeConfig(t, path, a, b)
	if err := rl.Reload(ctx, false); !errors.Is(err, ErrPrimaryReused) || !strings.Contains(err.Error(), histPath) {
		t.Fatalf("reload back to A after a restart = %v, want ErrPrimaryReused naming %s", err, histPath)
	}
	if got := svc.Keyring().Primary().ID(); got != idB {
		t.Fatalf("primary is %s after the refused reload, want %s", got, idB)
	}

	// A reload whose history cannot be written does not serve the new primary: after a
	// restart it would not be known.
	if err := os.RemoveAll(filepath.Dir(histPath)); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Dir(histPath), []byte("not a directory"), 0o600); err != nil {
		t.Fatal(err)
	}
	writeConfig(t, path, c, b, a)
	if err := rl.Reload(ctx, false); err == nil || !strings.Contains(err.Error(), "primary-key history") {
		t.Fatalf("reload with an unwritable history = %v, want a history error", err)
	}
	if got := svc.Keyring().Primary().ID(); got != idB {
		t.Fatalf("primary is %s after a reload whose history write failed, want %s", got, idB)
	}
}

// TestStateDirDefault: stateDir defaults to the socket's directory and must be
// absolute.
func TestStateDirDefault(t *testing.T) {
	c, err := Parse([]byte(validYAML))
	if err != nil {
		t.Fatal(err)
	}
	if c.StateDir != "/run/hwkms" || c.HistoryPath() != "/run/hwkms/kms.sock"+HistorySuffix {
		t.Fatalf("stateDir %q, history %q", c.StateDir, c.HistoryPath())
	}
	c, err = Parse([]byte(validYAML + "stateDir: /var/lib/hwkms/state\n"))
	if err != nil || c.HistoryPath() != "/var/lib/hwkms/state/kms.sock"+HistorySuffix {
		t.Fatalf("stateDir set: %v %+v", err, c)
	}
	if _, err := Parse([]byte(validYAML + "stateDir: state\n")); err == nil || !strings.Contains(err.Error(), "stateDir: must be an absolute path") {
		t.Fatalf("relative stateDir: %v", err)
	}
}
