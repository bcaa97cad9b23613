package plugin

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/hwkms/hwkms/plugin/kek"
)

// fakeKEK is an in-memory AES-256-GCM KEK for unit tests. Body: nonce(12) | sealed.
type fakeKEK struct {
	id    string
	aead  cipher.AEAD
	calls atomic.Int64 // Wrap + Unwrap calls

	mu       sync.Mutex
	failWith error         // returned by Wrap and Unwrap when set
	block    chan struct{} // when set, Unwrap waits for it to close (or ctx)
	closed   bool
}

func newFakeKEK(id string) *fakeKEK {
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		panic(err)
	}
	blk, err := aes.NewCipher(key)
	if err != nil {
		panic(err)
	}
	aead, err := cipher.NewGCM(blk)
	if err != nil {
		panic(err)
	}
	return &fakeKEK{id: id, aead: aead}
}

func (k *fakeKEK) ID() string           { return k.id }
func (k *fakeKEK) Backend() kek.Backend { return kek.BackendTest }

func (k *fakeKEK) state() (error, chan struct{}) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.closed {
		return fmt.Errorf("fake %s: %w", k.id, kek.ErrClosed), nil
	}
	return k.failWith, k.block
}

func (k *fakeKEK) setFail(err error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.failWith = err
}

func (k *fakeKEK) Wrap(ctx context.Context, plaintext, aad []byte) ([]byte, error) {
	k.calls.Add(1)
	if err, _ := k.state(); err != nil {
		return nil, err
	}
	if len(plaintext) == 0 || len(plaintext) > kek.MaxPlaintext {
		return nil, fmt.Errorf("fake: %w", kek.ErrInvalidInput)
	}
	nonce := make([]byte, k.aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	return k.aead.Seal(nonce, nonce, plaintext, aad), nil
}

func (k *fakeKEK) Unwrap(ctx context.Context, body, aad []byte) ([]byte, error) {
	k.calls.Add(1)
	err, block := k.state()
	if err != nil {
		return nil, err
	}
	if block != nil {
		select {
		case <-block:
		case <-ctx.Done():
			return nil, fmt.Errorf("fake: waiting: %w", ctx.Err())
		}
		if err, _ := k.state(); err != nil {
			return nil, err
		}
	}
	ns := k.aead.NonceSize()
	if len(body) < ns+k.aead.Overhead() {
		return nil, fmt.Errorf("fake: short body: %w", kek.ErrInvalidCiphertext)
	}
	pt, err := k.aead.Open(nil, body[:ns], body[ns:], aad)
	if err != nil {
		return nil, fmt.Errorf("fake: %w: %w", kek.ErrInvalidCiphertext, err)
	}
	return pt, nil
}

func (k *fakeKEK) Close() error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.closed = true
	return nil
}

func (k *fakeKEK) isClosed() bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.closed
}
