package kektest

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

// Fake is an in-memory kek.KEK for tests: AES-256-GCM under a key it holds, body
// nonce(12) | ciphertext || tag(16), Backend kek.BackendTest. It passes Run. Its
// hooks (SetFail, BlockUnwrap, Calls, Closed) are safe to use while other goroutines
// call it.
type Fake struct {
	id     string
	aead   cipher.AEAD // nil in no-crypto mode
	calls  atomic.Int64
	mu     sync.Mutex
	fail   error
	block  <-chan struct{}
	closed bool
}

// FakeOption configures NewFake.
type FakeOption func(*fakeConfig)

type fakeConfig struct {
	key      []byte
	noCrypto bool
}

// FakeKey makes the Fake use key (32 bytes) instead of a random one, so its bodies
// can be checked against a known key (golden files). NewFake panics on another size.
func FakeKey(key []byte) FakeOption {
	return func(c *fakeConfig) { c.key = key }
}

// FakeNoCrypto makes the Fake do no cryptography, for benchmarks of the plugin's
// own cost: Wrap returns a body of the size of an hsm body (29 bytes more than the
// plaintext) carrying the plaintext in clear, Unwrap returns those bytes back and
// authenticates nothing. Such a Fake does not pass Run.
func FakeNoCrypto() FakeOption {
	return func(c *fakeConfig) { c.noCrypto = true }
}

// noCryptoHeader and noCryptoTrailer pad a no-crypto body to the size of an hsm body
// (1-byte version, 12-byte IV, 16-byte tag).
const (
	noCryptoHeader  = 13
	noCryptoTrailer = 16
)

// NewFake returns an open Fake whose ID is id (any string, even an invalid one, so
// tests can check how callers refuse it).
func NewFake(id string, opts ...FakeOption) *Fake {
	var c fakeConfig
	for _, o := range opts {
		o(&c)
	}
	f := &Fake{id: id}
	if c.noCrypto {
		return f
	}
	key := c.key
	if key == nil {
		key = make([]byte, 32)
		rand.Read(key)
	}
	if len(key) != 32 {
		panic(fmt.Sprintf("kektest: FakeKey is %d bytes, want 32", len(key)))
	}
	blk, err := aes.NewCipher(key)
	if err != nil {
		panic(err)
	}
	aead, err := cipher.NewGCM(blk)
	if err != nil {
		panic(err)
	}
	f.aead = aead
	return f
}

// ID returns the id given to NewFake.
func (f *Fake) ID() string { return f.id }

// Backend returns kek.BackendTest.
func (f *Fake) Backend() kek.Backend { return kek.BackendTest }

// SetFail makes every following Wrap and Unwrap return err (which should wrap the
// sentinel the test wants the caller to see), until SetFail(nil).
func (f *Fake) SetFail(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fail = err
}

// BlockUnwrap makes every following Unwrap wait until release is closed or its
// context ends (then it fails with an error wrapping kek.ErrUnavailable and the
// context's error), like a device that stops answering. BlockUnwrap(nil) stops
// blocking new calls.
func (f *Fake) BlockUnwrap(release <-chan struct{}) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.block = release
}

// Calls returns the number of Wrap and Unwrap calls so far, failed ones included.
func (f *Fake) Calls() int64 { return f.calls.Load() }

// Closed reports whether Close was called.
func (f *Fake) Closed() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.closed
}

// state returns the error an operation must fail with now (closed first, then the
// SetFail error) and the channel Unwrap must wait for.
func (f *Fake) state() (error, <-chan struct{}) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return fmt.Errorf("fake %q: %w", f.id, kek.ErrClosed), nil
	}
	return f.fail, f.block
}

// Wrap seals plaintext (1..kek.MaxPlaintext bytes) under a fresh random nonce with
// aad as GCM additional data.
func (f *Fake) Wrap(ctx context.Context, plaintext, aad []byte) ([]byte, error) {
	f.calls.Add(1)
	if err, _ := f.state(); err != nil {
		return nil, err
	}
	if n := len(plaintext); n == 0 || n > kek.MaxPlaintext {
		return nil, fmt.Errorf("fake: plaintext is %d bytes, want 1..%d: %w", n, kek.MaxPlaintext, kek.ErrInvalidInput)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("fake: wrap: %w: %w", kek.ErrUnavailable, err)
	}
	if f.aead == nil {
		body := make([]byte, noCryptoHeader+len(plaintext)+noCryptoTrailer)
		copy(body[noCryptoHeader:], plaintext)
		return body, nil
	}
	nonce := make([]byte, f.aead.NonceSize(), f.aead.NonceSize()+len(plaintext)+f.aead.Overhead())
	rand.Read(nonce)
	return f.aead.Seal(nonce, nonce, plaintext, aad), nil
}

// Unwrap opens a body made by Wrap with the same aad. A body that is too short or
// does not authenticate fails with an error wrapping kek.ErrInvalidCiphertext.
func (f *Fake) Unwrap(ctx context.Context, body, aad []byte) ([]byte, error) {
	f.calls.Add(1)
	err, block := f.state()
	if err != nil {
		return nil, err
	}
	if block != nil {
		select {
		case <-block:
		case <-ctx.Done():
			return nil, fmt.Errorf("fake: unwrap: device did not answer: %w: %w", kek.ErrUnavailable, ctx.Err())
		}
		if err, _ := f.state(); err != nil {
			return nil, err
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("fake: unwrap: %w: %w", kek.ErrUnavailable, err)
	}
	if f.aead == nil {
		if len(body) <= noCryptoHeader+noCryptoTrailer {
			return nil, fmt.Errorf("fake: body is %d bytes: %w", len(body), kek.ErrInvalidCiphertext)
		}
		return append([]byte(nil), body[noCryptoHeader:len(body)-noCryptoTrailer]...), nil
	}
	ns := f.aead.NonceSize()
	if len(body) <= ns+f.aead.Overhead() {
		return nil, fmt.Errorf("fake: body is %d bytes, want more than %d: %w", len(body), ns+f.aead.Overhead(), kek.ErrInvalidCiphertext)
	}
	pt, err := f.aead.Open(nil, body[:ns], body[ns:], aad)
	if err != nil {
		return nil, fmt.Errorf("fake: %w: %w", kek.ErrInvalidCiphertext, err)
	}
	return pt, nil
}

// Close marks the Fake closed: every later Wrap and Unwrap fails with an error
// wrapping kek.ErrClosed. It always returns nil.
func (f *Fake) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = true
	return nil
}
