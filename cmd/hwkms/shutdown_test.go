package main

import (
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"
)

// closerFunc adapts a function to io.Closer.
type closerFunc func() error

func (f closerFunc) Close() error { return f() }

// TestCloseKeysBounded: closing keys whose device call hangs gives up after the bound
// and says so; a close that returns is waited for and its error logged.
func TestCloseKeysBounded(t *testing.T) {
	logs := &lockedBuffer{}
	log := slog.New(slog.NewTextHandler(logs, nil))
	hang := make(chan struct{})
	defer close(hang)
	start := time.Now()
	closeKeys(log, closerFunc(func() error { <-hang; return nil }), 100*time.Millisecond)
	if d := time.Since(start); d < 100*time.Millisecond || d > 2*time.Second {
		t.Fatalf("closeKeys with a hung device returned after %v, want about 100 ms", d)
	}
	if !strings.Contains(string(logs.Bytes()), "device calls still running") {
		t.Fatalf("no warning about the hung close:\n%s", logs.Bytes())
	}

	logs = &lockedBuffer{}
	log = slog.New(slog.NewTextHandler(logs, nil))
	closeKeys(log, closerFunc(func() error { time.Sleep(50 * time.Millisecond); return errors.New("C_CloseSession: CKR_DEVICE_ERROR") }), time.Second)
	if out := string(logs.Bytes()); !strings.Contains(out, "CKR_DEVICE_ERROR") || strings.Contains(out, "still running") {
		t.Fatalf("a slow close that failed:\n%s", out)
	}
}
