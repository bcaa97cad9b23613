package plugin

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/plugin/kek/kektest"
	"google.golang.org/grpc/codes"
)

// unwrapFault wraps a KEK and spoils its Unwrap: a token that mishandles the IV or
// the AAD, or a TPM whose PCRs already moved, produces a body that does not open.
type unwrapFault struct {
	kek.KEK
	flip bool  // return the right length but different bytes
	err  error // return this error
}

func (u unwrapFault) Unwrap(ctx context.Context, body, aad []byte) ([]byte, error) {
	if u.err != nil {
		return nil, u.err
	}
	pt, err := u.KEK.Unwrap(ctx, body, aad)
	if err == nil && u.flip {
		pt[0] ^= 1
	}
	return pt, err
}

func TestEncryptVerifiesTheWrap(t *testing.T) {
	for _, tc := range []struct {
		name string
		k    func() kek.KEK
		want codes.Code
	}{
		{name: "good", k: func() kek.KEK { return kektest.NewFake("A") }, want: codes.OK},
		{name: "unwraps to other bytes", k: func() kek.KEK { return unwrapFault{KEK: kektest.NewFake("A"), flip: true} }, want: codes.Unavailable},
		{name: "does not unwrap", k: func() kek.KEK {
			return unwrapFault{KEK: kektest.NewFake("A"), err: fmt.Errorf("policy: %w", kek.ErrInvalidCiphertext)}
		}, want: codes.Unavailable},
		{name: "deadline while verifying", k: func() kek.KEK {
			return unwrapFault{KEK: kektest.NewFake("A"), err: fmt.Errorf("dev: %w", context.DeadlineExceeded)}
		}, want: codes.DeadlineExceeded},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ring, err := NewKeyring(tc.k())
			if err != nil {
				t.Fatal(err)
			}
			svc := NewService(ring, Options{HealthInterval: time.Hour})
			t.Cleanup(func() { svc.Keyring().Close() })
			resp, err := svc.Encrypt(context.Background(), "uid", seed(32))
			if tc.want == codes.OK {
				if err != nil || resp == nil || len(resp.Ciphertext) == 0 {
					t.Fatalf("Encrypt: %v", err)
				}
				return
			}
			wantCode(t, err, tc.want)
			if resp != nil {
				t.Fatalf("an unverified wrap was answered: %d bytes", len(resp.Ciphertext))
			}
			if tc.want == codes.Unavailable && !errors.Is(verifyWrap(context.Background(), svc.Keyring().Primary(), []byte{1}, nil, seed(32)), errWrapUnverified) {
				t.Fatal("verifyWrap error does not wrap errWrapUnverified")
			}
		})
	}
}
