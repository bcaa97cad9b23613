package main

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/hwkms/hwkms/plugin"
	"github.com/hwkms/hwkms/plugin/kek"
)

// memKEK is the in-memory floor of `make bench`: AES-256-GCM under a random key held
// in this process, behind the real plugin.Service and plugin.Serve. It exists only in
// this benchmark driver: no hwkms configuration can name it, and it reports
// kek.BackendTest. Body: nonce(12) | ciphertext || tag(16), aad bound as GCM
// additional data. Everything hwkms adds on top of a KEK that costs nothing but
// AES-GCM is the difference between this server and hwkms on a device.
type memKEK struct {
	aead   cipher.AEAD
	id     string
	closed atomic.Bool
}

func newMemKEK() (*memKEK, error) {
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return nil, err
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	// key_id from the key itself, as every KEK's: a hash, never the key.
	sum := sha256.Sum256(append([]byte("hwkms bench floor key_id\x00"), key...))
	clear(key)
	return &memKEK{aead: aead, id: "bench-floor:" + hex.EncodeToString(sum[:8])}, nil
}

func (m *memKEK) ID() string           { return m.id }
func (m *memKEK) Backend() kek.Backend { return kek.BackendTest }
func (m *memKEK) Close() error         { m.closed.Store(true); return nil }

// usable is what every KEK checks first: closed, or the caller gave up.
func (m *memKEK) usable(ctx context.Context, op string) error {
	if m.closed.Load() {
		return fmt.Errorf("floor: %s: %w", op, kek.ErrClosed)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("floor: %s: %w: %w", op, kek.ErrUnavailable, err)
	}
	return nil
}

func (m *memKEK) Wrap(ctx context.Context, plaintext, aad []byte) ([]byte, error) {
	if err := m.usable(ctx, "wrap"); err != nil {
		return nil, err
	}
	if len(plaintext) == 0 || len(plaintext) > kek.MaxPlaintext {
		return nil, fmt.Errorf("floor: wrap: %w", kek.ErrInvalidInput)
	}
	out := make([]byte, m.aead.NonceSize(), m.aead.NonceSize()+len(plaintext)+m.aead.Overhead())
	if _, err := rand.Read(out); err != nil {
		return nil, err
	}
	return m.aead.Seal(out, out, plaintext, aad), nil
}

func (m *memKEK) Unwrap(ctx context.Context, body, aad []byte) ([]byte, error) {
	if err := m.usable(ctx, "unwrap"); err != nil {
		return nil, err
	}
	n := m.aead.NonceSize()
	if len(body) < n+m.aead.Overhead() {
		return nil, fmt.Errorf("floor: unwrap: %w", kek.ErrInvalidCiphertext)
	}
	pt, err := m.aead.Open(nil, body[:n], body[n:], aad)
	if err != nil {
		return nil, fmt.Errorf("floor: unwrap: %w", kek.ErrInvalidCiphertext)
	}
	return pt, nil
}

// serveFloor is `benchtable --serve-floor SOCKET`: it serves memKEK on the socket the
// way `hwkms serve` serves a device KEK (plugin.NewService, plugin.Serve, the same
// 3 s timeout) until SIGKILL.
func serveFloor(sock string) error {
	k, err := newMemKEK()
	if err != nil {
		return err
	}
	ring, err := plugin.NewKeyring(k)
	if err != nil {
		return err
	}
	svc := plugin.NewService(ring, plugin.Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	svc.ProbeNow(context.Background())
	return plugin.Serve(context.Background(), svc, plugin.SocketOptions{Path: sock, Timeout: 3 * time.Second}, nil)
}

// floorServer starts this binary with --serve-floor in a child process (a separate
// process, as hwkms is) and returns its socket and PID once it answers; stop kills
// it by its PID and waits.
func (r *runner) floorServer(ctx context.Context) (sock string, pid int, stop func(), err error) {
	self, err := os.Executable()
	if err != nil {
		return "", 0, nil, err
	}
	dir, err := os.MkdirTemp("", "hwkms-bench-floor-")
	if err != nil {
		return "", 0, nil, err
	}
	sock = filepath.Join(dir, "floor.sock")
	logf, err := os.Create(filepath.Join(r.out, "serve-floor.log"))
	if err != nil {
		os.RemoveAll(dir)
		return "", 0, nil, err
	}
	cmd := exec.Command(self, "--serve-floor", sock)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		os.RemoveAll(dir)
		return "", 0, nil, err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	stop = func() {
		cmd.Process.Kill()
		<-exited
		logf.Close()
		os.RemoveAll(dir)
	}
	if err := waitReady(ctx, sock, exited); err != nil {
		stop()
		return "", 0, nil, errors.Join(errors.New("in-memory floor server"), err)
	}
	r.progress("started the in-memory AES-GCM floor server, pid %d", cmd.Process.Pid)
	return sock, cmd.Process.Pid, stop, nil
}
