package plugin

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/plugin/kek/kektest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/kms/pkg/service"
)

// FuzzParseFrame: any bytes parse or fail with kek.ErrInvalidCiphertext, never panic, and
// an accepted frame re-encodes to the same bytes.
func FuzzParseFrame(f *testing.F) {
	f.Add([]byte{FrameV1, byte(kek.BackendPKCS11), 1, 2, 3})
	f.Add([]byte{FrameV1, byte(kek.BackendTPM)})
	f.Add([]byte{0x02, 0x01, 0x00})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, frame []byte) {
		b, body, err := parseFrame(frame)
		if err != nil {
			if !errors.Is(err, kek.ErrInvalidCiphertext) {
				t.Fatalf("parseFrame error %v does not wrap kek.ErrInvalidCiphertext", err)
			}
			return
		}
		if again := encodeFrame(b, body); !bytes.Equal(again, frame) {
			t.Fatalf("accepted frame %x re-encodes to %x", frame, again)
		}
	})
}

// FuzzDecrypt: Service.Decrypt on hostile (ciphertext, key_id) pairs never panics,
// answers only InvalidArgument or NotFound, and returns a plaintext only for the one
// authentic ciphertext it was seeded with.
func FuzzDecrypt(f *testing.F) {
	k := kektest.NewFake("fuzz-key")
	ring, err := NewKeyring(k)
	if err != nil {
		f.Fatal(err)
	}
	svc := NewService(ring, Options{HealthInterval: time.Hour, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	want := seed(32)
	resp, err := svc.Encrypt(context.Background(), "seed", want)
	if err != nil {
		f.Fatal(err)
	}
	valid := resp.Ciphertext
	f.Add(valid, "fuzz-key")
	f.Add(valid, "other-key")
	f.Add(valid[:len(valid)-1], "fuzz-key")
	f.Add(append([]byte{FrameV1, byte(kek.BackendPKCS11)}, valid[2:]...), "fuzz-key")
	f.Add([]byte{FrameV1}, "fuzz-key")
	f.Add([]byte{}, "")
	f.Add(bytes.Repeat([]byte{0xff}, kek.MaxCiphertext+1), "fuzz-key")
	f.Fuzz(func(t *testing.T, ct []byte, keyID string) {
		pt, err := svc.Decrypt(context.Background(), "fuzz", &service.DecryptRequest{Ciphertext: ct, KeyID: keyID})
		if err == nil {
			if !bytes.Equal(ct, valid) || keyID != "fuzz-key" || !bytes.Equal(pt, want) {
				t.Fatalf("Decrypt accepted a non-authentic input (ct %x, key_id %q) and returned %x", ct, keyID, pt)
			}
			return
		}
		if pt != nil {
			t.Fatalf("Decrypt returned plaintext with an error")
		}
		switch c := status.Code(err); c {
		case codes.InvalidArgument, codes.NotFound:
		default:
			t.Fatalf("Decrypt of garbage answered %v (%v), want InvalidArgument or NotFound", c, err)
		}
	})
}
