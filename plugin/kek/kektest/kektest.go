package kektest

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"sync"
	"testing"
	"unicode/utf8"

	"github.com/hwkms/hwkms/plugin/kek"
)

// Option changes what Run checks.
type Option func(*config)

type config struct {
	other func(t *testing.T) kek.KEK
}

// WithOther gives Run a second opener that returns a KEK on a different key (same
// backend): Run then checks that a body wrapped by one key fails to unwrap under the
// other with kek.ErrInvalidCiphertext.
func WithOther(open func(t *testing.T) kek.KEK) Option {
	return func(c *config) { c.other = open }
}

// frameHeaderLen is the length of the ciphertext frame's header (version and
// backend bytes, package plugin): a body may be at most kek.MaxCiphertext minus it.
const frameHeaderLen = 2

// goroutines is how many goroutines the concurrency check runs; rounds is how many
// round trips each does.
const (
	goroutines = 8
	rounds     = 4
)

// Run runs the conformance suite of the kek.KEK contract as subtests of t. open
// returns a fresh open KEK; it may be called several times (a shared KEK for most
// checks, fresh ones for the Close checks) and Run closes every KEK it opens.
//
// What Run asserts of today's backends that the interface comment leaves open:
// a second Close returns nil; a Wrap or Unwrap with an already cancelled context
// fails with an error wrapping context.Canceled (alone, or with kek.ErrUnavailable)
// and no panic.
func Run(t *testing.T, open func(t *testing.T) kek.KEK, opts ...Option) {
	t.Helper()
	var c config
	for _, o := range opts {
		o(&c)
	}
	openClosed := func(t *testing.T, open func(t *testing.T) kek.KEK) kek.KEK {
		t.Helper()
		k := open(t)
		if k == nil {
			t.Fatal("open returned a nil KEK")
		}
		t.Cleanup(func() { k.Close() })
		return k
	}
	k := openClosed(t, open)

	t.Run("Identity", func(t *testing.T) { checkIdentity(t, k) })
	t.Run("RoundTrip", func(t *testing.T) { checkRoundTrip(t, k) })
	t.Run("FreshBody", func(t *testing.T) { checkFreshBody(t, k) })
	t.Run("InvalidInput", func(t *testing.T) { checkInvalidInput(t, k) })
	t.Run("TamperedBody", func(t *testing.T) { checkTampered(t, k) })
	t.Run("TruncatedBody", func(t *testing.T) { checkTruncated(t, k) })
	t.Run("AppendedBytes", func(t *testing.T) { checkAppended(t, k) })
	t.Run("WrongAAD", func(t *testing.T) { checkWrongAAD(t, k) })
	t.Run("OtherKey", func(t *testing.T) {
		if c.other == nil {
			t.Skip("no second key (kektest.WithOther not given)")
		}
		checkOtherKey(t, k, openClosed(t, c.other))
	})
	t.Run("Concurrent", func(t *testing.T) { checkConcurrent(t, k) })
	t.Run("CancelledContext", func(t *testing.T) { checkCancelled(t, k) })
	t.Run("Close", func(t *testing.T) { checkClose(t, openClosed(t, open)) })
}

// randBytes returns n random bytes (test data, not secret).
func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// testAAD is a frame AAD of the shape package plugin builds.
var testAAD = []byte("hwkms\x00\x01\x7fkektest-key")

// wrap wraps a random plaintext of n bytes and returns it with its body.
func wrap(t *testing.T, k kek.KEK, check string, n int, aad []byte) (pt, body []byte) {
	t.Helper()
	pt = randBytes(n)
	body, err := k.Wrap(context.Background(), pt, aad)
	if err != nil {
		t.Fatalf("%s: Wrap of %d bytes: %v", check, n, err)
	}
	return pt, body
}

