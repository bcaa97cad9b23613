package plugin

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/plugin/kek/kektest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/kms/pkg/service"
)

func newTestService(t *testing.T, keys ...*kektest.Fake) *Service {
	t.Helper()
	var rest []kek.KEK
	for _, k := range keys[1:] {
		rest = append(rest, k)
	}
	ring, err := NewKeyring(keys[0], rest...)
	if err != nil {
		t.Fatalf("NewKeyring: %v", err)
	}
	svc := NewService(ring, Options{HealthInterval: time.Hour})
	t.Cleanup(func() { svc.Keyring().Close() })
	return svc
}

func seed(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + 1)
	}
	return b
}

func wantCode(t *testing.T, err error, want codes.Code) {
	t.Helper()
	if got := status.Code(err); got != want {
		t.Fatalf("got code %v (err %v), want %v", got, err, want)
	}
}

func TestEncryptDecryptSizes(t *testing.T) {
	svc := newTestService(t, kektest.NewFake("A"))
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		n    int
		code codes.Code
	}{
		{"empty", 0, codes.InvalidArgument},
		{"one byte", 1, codes.OK},
		{"apiserver seed", 32, codes.OK},
		{"max", kek.MaxPlaintext, codes.OK},
		{"max+1", kek.MaxPlaintext + 1, codes.InvalidArgument},
		{"huge", 1 << 20, codes.InvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, err := svc.Encrypt(ctx, "uid", seed(tc.n))
			wantCode(t, err, tc.code)
			if tc.code != codes.OK {
				return
			}
			if resp.KeyID != "A" || len(resp.Ciphertext) > kek.MaxCiphertext || resp.Ciphertext[0] != FrameV1 || kek.Backend(resp.Ciphertext[1]) != kek.BackendTest {
				t.Fatalf("bad response: key %q, %d bytes, header % x", resp.KeyID, len(resp.Ciphertext), resp.Ciphertext[:2])
			}
			if len(resp.Annotations) != 0 {
				t.Fatalf("unexpected annotations %v", resp.Annotations)
			}
			pt, err := svc.Decrypt(ctx, "uid", &service.DecryptRequest{Ciphertext: resp.Ciphertext, KeyID: resp.KeyID})
			if err != nil {
				t.Fatalf("Decrypt: %v", err)
			}
			if !bytes.Equal(pt, seed(tc.n)) {
				t.Fatal("round trip returned different plaintext")
			}
		})
	}
}

