package hsm

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"github.com/hwkms/hwkms/plugin/kek"
)

// FuzzMechanismUnwrap feeds hostile bodies of every version to an aes-cbc-hmac KEK
// (which holds an AES and an HMAC key, so 0x01, 0x02 and 0x03 bodies all reach the
// token) on a real SoftHSM2: it never panics, every failure wraps
// kek.ErrInvalidCiphertext, and only the authentic bodies unwrap.
func FuzzMechanismUnwrap(f *testing.F) {
	fx, toks := newTokens(f, 1)
	cfg := cfgFor(fx, toks[0], "kek")
	cfg.Mechanism = MechanismAESCBCHMAC
	createKey(f, cfg)
	k := openKEK(f, cfg)
	want := bytes.Repeat([]byte{7}, 32)
	valid, err := k.Wrap(context.Background(), want, mechAAD)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(valid)
	f.Add(valid[:cbcMinBody])
	f.Add(append([]byte{0x01}, valid[1:]...))
	f.Add(append([]byte{0x02, 0, 0, 0x10, 0x87, 12}, valid[1:]...))
	f.Add(append([]byte{0x02, 0, 0, 0x10, 0x87, 16}, valid[1:]...))
	f.Add(append([]byte{0x04, 0x01, 0x01, 0x00}, make([]byte, 256)...))
	f.Add([]byte{0x03})
	f.Add(make([]byte, cbcMaxBody+1))
	f.Fuzz(func(t *testing.T, body []byte) {
		pt, err := k.Unwrap(context.Background(), body, mechAAD)
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
