package kektest_test

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/plugin/kek/kektest"
)

func TestFakeConforms(t *testing.T) {
	open := func(t *testing.T) kek.KEK { return kektest.NewFake("fake-a") }
	other := func(t *testing.T) kek.KEK { return kektest.NewFake("fake-b") }
	kektest.Run(t, open, kektest.WithOther(other))
}

// TestFakeHooks: the hooks the plugin's tests rely on do what they say.
func TestFakeHooks(t *testing.T) {
	ctx := context.Background()
	f := kektest.NewFake("hooks")
	pt := []byte("0123456789abcdef0123456789abcdef")
	body, err := f.Wrap(ctx, pt, nil)
	if err != nil {
		t.Fatal(err)
	}
	if f.Calls() != 1 {
		t.Fatalf("Calls after one Wrap = %d", f.Calls())
	}

	boom := errors.New("boom")
	f.SetFail(boom)
	if _, err := f.Wrap(ctx, pt, nil); !errors.Is(err, boom) {
		t.Fatalf("Wrap with SetFail = %v", err)
	}
	if got, err := f.Unwrap(ctx, body, nil); !errors.Is(err, boom) || got != nil {
		t.Fatalf("Unwrap with SetFail = %d bytes, %v", len(got), err)
	}
	f.SetFail(nil)
	if f.Calls() != 3 {
		t.Fatalf("Calls counts failed calls too: %d, want 3", f.Calls())
	}

	release := make(chan struct{})
	f.BlockUnwrap(release)
	done := make(chan error, 1)
	go func() {
		got, err := f.Unwrap(ctx, body, nil)
		if err == nil && !bytes.Equal(got, pt) {
			err = errors.New("wrong plaintext")
		}
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("Unwrap returned while blocked: %v", err)
	default:
	}
	dctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := f.Unwrap(dctx, body, nil); !errors.Is(err, context.Canceled) || !errors.Is(err, kek.ErrUnavailable) {
		t.Fatalf("blocked Unwrap with a done context = %v, want Canceled and ErrUnavailable", err)
	}
	close(release)
	if err := <-done; err != nil {
		t.Fatalf("released Unwrap: %v", err)
	}
	f.BlockUnwrap(nil)

	if f.Closed() {
		t.Fatal("Closed before Close")
	}
	f.Close()
	if !f.Closed() {
		t.Fatal("not Closed after Close")
	}
}

// TestFakeKey: a Fake with a fixed key opens the bodies of another Fake with the same
// key, and not those of a random-key Fake.
func TestFakeKey(t *testing.T) {
	ctx := context.Background()
	key := bytes.Repeat([]byte{7}, 32)
	a, b := kektest.NewFake("a", kektest.FakeKey(key)), kektest.NewFake("b", kektest.FakeKey(key))
	body, err := a.Wrap(ctx, []byte("seed"), []byte("aad"))
	if err != nil {
		t.Fatal(err)
	}
	if got, err := b.Unwrap(ctx, body, []byte("aad")); err != nil || string(got) != "seed" {
		t.Fatalf("same key: %q, %v", got, err)
	}
	if _, err := kektest.NewFake("c").Unwrap(ctx, body, []byte("aad")); !errors.Is(err, kek.ErrInvalidCiphertext) {
		t.Fatalf("other key: %v", err)
	}
}

// TestFakeNoCrypto: the benchmark mode returns bodies of an hsm body's size and gives
// the plaintext back, still refusing out-of-range plaintexts.
func TestFakeNoCrypto(t *testing.T) {
	ctx := context.Background()
	f := kektest.NewFake("nop", kektest.FakeNoCrypto())
	pt := bytes.Repeat([]byte{1}, 32)
	body, err := f.Wrap(ctx, pt, nil)
	if err != nil || len(body) != 29+len(pt) {
		t.Fatalf("Wrap: %d bytes, %v", len(body), err)
	}
	if got, err := f.Unwrap(ctx, body, nil); err != nil || !bytes.Equal(got, pt) {
		t.Fatalf("Unwrap: %d bytes, %v", len(got), err)
	}
	if _, err := f.Wrap(ctx, nil, nil); !errors.Is(err, kek.ErrInvalidInput) {
		t.Fatalf("empty plaintext: %v", err)
	}
	if _, err := f.Unwrap(ctx, body[:29], nil); !errors.Is(err, kek.ErrInvalidCiphertext) {
		t.Fatalf("short body: %v", err)
	}
}