func TestDecryptBadInput(t *testing.T) {
	a, b := kektest.NewFake("A"), kektest.NewFake("B")
	svc := newTestService(t, a, b)
	ctx := context.Background()
	resp, err := svc.Encrypt(ctx, "", seed(32))
	if err != nil {
		t.Fatal(err)
	}
	good := resp.Ciphertext
	mutate := func(f func([]byte) []byte) []byte { return f(bytes.Clone(good)) }
	for _, tc := range []struct {
		name  string
		req   *service.DecryptRequest
		code  codes.Code
		inMsg string
	}{
		{"nil request", nil, codes.InvalidArgument, ""},
		{"empty key_id", &service.DecryptRequest{Ciphertext: good}, codes.InvalidArgument, "empty"},
		{"oversize key_id", &service.DecryptRequest{Ciphertext: good, KeyID: strings.Repeat("k", kek.MaxKeyIDLen+1)}, codes.InvalidArgument, ""},
		{"invalid utf8 key_id", &service.DecryptRequest{Ciphertext: good, KeyID: "\xff"}, codes.InvalidArgument, "UTF-8"},
		{"unknown key_id", &service.DecryptRequest{Ciphertext: good, KeyID: "gone-key"}, codes.NotFound, `"gone-key"`},
		{"empty ciphertext", &service.DecryptRequest{KeyID: "A"}, codes.InvalidArgument, ""},
		{"oversize ciphertext", &service.DecryptRequest{Ciphertext: make([]byte, kek.MaxCiphertext+1), KeyID: "A"}, codes.InvalidArgument, ""},
		{"header only", &service.DecryptRequest{Ciphertext: good[:2], KeyID: "A"}, codes.InvalidArgument, ""},
		{"truncated", &service.DecryptRequest{Ciphertext: good[:len(good)-1], KeyID: "A"}, codes.InvalidArgument, ""},
		{"flipped last byte", &service.DecryptRequest{Ciphertext: mutate(func(c []byte) []byte { c[len(c)-1] ^= 1; return c }), KeyID: "A"}, codes.InvalidArgument, ""},
		{"flipped body byte", &service.DecryptRequest{Ciphertext: mutate(func(c []byte) []byte { c[5] ^= 0x80; return c }), KeyID: "A"}, codes.InvalidArgument, ""},
		{"unknown frame version", &service.DecryptRequest{Ciphertext: mutate(func(c []byte) []byte { c[0] = 0x02; return c }), KeyID: "A"}, codes.InvalidArgument, ""},
		{"wrong backend byte", &service.DecryptRequest{Ciphertext: mutate(func(c []byte) []byte { c[1] = byte(kek.BackendPKCS11); return c }), KeyID: "A"}, codes.InvalidArgument, ""},
		{"appended byte", &service.DecryptRequest{Ciphertext: append(bytes.Clone(good), 0), KeyID: "A"}, codes.InvalidArgument, ""},
		{"other key's id", &service.DecryptRequest{Ciphertext: good, KeyID: "B"}, codes.InvalidArgument, `"B"`},
		{"annotations", &service.DecryptRequest{Ciphertext: good, KeyID: "A", Annotations: map[string][]byte{"x.example.com": []byte("1")}}, codes.InvalidArgument, "annotations"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pt, err := svc.Decrypt(ctx, "uid", tc.req)
			wantCode(t, err, tc.code)
			if pt != nil {
				t.Fatal("plaintext returned with an error")
			}
			if !strings.Contains(status.Convert(err).Message(), tc.inMsg) {
				t.Fatalf("message %q does not contain %q", status.Convert(err).Message(), tc.inMsg)
			}
		})
	}
	// Every key still works after all of that.
	pt, err := svc.Decrypt(ctx, "", &service.DecryptRequest{Ciphertext: good, KeyID: "A"})
	if err != nil || !bytes.Equal(pt, seed(32)) {
		t.Fatalf("good ciphertext no longer decrypts: %v", err)
	}
}

func TestDeviceErrorCodes(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		code codes.Code
	}{
		{"unavailable", fmt.Errorf("dev: %w", kek.ErrUnavailable), codes.Unavailable},
		{"closed", fmt.Errorf("dev: %w", kek.ErrClosed), codes.Unavailable},
		{"deadline", fmt.Errorf("dev: %w", context.DeadlineExceeded), codes.DeadlineExceeded},
		{"untyped", errors.New("CKR_FUNCTION_FAILED secret-looking-detail"), codes.Internal},
		{"invalid input", fmt.Errorf("dev: %w", kek.ErrInvalidInput), codes.InvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k := kektest.NewFake("A")
			svc := newTestService(t, k)
			resp, err := svc.Encrypt(context.Background(), "", seed(32))
			if err != nil {
				t.Fatal(err)
			}
			k.SetFail(tc.err)
			_, err = svc.Encrypt(context.Background(), "", seed(32))
			wantCode(t, err, tc.code)
			_, err = svc.Decrypt(context.Background(), "", &service.DecryptRequest{Ciphertext: resp.Ciphertext, KeyID: "A"})
			wantCode(t, err, tc.code)
			if strings.Contains(err.Error(), "secret-looking-detail") {
				t.Fatalf("device error text leaked to the client: %v", err)
			}
		})
	}
}