// mustFail unwraps body and asserts an error wrapping want and no plaintext.
func mustFail(t *testing.T, k kek.KEK, check string, n int, body, aad []byte, want error) {
	t.Helper()
	got, err := k.Unwrap(context.Background(), body, aad)
	if err == nil {
		t.Fatalf("%s (plaintext %d bytes, body %d bytes): Unwrap succeeded, want an error wrapping %q", check, n, len(body), want)
	}
	if !errors.Is(err, want) {
		t.Fatalf("%s (plaintext %d bytes, body %d bytes): Unwrap error %q does not wrap %q", check, n, len(body), err, want)
	}
	if len(got) != 0 {
		t.Fatalf("%s (plaintext %d bytes, body %d bytes): Unwrap failed but returned %d bytes of plaintext", check, n, len(body), len(got))
	}
}

func checkIdentity(t *testing.T, k kek.KEK) {
	id := k.ID()
	if id == "" {
		t.Fatal("ID is empty")
	}
	if !utf8.ValidString(id) {
		t.Fatalf("ID %q is not valid UTF-8", id)
	}
	if len(id) > kek.MaxKeyIDLen {
		t.Fatalf("ID is %d bytes, over kek.MaxKeyIDLen (%d)", len(id), kek.MaxKeyIDLen)
	}
	b := k.Backend()
	if b.String() == "unknown" {
		t.Fatalf("Backend 0x%02x is not an assigned kek.Backend", byte(b))
	}
	wrap(t, k, "Identity", 32, testAAD)
	if got := k.ID(); got != id {
		t.Fatalf("ID changed from %q to %q", id, got)
	}
	if got := k.Backend(); got != b {
		t.Fatalf("Backend changed from %v to %v", b, got)
	}
}

func checkRoundTrip(t *testing.T, k kek.KEK) {
	for _, n := range []int{1, 32, kek.MaxPlaintext} {
		for _, aad := range [][]byte{testAAD, {}} {
			pt, body := wrap(t, k, "RoundTrip", n, aad)
			in := bytes.Clone(pt)
			if len(body) == 0 {
				t.Fatalf("RoundTrip: Wrap of %d bytes returned an empty body", n)
			}
			if len(body)+frameHeaderLen > kek.MaxCiphertext {
				t.Fatalf("RoundTrip: Wrap of %d bytes returned a %d-byte body; a frame holds at most %d", n, len(body), kek.MaxCiphertext-frameHeaderLen)
			}
			if n >= 16 && bytes.Contains(body, pt) {
				t.Fatalf("RoundTrip: the %d-byte body of a %d-byte plaintext carries the plaintext in clear", len(body), n)
			}
			got, err := k.Unwrap(context.Background(), body, aad)
			if err != nil {
				t.Fatalf("RoundTrip: Unwrap of a %d-byte body (plaintext %d bytes, aad %d bytes): %v", len(body), n, len(aad), err)
			}
			if !bytes.Equal(got, pt) {
				t.Fatalf("RoundTrip: Unwrap returned %d bytes that differ from the %d-byte plaintext", len(got), n)
			}
			if !bytes.Equal(pt, in) {
				t.Fatalf("RoundTrip: Wrap or Unwrap changed the caller's %d-byte plaintext", n)
			}
		}
	}
}

func checkFreshBody(t *testing.T, k kek.KEK) {
	for _, n := range []int{1, 32} {
		pt := randBytes(n)
		a, err := k.Wrap(context.Background(), pt, testAAD)
		if err != nil {
			t.Fatalf("FreshBody: Wrap of %d bytes: %v", n, err)
		}
		b, err := k.Wrap(context.Background(), pt, testAAD)
		if err != nil {
			t.Fatalf("FreshBody: second Wrap of %d bytes: %v", n, err)
		}
		if bytes.Equal(a, b) {
			t.Fatalf("FreshBody: two Wraps of the same %d-byte plaintext and aad returned the same body", n)
		}
		for i, body := range [][]byte{a, b} {
			got, err := k.Unwrap(context.Background(), body, testAAD)
			if err != nil || !bytes.Equal(got, pt) {
				t.Fatalf("FreshBody: Unwrap of body %d (plaintext %d bytes): %d bytes, %v", i, n, len(got), err)
			}
		}
	}
}

