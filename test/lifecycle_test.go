package test

import (
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// checkSocketFile checks that path is a unix socket with mode 0600.
func checkSocketFile(tb testing.TB, path string) {
	tb.Helper()
	fi, err := os.Lstat(path)
	if err != nil {
		tb.Fatalf("socket file: %v", err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		tb.Fatalf("%s has type %v, want a socket", path, fi.Mode().Type())
	}
	if perm := fi.Mode().Perm(); perm != 0o600 {
		tb.Errorf("socket mode = %#o, want 0600", perm)
	}
}

// TestSocketLifecycle runs the binary the way an init system would: a second instance
// on a served socket, a restart after a crash, and a path that is not a socket.
func TestSocketLifecycle(t *testing.T) {
	t.Run("mode 0600", func(t *testing.T) {
		p := startDev(t, "info")
		checkSocketFile(t, p.Socket)
	})

	t.Run("second instance refuses a served socket", func(t *testing.T) {
		first := startDev(t, "info")
		c := dial(t, first.Socket)
		keyID := mustStatus(t, first.Socket).KeyId

		second := launch(t, softhsmEnv(first.Dir), "serve", "--config", filepath.Join(first.Dir, "hwkms.yaml"))
		second.Socket = first.Socket
		if code := second.wait(t, readyTimeout); code == 0 {
			t.Fatalf("second hwkms on a served socket exited 0; stderr:\n%s", second.Stderr.String())
		}
		if msg := second.Stderr.String(); !strings.Contains(msg, "another process is serving") || !strings.Contains(msg, first.Socket) {
			t.Errorf("second hwkms's error does not say another process serves %s:\n%s", first.Socket, msg)
		}
		// The first one is untouched: its socket file is still there and it still answers.
		checkSocketFile(t, first.Socket)
		mustStatus(t, first.Socket)
		roundTrip(t, c, keyID, randomBytes(t, 32))
	})

	t.Run("stale socket after SIGKILL is replaced", func(t *testing.T) {
		crashed := startDev(t, "info")
		keyID := mustStatus(t, crashed.Socket).KeyId
		crashed.kill(t)
		fi, err := os.Lstat(crashed.Socket)
		if err != nil || fi.Mode().Type() != fs.ModeSocket {
			t.Fatalf("after SIGKILL the socket file should stay behind as a stale socket; Lstat: %v %v", fi, err)
		}
		next := serveDevConfig(t, crashed)
		checkSocketFile(t, next.Socket)
		if got := mustStatus(t, next.Socket).KeyId; got != keyID {
			t.Errorf("key_id after restart = %q, want %q", got, keyID)
		}
		roundTrip(t, dial(t, next.Socket), keyID, randomBytes(t, 32))
		// next.stop at cleanup checks exit 0 and that the socket is removed.
	})

	t.Run("path that is not a socket is left alone", func(t *testing.T) {
		requireSoftHSM(t)
		sock := socketPath(t)
		if err := os.WriteFile(sock, []byte("not a socket"), 0o600); err != nil {
			t.Fatal(err)
		}
		p := launch(t, nil, "dev", "--socket", sock, "--dir", t.TempDir())
		p.Socket = sock
		if code := p.wait(t, readyTimeout); code == 0 {
			t.Fatalf("hwkms dev on a regular file exited 0; stderr:\n%s", p.Stderr.String())
		}
		if msg := p.Stderr.String(); !strings.Contains(msg, "not a socket") {
			t.Errorf("error does not say the path is not a socket:\n%s", msg)
		}
		if b, err := os.ReadFile(sock); err != nil || string(b) != "not a socket" {
			t.Errorf("the regular file at the socket path was changed: %q, %v", b, err)
		}
	})
}