func TestDecryptDeadline(t *testing.T) {
	k := kektest.NewFake("A")
	svc := newTestService(t, k)
	resp, err := svc.Encrypt(context.Background(), "", seed(32))
	if err != nil {
		t.Fatal(err)
	}
	k.BlockUnwrap(make(chan struct{}))
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err = svc.Decrypt(ctx, "", &service.DecryptRequest{Ciphertext: resp.Ciphertext, KeyID: "A"})
	wantCode(t, err, codes.DeadlineExceeded)
}

func TestKeyringRotationKeepsOldKeys(t *testing.T) {
	a, b := kektest.NewFake("A"), kektest.NewFake("B")
	svc := newTestService(t, a)
	ctx := context.Background()
	old, err := svc.Encrypt(ctx, "", seed(32))
	if err != nil {
		t.Fatal(err)
	}
	ring, err := NewKeyring(b, a)
	if err != nil {
		t.Fatal(err)
	}
	prev := svc.SwapKeyring(ring, Probe(ctx, b))
	if prev.Primary().ID() != "A" {
		t.Fatalf("previous primary %q", prev.Primary().ID())
	}
	st, _ := svc.Status(ctx)
	if st.KeyID != "B" || st.Healthz != "ok" {
		t.Fatalf("status after swap: %+v", st)
	}
	nw, err := svc.Encrypt(ctx, "", seed(32))
	if err != nil || nw.KeyID != "B" {
		t.Fatalf("encrypt after swap: %v %+v", err, nw)
	}
	for _, c := range []*service.EncryptResponse{old, nw} {
		if _, err := svc.Decrypt(ctx, "", &service.DecryptRequest{Ciphertext: c.Ciphertext, KeyID: c.KeyID}); err != nil {
			t.Fatalf("decrypt %s after swap: %v", c.KeyID, err)
		}
	}
}

func TestNewKeyringValidation(t *testing.T) {
	a := kektest.NewFake("A")
	for _, tc := range []struct {
		name string
		keys []kek.KEK
		want string
	}{
		{"duplicate", []kek.KEK{a, kektest.NewFake("A")}, "duplicate key_id"},
		{"empty id", []kek.KEK{kektest.NewFake("")}, "empty"},
		{"long id", []kek.KEK{kektest.NewFake(strings.Repeat("x", kek.MaxKeyIDLen+1))}, "more than"},
		{"nil primary", []kek.KEK{nil}, "primary"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := NewKeyring(tc.keys[0], tc.keys[1:]...)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err %v, want it to contain %q", err, tc.want)
			}
		})
	}
}

func TestStatusUsesCachedProbe(t *testing.T) {
	k := kektest.NewFake("A")
	svc := newTestService(t, k)
	ctx := context.Background()
	st, err := svc.Status(ctx)
	if err != nil || st.Version != "v2" || st.KeyID != "A" || st.Healthz == "ok" {
		t.Fatalf("before any probe: %+v %v", st, err)
	}
	if h := svc.ProbeNow(ctx); !h.OK {
		t.Fatalf("probe: %+v", h)
	}
	calls := k.Calls()
	for range 100 {
		st, _ = svc.Status(ctx)
		if st.Healthz != "ok" {
			t.Fatalf("status %+v", st)
		}
	}
	if got := k.Calls(); got != calls {
		t.Fatalf("Status touched the device: %d calls", got-calls)
	}
	k.SetFail(fmt.Errorf("dev: %w", kek.ErrUnavailable))
	if st, _ = svc.Status(ctx); st.Healthz != "ok" {
		t.Fatal("Status changed without a probe")
	}
	svc.ProbeNow(ctx)
	st, _ = svc.Status(ctx)
	if st.Healthz == "ok" || !strings.Contains(st.Healthz, "device unavailable") || st.KeyID != "A" {
		t.Fatalf("after failing probe: %+v", st)
	}
	k.SetFail(nil)
	svc.ProbeNow(ctx)
	if st, _ = svc.Status(ctx); st.Healthz != "ok" {
		t.Fatalf("after recovery: %+v", st)
	}
}

