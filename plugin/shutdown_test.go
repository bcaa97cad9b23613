package plugin

import (
	"context"
	"errors"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hwkms/hwkms/plugin/kek/kektest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"
)

// inFlight serves a service whose key blocks in Unwrap until release is closed, starts
// one Decrypt, and returns once that Decrypt is inside the key.
func inFlight(t *testing.T, shutdown time.Duration) (path string, cancel func(), serveErr <-chan error, reqErr <-chan error, release chan struct{}, k *kektest.Fake) {
	t.Helper()
	k = kektest.NewFake("A")
	svc := newTestService(t, k)
	svc.ProbeNow(context.Background())
	path = filepath.Join(t.TempDir(), "kms.sock")
	ctx, cancelServe := context.WithCancel(context.Background())
	ready := make(chan struct{})
	errc := make(chan error, 1)
	go func() {
		errc <- Serve(ctx, svc, SocketOptions{Path: path, GID: -1, Timeout: time.Second, ShutdownTimeout: shutdown}, ready)
	}()
	<-ready
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	client := kmsapi.NewKeyManagementServiceClient(conn)
	enc, err := client.Encrypt(context.Background(), &kmsapi.EncryptRequest{Plaintext: seed(32)})
	if err != nil {
		t.Fatal(err)
	}
	release = make(chan struct{})
	k.BlockUnwrap(release)
	calls := k.Calls()
	rerr := make(chan error, 1)
	go func() {
		_, err := client.Decrypt(context.Background(), &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: "A"})
		rerr <- err
	}()
	deadline := time.Now().Add(5 * time.Second)
	for k.Calls() == calls {
		if time.Now().After(deadline) {
			t.Fatal("Decrypt never reached the key")
		}
		time.Sleep(time.Millisecond)
	}
	return path, cancelServe, errc, rerr, release, k
}

// TestShutdownFinishesInFlight: on shutdown the socket stops accepting and disappears at
// once, the request already inside the key completes successfully, then Serve returns.
func TestShutdownFinishesInFlight(t *testing.T) {
	path, cancel, serveErr, reqErr, release, _ := inFlight(t, 10*time.Second)
	cancel()

	// The socket goes away while the request is still in flight.
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := os.Lstat(path); errors.Is(err, fs.ErrNotExist) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("socket still present after shutdown began")
		}
		time.Sleep(time.Millisecond)
	}
	if c, err := net.Dial("unix", path); err == nil {
		c.Close()
		t.Fatal("new connection accepted during shutdown")
	}
	select {
	case err := <-serveErr:
		t.Fatalf("Serve returned (%v) before the in-flight request finished", err)
	case err := <-reqErr:
		t.Fatalf("in-flight request ended (%v) before it was released", err)
	case <-time.After(50 * time.Millisecond):
	}
	close(release)
	if err := <-reqErr; err != nil {
		t.Fatalf("in-flight request failed: %v", err)
	}
	if err := <-serveErr; err != nil {
		t.Fatalf("Serve: %v", err)
	}
}

// TestShutdownTimeoutBoundsInFlight: a request that never finishes is cut off after
// ShutdownTimeout, and Serve returns.
func TestShutdownTimeoutBoundsInFlight(t *testing.T) {
	_, cancel, serveErr, reqErr, release, _ := inFlight(t, 200*time.Millisecond)
	defer close(release)
	start := time.Now()
	cancel()
	select {
	case err := <-serveErr:
		if err != nil {
			t.Fatalf("Serve: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return within the shutdown timeout")
	}
	if d := time.Since(start); d < 150*time.Millisecond || d > 3*time.Second {
		t.Fatalf("Serve returned after %v, want about 200ms", d)
	}
	if err := <-reqErr; status.Code(err) != codes.Unavailable && status.Code(err) != codes.Canceled {
		t.Fatalf("cut-off request: %v, want Unavailable or Canceled", err)
	}
}

// TestSocketModeAndGroup: mode 0660 and a group are applied to the socket, for a
// kube-apiserver that runs as a non-root user in that group.
func TestSocketModeAndGroup(t *testing.T) {
	gid := os.Getgid()
	if os.Geteuid() == 0 {
		gid = 4242 // root may give the socket any group
	} else if groups, _ := os.Getgroups(); len(groups) > 0 {
		gid = groups[len(groups)-1]
	}
	sockDir := filepath.Join(t.TempDir(), "run")
	if err := os.Mkdir(sockDir, 0o700); err != nil { // as private as a RuntimeDirectory
		t.Fatal(err)
	}
	path := filepath.Join(sockDir, "kms.sock")
	ln, err := Listen(path, 0o660, gid)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&fs.ModeSocket == 0 || fi.Mode().Perm() != 0o660 {
		t.Fatalf("socket mode %v, want socket 0660", fi.Mode())
	}
	if got := int(fi.Sys().(*syscall.Stat_t).Gid); got != gid {
		t.Fatalf("socket gid %d, want %d", got, gid)
	}
	// A group member can connect (the owner can; a member of gid would by mode 0660).
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	// ... and can reach it: the directory (0700) now lets the group search it,
	// and nothing else was widened.
	di, err := os.Stat(filepath.Dir(path))
	if err != nil {
		t.Fatal(err)
	}
	if got := int(di.Sys().(*syscall.Stat_t).Gid); got != gid || di.Mode().Perm() != 0o710 {
		t.Fatalf("socket directory gid %d mode %04o, want gid %d mode 0710", got, di.Mode().Perm(), gid)
	}
	if os.Geteuid() == 0 {
		// A directory of another user that the group cannot search: refused, untouched.
		dir := filepath.Join(t.TempDir(), "theirs")
		if err := os.Mkdir(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(dir, 4243, 4243); err != nil {
			t.Fatal(err)
		}
		if _, err := Listen(filepath.Join(dir, "kms.sock"), 0o660, gid); err == nil || !strings.Contains(err.Error(), "cannot be searched by socket group") {
			t.Fatalf("Listen in another user's closed directory = %v", err)
		}
		if di, _ := os.Stat(dir); di.Mode().Perm() != 0o700 || int(di.Sys().(*syscall.Stat_t).Gid) != 4243 {
			t.Fatalf("Listen changed another user's directory: %v", di.Mode())
		}
	}
}
