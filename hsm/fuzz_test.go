package hsm

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"github.com/hwkms/hwkms/plugin/kek"
)

// FuzzUnwrap feeds hostile bodies to Unwrap on a real SoftHSM key: it never panics,
// every failure wraps kek.ErrInvalidCiphertext (the token is healthy), and only the
// one authentic body it was seeded with unwraps.
func FuzzUnwrap(f *testing.F) {
	fx, toks := newTokens(f, 1)
	cfg := cfgFor(fx, toks[0], "kek")
	createKey(f, cfg)
	k := openKEK(f, cfg)
	want := bytes.Repeat([]byte{7}, 32)
	valid, err := k.Wrap(context.Background(), want, aad)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(valid)
	f.Add(valid[:minBody])
	f.Add(append([]byte{0x02}, valid[1:]...))
	flipped := bytes.Clone(valid)
	flipped[len(flipped)-1] ^= 1
	f.Add(flipped)
	f.Add([]byte{})
	f.Add(make([]byte, maxBody+1))
	f.Fuzz(func(t *testing.T, body []byte) {
		pt, err := k.Unwrap(context.Background(), body, aad)
		if err == nil {
			if !bytes.Equal(body, valid) || !bytes.Equal(pt, want) {
				t.Fatalf("Unwrap accepted a non-authentic body %x and returned %x", body, pt)
			}
			return
		}
		if !errors.Is(err, kek.ErrInvalidCiphertext) {
			t.Fatalf("Unwrap(%x) = %v, want ErrInvalidCiphertext", body, err)
		}
	})
}
