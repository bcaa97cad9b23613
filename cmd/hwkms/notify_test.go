package main

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hwkms/hwkms/hsm"
	"github.com/hwkms/hwkms/plugin/config"
	"github.com/hwkms/hwkms/softhsm/softhsmtest"
)

// TestServeNotifiesSystemd: under Type=notify, serve tells systemd READY=1 only once
// the KMS socket exists (so kubelet, ordered after hwkms, finds it), and STOPPING=1
// when it starts shutting down.
func TestServeNotifiesSystemd(t *testing.T) {
	dir := shortDir(t)
	notify := filepath.Join(dir, "notify")
	ln, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notify, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	t.Setenv(notifySocketEnv, notify)

	fx := softhsmtest.New(t)
	tok := softhsmtest.NewToken(t, fx)
	kc := hsm.Config{Module: fx.Module, TokenLabel: tok.Label, PINFile: tok.PINFile, KeyLabel: "notify"}
	if _, err := hsm.CreateKey(context.Background(), kc); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "kms.sock")
	path := filepath.Join(dir, "hwkms.yaml")
	writeYAML(t, path, &config.Config{Socket: config.Socket{Path: sock}, Keys: []config.Key{{PKCS11: &kc}}})

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"serve", "--config", path}, strings.NewReader(""), &lockedBuffer{}, &lockedBuffer{})
	}()
	read := func(want string) {
		t.Helper()
		buf := make([]byte, 512)
		if err := ln.SetReadDeadline(time.Now().Add(30 * time.Second)); err != nil {
			t.Fatal(err)
		}
		n, err := ln.Read(buf)
		if err != nil {
			t.Fatalf("no %s from serve: %v", want, err)
		}
		if msg := string(buf[:n]); !strings.Contains(msg, want) {
			t.Fatalf("serve notified %q, want %s", msg, want)
		}
	}
	read("READY=1")
	if _, err := os.Stat(sock); err != nil {
		t.Fatalf("READY=1 before the KMS socket exists: %v", err)
	}
	if _, err := statusOnceCLI(t, sock); err != nil {
		t.Fatalf("Status right after READY=1: %v", err)
	}
	cancel()
	read("STOPPING=1")
	if err := <-done; err != nil {
		t.Fatalf("serve: %v", err)
	}
}

// statusOnceCLI runs `hwkms status --socket sock` in process.
func statusOnceCLI(t *testing.T, sock string) (string, error) {
	t.Helper()
	var out lockedBuffer
	err := run(context.Background(), []string{"status", "--socket", sock}, strings.NewReader(""), &out, &out)
	return string(out.Bytes()), err
}