func checkInvalidInput(t *testing.T, k kek.KEK) {
	for _, tc := range []struct {
		name string
		pt   []byte
	}{
		{"nil", nil},
		{"empty", []byte{}},
		{"oversize", randBytes(kek.MaxPlaintext + 1)},
		{"far oversize", randBytes(kek.MaxCiphertext + 1)},
	} {
		body, err := k.Wrap(context.Background(), tc.pt, testAAD)
		if !errors.Is(err, kek.ErrInvalidInput) {
			t.Fatalf("InvalidInput: Wrap of a %s plaintext (%d bytes) = %v, want an error wrapping %q", tc.name, len(tc.pt), err, kek.ErrInvalidInput)
		}
		if len(body) != 0 {
			t.Fatalf("InvalidInput: Wrap of a %s plaintext (%d bytes) failed but returned a %d-byte body", tc.name, len(tc.pt), len(body))
		}
	}
	// An empty body is a truncation too, but also the smallest invalid input of Unwrap.
	mustFail(t, k, "InvalidInput: nil body", 0, nil, testAAD, kek.ErrInvalidCiphertext)
	mustFail(t, k, "InvalidInput: oversize body", 0, randBytes(kek.MaxCiphertext+1), testAAD, kek.ErrInvalidCiphertext)
}

func checkTampered(t *testing.T, k kek.KEK) {
	const n = 32
	_, body := wrap(t, k, "TamperedBody", n, testAAD)
	for i := range body {
		for _, mask := range []byte{0xff, 0x01} {
			bad := bytes.Clone(body)
			bad[i] ^= mask
			mustFail(t, k, fmt.Sprintf("TamperedBody: byte %d of %d xor 0x%02x", i, len(body), mask), n, bad, testAAD, kek.ErrInvalidCiphertext)
		}
	}
}

func checkTruncated(t *testing.T, k kek.KEK) {
	const n = 32
	_, body := wrap(t, k, "TruncatedBody", n, testAAD)
	for l := 0; l < len(body); l++ {
		mustFail(t, k, fmt.Sprintf("TruncatedBody: first %d of %d bytes", l, len(body)), n, bytes.Clone(body[:l]), testAAD, kek.ErrInvalidCiphertext)
	}
	// Dropping the first bytes instead.
	for l := 1; l < len(body); l++ {
		mustFail(t, k, fmt.Sprintf("TruncatedBody: without the first %d of %d bytes", l, len(body)), n, bytes.Clone(body[l:]), testAAD, kek.ErrInvalidCiphertext)
	}
}

func checkAppended(t *testing.T, k kek.KEK) {
	const n = 32
	_, body := wrap(t, k, "AppendedBytes", n, testAAD)
	for _, extra := range [][]byte{{0}, {0xff}, randBytes(16), make([]byte, kek.MaxCiphertext)} {
		bad := append(bytes.Clone(body), extra...)
		mustFail(t, k, fmt.Sprintf("AppendedBytes: %d bytes after a %d-byte body", len(extra), len(body)), n, bad, testAAD, kek.ErrInvalidCiphertext)
	}
}

func checkWrongAAD(t *testing.T, k kek.KEK) {
	const n = 32
	_, body := wrap(t, k, "WrongAAD", n, testAAD)
	flipped := bytes.Clone(testAAD)
	flipped[len(flipped)-1] ^= 0x01
	firstBit := bytes.Clone(testAAD)
	firstBit[0] ^= 0x80
	for _, tc := range []struct {
		name string
		aad  []byte
	}{
		{"different", []byte("hwkms\x00\x01\x7fanother-key")},
		{"empty", []byte{}},
		{"nil", nil},
		{"last bit changed", flipped},
		{"first bit changed", firstBit},
		{"one byte longer", append(bytes.Clone(testAAD), 0)},
		{"one byte shorter", testAAD[:len(testAAD)-1]},
	} {
		mustFail(t, k, "WrongAAD: "+tc.name+" aad", n, body, tc.aad, kek.ErrInvalidCiphertext)
	}
	// And the other way: a body bound to an empty aad refuses a non-empty one.
	_, body = wrap(t, k, "WrongAAD", n, nil)
	mustFail(t, k, "WrongAAD: body wrapped with empty aad, unwrapped with another", n, body, testAAD, kek.ErrInvalidCiphertext)
}