func TestStatusStaleProbe(t *testing.T) {
	k := kektest.NewFake("A")
	ring, _ := NewKeyring(k)
	svc := NewService(ring, Options{HealthInterval: 10 * time.Millisecond, ProbeTimeout: 10 * time.Millisecond})
	svc.ProbeNow(context.Background())
	time.Sleep(60 * time.Millisecond) // older than 3*interval+timeout, with no Run loop
	st, _ := svc.Status(context.Background())
	if !strings.Contains(st.Healthz, "stale") {
		t.Fatalf("want stale, got %+v", st)
	}
}

func TestRunRefreshesHealth(t *testing.T) {
	k := kektest.NewFake("A")
	ring, _ := NewKeyring(k)
	svc := NewService(ring, Options{HealthInterval: 5 * time.Millisecond})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { svc.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	deadline := time.Now().Add(5 * time.Second)
	for k.Calls() < 6 { // three probes, two device calls each
		if time.Now().After(deadline) {
			t.Fatalf("Run probed only %d times", k.Calls()/2)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestSwapDoesNotFailInFlight holds a Decrypt inside the old keyring's KEK while the
// keyring is swapped and closed: the request must complete, and Close must wait for it.
func TestSwapDoesNotFailInFlight(t *testing.T) {
	a := kektest.NewFake("A")
	svc := newTestService(t, a)
	ctx := context.Background()
	resp, err := svc.Encrypt(ctx, "", seed(32))
	if err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	a.BlockUnwrap(release)

	var wg sync.WaitGroup
	var decErr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		_, decErr = svc.Decrypt(ctx, "", &service.DecryptRequest{Ciphertext: resp.Ciphertext, KeyID: "A"})
	}()
	for a.Calls() < 2 { // Encrypt's Wrap, then the blocked Unwrap
		time.Sleep(time.Millisecond)
	}
	a2 := kektest.NewFake("A2")
	ring, _ := NewKeyring(a2)
	old := svc.SwapKeyring(ring, Probe(ctx, a2))
	closed := make(chan struct{})
	go func() { old.Close(); close(closed) }()
	select {
	case <-closed:
		t.Fatal("Close returned while a request was in flight")
	case <-time.After(50 * time.Millisecond):
	}
	close(release)
	wg.Wait()
	<-closed
	if decErr != nil {
		t.Fatalf("in-flight Decrypt failed across a swap: %v", decErr)
	}
	if !a.Closed() {
		t.Fatal("old kek.KEK not closed")
	}
	if _, err := svc.Encrypt(ctx, "", seed(32)); err != nil {
		t.Fatalf("encrypt on new keyring: %v", err)
	}
}

func TestFrameAADBindsEverything(t *testing.T) {
	base := frameAAD(kek.BackendPKCS11, "k1")
	for _, other := range [][]byte{frameAAD(kek.BackendTPM, "k1"), frameAAD(kek.BackendPKCS11, "k2"), frameAAD(kek.BackendPKCS11, "k1x")} {
		if bytes.Equal(base, other) {
			t.Fatal("AADs collide")
		}
	}
	if _, _, err := parseFrame(encodeFrame(kek.BackendTPM, []byte{1})); err != nil {
		t.Fatal(err)
	}
	for _, bad := range [][]byte{nil, {FrameV1}, {FrameV1, 1}, {0, 1, 2}, {0xff, 1, 2}} {
		if _, _, err := parseFrame(bad); !errors.Is(err, kek.ErrInvalidCiphertext) {
			t.Fatalf("parseFrame(% x) = %v", bad, err)
		}
	}
}

// TestProbeOfReplacedKeyringIgnored: a probe that was running on the old keyring when
// a reload swapped in a new one must not overwrite the new primary's result, or
// Status would report "not probed yet" until the next probe.
func TestProbeOfReplacedKeyringIgnored(t *testing.T) {
	a := kektest.NewFake("A")
	svc := newTestService(t, a)
	ctx := context.Background()
	release := make(chan struct{})
	a.BlockUnwrap(release)
	done := make(chan Health)
	go func() { done <- svc.ProbeNow(ctx) }()
	for a.Calls() < 2 { // the probe's Wrap, then its blocked Unwrap
		time.Sleep(time.Millisecond)
	}
	b := kektest.NewFake("B")
	ring, _ := NewKeyring(b)
	old := svc.SwapKeyring(ring, Probe(ctx, b))
	defer old.Close()
	close(release)
	if h := <-done; h.KeyID != "A" || !h.OK {
		t.Fatalf("the old keyring's probe: %+v", h)
	}
	if st, _ := svc.Status(ctx); st.KeyID != "B" || st.Healthz != "ok" {
		t.Fatalf("Status after a probe of the replaced keyring finished: %+v, want B ok", st)
	}
}

// TestStatusQuotesFailedReload: a failed reload shows in healthz only while the
// serving keys are unhealthy, bounded in length, and is cleared by a good reload.
func TestStatusQuotesFailedReload(t *testing.T) {
	a := kektest.NewFake("A")
	svc := newTestService(t, a)
	ctx := context.Background()
	svc.ProbeNow(ctx)
	svc.SetReloadError(errors.New("keys[0] (pkcs11): hsm: key not found"))
	if st, _ := svc.Status(ctx); st.Healthz != "ok" {
		t.Fatalf("healthy keys with a failed reload: %q, want ok", st.Healthz)
	}
	a.SetFail(fmt.Errorf("dev: %w", kek.ErrUnavailable))
	svc.ProbeNow(ctx)
	st, _ := svc.Status(ctx)
	if !strings.Contains(st.Healthz, "device unavailable") || !strings.Contains(st.Healthz, "reload also failed: keys[0] (pkcs11): hsm: key not found") {
		t.Fatalf("unhealthy keys and a failed reload: %q", st.Healthz)
	}
	svc.SetReloadError(errors.New(strings.Repeat("é", 400)))
	if st, _ := svc.Status(ctx); len(st.Healthz) > 400 || !utf8.ValidString(st.Healthz) {
		t.Fatalf("long reload error: %d bytes, valid UTF-8 %v", len(st.Healthz), utf8.ValidString(st.Healthz))
	}
	svc.SetReloadError(nil)
	if st, _ := svc.Status(ctx); strings.Contains(st.Healthz, "reload") {
		t.Fatalf("after a good reload: %q", st.Healthz)
	}
}

// TestLoggedUIDIsBounded: a client-chosen uid of a megabyte does not become a
// megabyte of log per failed request.
func TestLoggedUIDIsBounded(t *testing.T) {
	var logs bytes.Buffer
	ring, err := NewKeyring(kektest.NewFake("A"))
	if err != nil {
		t.Fatal(err)
	}
	svc := NewService(ring, Options{HealthInterval: time.Hour, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	t.Cleanup(func() { svc.Keyring().Close() })
	uid := strings.Repeat("é", 512<<10) // 1 MiB, multi-byte
	if _, err := svc.Decrypt(context.Background(), uid, &service.DecryptRequest{Ciphertext: []byte{1}, KeyID: "A"}); err == nil {
		t.Fatal("a one-byte ciphertext decrypted")
	}
	if logs.Len() == 0 || logs.Len() > 4096 || !utf8.Valid(logs.Bytes()) || !strings.Contains(logs.String(), "(1048576 bytes)") {
		t.Fatalf("log of a failed request with a 1 MiB uid: %d bytes, valid UTF-8 %v:\n%.300s", logs.Len(), utf8.Valid(logs.Bytes()), logs.String())
	}
}
