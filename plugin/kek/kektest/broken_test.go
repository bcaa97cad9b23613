package kektest_test

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/plugin/kek/kektest"
)

// brokenKEK is an AES-GCM KEK with one deliberate contract violation, named by mode.
type brokenKEK struct {
	mode   string
	aead   cipher.AEAD
	ids    atomic.Int64
	mu     sync.Mutex
	closed bool
	closes int
}

func newBroken(mode string) *brokenKEK {
	key := make([]byte, 32)
	rand.Read(key)
	blk, _ := aes.NewCipher(key)
	aead, _ := cipher.NewGCM(blk)
	return &brokenKEK{mode: mode, aead: aead}
}

func (k *brokenKEK) ID() string {
	if k.mode == "unstable-id" {
		return fmt.Sprintf("broken-%d", k.ids.Add(1))
	}
	return "broken"
}

func (k *brokenKEK) Backend() kek.Backend { return kek.BackendTest }

func (k *brokenKEK) isClosed() bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.closed && k.mode != "close-not-closed"
}

func (k *brokenKEK) Wrap(ctx context.Context, pt, aad []byte) ([]byte, error) {
	if k.isClosed() {
		return nil, kek.ErrClosed
	}
	if (len(pt) == 0 && k.mode != "accept-empty") || len(pt) > kek.MaxPlaintext {
		return nil, kek.ErrInvalidInput
	}
	if ctx.Err() != nil && k.mode != "ignore-ctx" {
		return nil, ctx.Err()
	}
	nonce := make([]byte, 12)
	if k.mode != "fixed-nonce" {
		rand.Read(nonce)
	}
	if k.mode == "ignore-aad" {
		aad = nil
	}
	return k.aead.Seal(nonce, nonce, pt, aad), nil
}

func (k *brokenKEK) Unwrap(ctx context.Context, body, aad []byte) ([]byte, error) {
	if k.isClosed() {
		return nil, kek.ErrClosed
	}
	if ctx.Err() != nil && k.mode != "ignore-ctx" {
		return nil, ctx.Err()
	}
	if len(body) < 12+16 {
		return nil, kek.ErrInvalidCiphertext
	}
	if k.mode == "ignore-aad" {
		aad = nil
	}
	pt, err := k.aead.Open(nil, body[:12], body[12:], aad)
	if err != nil && k.mode == "lenient-tail" && len(body) > 12+16 {
		pt, err = k.aead.Open(nil, body[:12], body[12:len(body)-1], aad)
	}
	if err != nil {
		switch k.mode {
		case "wrong-sentinel":
			return nil, kek.ErrUnavailable
		case "plaintext-on-error":
			return []byte("garbage"), kek.ErrInvalidCiphertext
		}
		return nil, kek.ErrInvalidCiphertext
	}
	return pt, nil
}

func (k *brokenKEK) Close() error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.closes++
	k.closed = true
	if k.mode == "close-twice-error" && k.closes > 1 {
		return errors.New("already closed")
	}
	return nil
}

const brokenEnv = "KEKTEST_BROKEN_MODE"

// TestBrokenHelper is not a test on its own: TestSuiteCatches runs it in a child
// process with a brokenKEK mode, where Run must fail.
func TestBrokenHelper(t *testing.T) {
	mode := os.Getenv(brokenEnv)
	if mode == "" {
		t.Skip("child process of TestSuiteCatches; runs only under " + brokenEnv)
	}
	kektest.Run(t, func(t *testing.T) kek.KEK { return newBroken(mode) })
}

// TestSuiteCatches: Run fails, naming the right check, on a KEK with each kind of
// contract violation (and passes on the correct brokenKEK, mode "none").
func TestSuiteCatches(t *testing.T) {
	for _, tc := range []struct{ mode, want string }{
		{"none", ""},
		{"unstable-id", "ID changed"},
		{"fixed-nonce", "FreshBody: two Wraps"},
		{"accept-empty", "InvalidInput: nil plaintext (0 bytes): Wrap = <nil>"},
		{"wrong-sentinel", "does not wrap"},
		{"plaintext-on-error", "failed but returned"},
		{"lenient-tail", "AppendedBytes: 1 bytes after"},
		{"ignore-aad", "WrongAAD: different aad"},
		{"ignore-ctx", "CancelledContext: Wrap"},
		{"close-not-closed", "Close: Wrap of 32 bytes after Close"},
		{"close-twice-error", "Close: second Close"},
	} {
		t.Run(tc.mode, func(t *testing.T) {
			cmd := exec.Command(os.Args[0], "-test.run=^TestBrokenHelper$", "-test.count=1")
			cmd.Env = append(os.Environ(), brokenEnv+"="+tc.mode)
			out, err := cmd.CombinedOutput()
			if tc.want == "" {
				if err != nil {
					t.Fatalf("Run failed on a correct KEK: %v\n%s", err, out)
				}
				return
			}
			if err == nil {
				t.Fatalf("Run passed a KEK with mode %q\n%s", tc.mode, out)
			}
			if !strings.Contains(string(out), tc.want) {
				t.Fatalf("Run failed, but not with %q:\n%s", tc.want, out)
			}
		})
	}
}
