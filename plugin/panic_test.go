package plugin

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/plugin/kek/kektest"
	"google.golang.org/grpc/codes"
	"k8s.io/kms/pkg/service"
)

// panicking wraps a KEK and panics in Unwrap while armed, as a backend could while
// parsing a hostile device response. It is a wrapper, not a fake: the crypto is the
// wrapped KEK's.
type panicking struct {
	kek.KEK
	armed atomic.Bool
	value any
}

func (p *panicking) Unwrap(ctx context.Context, body, aad []byte) ([]byte, error) {
	if p.armed.Load() {
		panic(p.value)
	}
	return p.KEK.Unwrap(ctx, body, aad)
}

type panicCount struct{ n atomic.Int64 }

func (*panicCount) ObserveRequest(string, codes.Code, time.Duration)        {}
func (*panicCount) ObserveProbe(Health)                                     {}
func (*panicCount) ObserveDevice(kek.Backend, string, time.Duration, error) {}
func (c *panicCount) ObservePanic(string)                                   { c.n.Add(1) }

func TestPanicInKEKIsInternalAndServingGoesOn(t *testing.T) {
	for _, tc := range []struct {
		name  string
		value any
		want  string // in the log
	}{
		{name: "runtime error", value: nil, want: "index out of range"},
		{name: "arbitrary value", value: []byte("SECRET-SEED-BYTES"), want: "panic value of type []uint8"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := &panicking{KEK: kektest.NewFake("A"), value: tc.value}
			if tc.value == nil {
				var idx []int
				p.value = func() (v any) { // a real runtime.Error
					defer func() { v = recover() }()
					_ = idx[len(idx)+3]
					return nil
				}()
			}
			ring, err := NewKeyring(p)
			if err != nil {
				t.Fatal(err)
			}
			var logs bytes.Buffer
			obs := &panicCount{}
			svc := NewService(ring, Options{HealthInterval: time.Hour, Observer: obs, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
			t.Cleanup(func() { svc.Keyring().Close() })
			ctx := context.Background()

			enc, err := svc.Encrypt(ctx, "uid", seed(32))
			if err != nil {
				t.Fatalf("Encrypt: %v", err)
			}
			p.armed.Store(true)
			pt, err := svc.Decrypt(ctx, "uid", &service.DecryptRequest{Ciphertext: enc.Ciphertext, KeyID: enc.KeyID})
			wantCode(t, err, codes.Internal)
			if pt != nil {
				t.Fatalf("a panicking Decrypt returned %d bytes", len(pt))
			}
			if got := svc.Panics(); got != 1 {
				t.Fatalf("Panics() = %d, want 1", got)
			}
			if got := obs.n.Load(); got != 1 {
				t.Fatalf("ObservePanic called %d times, want 1", got)
			}
			// The probe recovers too and reports a failed probe, not a dead process.
			if h := svc.ProbeNow(ctx); h.OK || !strings.Contains(h.Reason, "internal error") {
				t.Fatalf("probe after panic: ok=%v reason %q", h.OK, h.Reason)
			}
			// The keyring's in-flight count was released during the unwinding: a swap's
			// Close would otherwise wait forever.
			p.armed.Store(false)
			got, err := svc.Decrypt(ctx, "uid", &service.DecryptRequest{Ciphertext: enc.Ciphertext, KeyID: enc.KeyID})
			if err != nil || !bytes.Equal(got, seed(32)) {
				t.Fatalf("Decrypt after the panic: %v", err)
			}
			done := make(chan struct{})
			go func() { svc.Keyring().Close(); close(done) }()
			select {
			case <-done:
			case <-time.After(5 * time.Second):
				t.Fatal("Keyring.Close hangs: the panicking request never released it")
			}
			out := logs.String()
			if !strings.Contains(out, tc.want) || !strings.Contains(out, "recovered a panic") {
				t.Fatalf("log lacks %q:\n%s", tc.want, out)
			}
			if strings.Contains(out, "SECRET-SEED-BYTES") {
				t.Fatal("the panic value's bytes reached the log")
			}
		})
	}
}
