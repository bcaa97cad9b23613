package plugin

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hwkms/hwkms/plugin/kek/kektest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"
)

// serveTest serves svc on a socket in a temp dir and returns a connected client.
func serveTest(t *testing.T, svc *Service) (kmsapi.KeyManagementServiceClient, string, func()) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "kms.sock")
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	errc := make(chan error, 1)
	go func() { errc <- Serve(ctx, svc, SocketOptions{Path: path, GID: -1, Timeout: time.Second}, ready) }()
	select {
	case <-ready:
	case err := <-errc:
		t.Fatalf("Serve: %v", err)
	}
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	stop := func() {
		conn.Close()
		cancel()
		if err := <-errc; err != nil {
			t.Errorf("Serve returned %v", err)
		}
	}
	return kmsapi.NewKeyManagementServiceClient(conn), path, stop
}

func TestServeOverSocket(t *testing.T) {
	svc := newTestService(t, kektest.NewFake("A"))
	svc.ProbeNow(context.Background())
	client, path, stop := serveTest(t, svc)
	defer func() { stop() }()

	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&fs.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v, want socket 0600", fi.Mode())
	}

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := client.Status(ctx, &kmsapi.StatusRequest{})
	if err != nil || st.Version != "v2" || st.Healthz != "ok" || st.KeyId != "A" {
		t.Fatalf("Status: %+v %v", st, err)
	}
	enc, err := client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: seed(32), Uid: "u1"})
	if err != nil {
		t.Fatal(err)
	}
	bad := bytes.Clone(enc.Ciphertext)
	bad[len(bad)-3] ^= 0x10
	for _, tc := range []struct {
		name string
		call func() error
		code codes.Code
	}{
		{"tampered", func() error {
			_, err := client.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: bad, KeyId: "A"})
			return err
		}, codes.InvalidArgument},
		{"truncated", func() error {
			_, err := client.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext[:10], KeyId: "A"})
			return err
		}, codes.InvalidArgument},
		{"empty", func() error {
			_, err := client.Decrypt(ctx, &kmsapi.DecryptRequest{KeyId: "A"})
			return err
		}, codes.InvalidArgument},
		{"oversize ciphertext", func() error {
			_, err := client.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: make([]byte, 2048), KeyId: "A"})
			return err
		}, codes.InvalidArgument},
		{"unknown key_id", func() error {
			_, err := client.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: "nope"})
			return err
		}, codes.NotFound},
		{"oversize plaintext", func() error {
			_, err := client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: make([]byte, 4096)})
			return err
		}, codes.InvalidArgument},
		{"oversize plaintext 128 KiB", func() error {
			_, err := client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: make([]byte, 128<<10)})
			return err
		}, codes.InvalidArgument},
		{"message over the gRPC bound", func() error {
			_, err := client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: make([]byte, 2<<20)})
			return err
		}, codes.ResourceExhausted},
	} {
		t.Run(tc.name, func(t *testing.T) { wantCode(t, tc.call(), tc.code) })
	}
	dec, err := client.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId})
	if err != nil || !bytes.Equal(dec.Plaintext, seed(32)) {
		t.Fatalf("server stopped serving after bad input: %v", err)
	}

	// A second server on the same path must refuse to start, and the check that serve
	// runs before opening devices must say so too.
	if _, err := Listen(path, 0o600, -1); !errors.Is(err, ErrSocketInUse) {
		t.Fatalf("second Listen: %v, want ErrSocketInUse", err)
	}
	if err := CheckSocket(path); !errors.Is(err, ErrSocketInUse) {
		t.Fatalf("CheckSocket on a served socket: %v", err)
	}
	stop()
	if _, err := os.Lstat(path); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("socket left behind after shutdown: %v", err)
	}
	if err := CheckSocket(path); err != nil {
		t.Fatalf("CheckSocket after shutdown: %v", err)
	}
	stop = func() {}
}

func TestListenStaleAndForeignFiles(t *testing.T) {
	dir := t.TempDir()
	stale := filepath.Join(dir, "stale.sock")
	// A socket file nobody serves: bind without the listener's unlink-on-close.
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()
	l2, err := Listen(stale, 0o600, -1)
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	// While l2 holds the lock, a racing second Listen cannot remove its socket, even
	// before anything would answer a dial.
	if _, err := Listen(stale, 0o600, -1); !errors.Is(err, ErrSocketInUse) {
		t.Fatalf("Listen while the lock is held: %v", err)
	}
	l2.Close()
	l2.Close() // idempotent

	regular := filepath.Join(dir, "file")
	if err := os.WriteFile(regular, []byte("keep me"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(regular, 0o600, -1); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("Listen over a regular file: %v", err)
	}
	if b, _ := os.ReadFile(regular); string(b) != "keep me" {
		t.Fatal("regular file was touched")
	}
}

// TestRequestWithoutDeadline: a client that sends no deadline cannot hold a handler
// past the server's Timeout (1 s in serveTest) when the device hangs.
func TestRequestWithoutDeadline(t *testing.T) {
	k := kektest.NewFake("A")
	svc := newTestService(t, k)
	svc.ProbeNow(context.Background())
	client, _, stop := serveTest(t, svc)
	defer stop()
	enc, err := client.Encrypt(context.Background(), &kmsapi.EncryptRequest{Plaintext: seed(32), Uid: "u"})
	if err != nil {
		t.Fatal(err)
	}
	hang := make(chan struct{})
	defer close(hang)
	k.BlockUnwrap(hang)
	start := time.Now()
	_, err = client.Decrypt(context.Background(), &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: "A", Uid: "u"})
	took := time.Since(start)
	if status.Code(err) != codes.DeadlineExceeded || took > 3*time.Second {
		t.Fatalf("Decrypt without a deadline on a hung device: %v after %v, want DeadlineExceeded after about 1 s", err, took)
	}
	t.Logf("answered %v after %v", status.Code(err), took.Round(time.Millisecond))
}