func checkOtherKey(t *testing.T, k, other kek.KEK) {
	const n = 32
	if k.ID() == other.ID() {
		t.Fatalf("OtherKey: both keys have ID %q; a different key must have a different ID", k.ID())
	}
	_, body := wrap(t, k, "OtherKey", n, testAAD)
	mustFail(t, other, "OtherKey: body of the first key unwrapped under the second", n, body, testAAD, kek.ErrInvalidCiphertext)
	_, body = wrap(t, other, "OtherKey", n, testAAD)
	mustFail(t, k, "OtherKey: body of the second key unwrapped under the first", n, body, testAAD, kek.ErrInvalidCiphertext)
}

func checkConcurrent(t *testing.T, k kek.KEK) {
	var wg sync.WaitGroup
	errs := make(chan error, goroutines*rounds)
	for g := range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			aad := []byte(fmt.Sprintf("hwkms\x00\x01\x7fgoroutine-%d", g))
			for r := range rounds {
				n := 1 + (g*rounds+r)%kek.MaxPlaintext
				pt := randBytes(n)
				body, err := k.Wrap(context.Background(), pt, aad)
				if err != nil {
					errs <- fmt.Errorf("goroutine %d round %d: Wrap of %d bytes: %w", g, r, n, err)
					return
				}
				got, err := k.Unwrap(context.Background(), body, aad)
				if err != nil {
					errs <- fmt.Errorf("goroutine %d round %d: Unwrap (plaintext %d bytes): %w", g, r, n, err)
					return
				}
				if !bytes.Equal(got, pt) {
					errs <- fmt.Errorf("goroutine %d round %d: Unwrap returned %d bytes that differ from the %d-byte plaintext", g, r, len(got), n)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("Concurrent: %v", err)
	}
}

func checkCancelled(t *testing.T, k kek.KEK) {
	const n = 32
	pt, body := wrap(t, k, "CancelledContext", n, testAAD)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	got, err := k.Wrap(ctx, pt, testAAD)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("CancelledContext: Wrap of %d bytes = %v, want an error wrapping context.Canceled", n, err)
	}
	if len(got) != 0 {
		t.Fatalf("CancelledContext: Wrap failed but returned a %d-byte body", len(got))
	}
	got, err = k.Unwrap(ctx, body, testAAD)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("CancelledContext: Unwrap (plaintext %d bytes) = %v, want an error wrapping context.Canceled", n, err)
	}
	if len(got) != 0 {
		t.Fatalf("CancelledContext: Unwrap failed but returned %d bytes of plaintext", len(got))
	}
	// The KEK still works with a live context.
	got, err = k.Unwrap(context.Background(), body, testAAD)
	if err != nil || !bytes.Equal(got, pt) {
		t.Fatalf("CancelledContext: Unwrap after the cancelled calls (plaintext %d bytes): %d bytes, %v", n, len(got), err)
	}
}

func checkClose(t *testing.T, k kek.KEK) {
	const n = 32
	id, b := k.ID(), k.Backend()
	pt, body := wrap(t, k, "Close", n, testAAD)
	if err := k.Close(); err != nil {
		t.Fatalf("Close: first Close: %v", err)
	}
	if err := k.Close(); err != nil {
		t.Fatalf("Close: second Close = %v, want nil", err)
	}
	got, err := k.Wrap(context.Background(), pt, testAAD)
	if !errors.Is(err, kek.ErrClosed) {
		t.Fatalf("Close: Wrap of %d bytes after Close = %v, want an error wrapping %q", n, err, kek.ErrClosed)
	}
	if len(got) != 0 {
		t.Fatalf("Close: Wrap after Close failed but returned a %d-byte body", len(got))
	}
	mustFail(t, k, "Close: Unwrap after Close", n, body, testAAD, kek.ErrClosed)
	if k.ID() != id || k.Backend() != b {
		t.Fatalf("Close: after Close, ID %q and Backend %v, want %q and %v", k.ID(), k.Backend(), id, b)
	}
}
