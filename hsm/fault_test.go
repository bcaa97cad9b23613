package hsm

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"runtime"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/kms/pkg/service"

	"github.com/hwkms/hwkms/plugin"
	"github.com/hwkms/hwkms/plugin/kek"
)

// recoveryLimit is the reliability target: first success within this long after a
// fault clears (docs/reliability.md).
const recoveryLimit = 2 * time.Second

// rig is a plugin.Service on an hsm KEK whose module is wrapped by chaos.
type rig struct {
	c    *chaos
	cfg  Config
	k    *KEK
	svc  *plugin.Service
	seed []byte
	ct   []byte // Encrypt(seed), made before any fault
}

func newRig(t *testing.T, sessions int) *rig {
	t.Helper()
	fx, toks := newTokens(t, 1)
	c := newChaos()
	seam(t, func(p p11) p11 { c.p11 = p; return c })
	cfg := cfgFor(fx, toks[0], "kek")
	cfg.Sessions = sessions
	createKey(t, cfg)
	k := openKEK(t, cfg)
	ring, err := plugin.NewKeyring(k)
	if err != nil {
		t.Fatal(err)
	}
	svc := plugin.NewService(ring, plugin.Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	r := &rig{c: c, cfg: cfg, k: k, svc: svc, seed: bytes.Repeat([]byte{0x5a}, 32)}
	resp, err := svc.Encrypt(context.Background(), "setup", r.seed)
	if err != nil {
		t.Fatalf("Encrypt before the fault: %v", err)
	}
	r.ct = resp.Ciphertext
	t.Cleanup(c.clear) // release hangs before the KEK's Close waits for them
	return r
}

// call runs one Decrypt of the known ciphertext and one Encrypt+Decrypt round trip,
// each with its own deadline, and returns the first failure's code (codes.OK if all
// succeeded). A success with wrong plaintext fails the test at once.
func (r *rig) call(t *testing.T, deadline time.Duration) codes.Code {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	defer cancel()
	pt, err := r.svc.Decrypt(ctx, "t", &service.DecryptRequest{Ciphertext: r.ct, KeyID: r.k.ID()})
	if err != nil {
		return status.Code(err)
	}
	if !bytes.Equal(pt, r.seed) {
		t.Fatalf("Decrypt answered wrong data: %x", pt)
	}
	ctx2, cancel2 := context.WithTimeout(context.Background(), deadline)
	defer cancel2()
	resp, err := r.svc.Encrypt(ctx2, "t", r.seed)
	if err != nil {
		return status.Code(err)
	}
	ctx3, cancel3 := context.WithTimeout(context.Background(), deadline)
	defer cancel3()
	pt, err = r.svc.Decrypt(ctx3, "t", &service.DecryptRequest{Ciphertext: resp.Ciphertext, KeyID: resp.KeyID})
	if err != nil {
		return status.Code(err)
	}
	if !bytes.Equal(pt, r.seed) {
		t.Fatalf("round trip answered wrong data: %x", pt)
	}
	return codes.OK
}

// during calls the service repeatedly for d while the fault is on: every call must
// fail with one of want, and return by its deadline (plus scheduling slack).
func (r *rig) during(t *testing.T, d, deadline time.Duration, want ...codes.Code) map[codes.Code]int {
	t.Helper()
	seen := map[codes.Code]int{}
	for end := time.Now().Add(d); time.Now().Before(end); {
		start := time.Now()
		code := r.call(t, deadline)
		took := time.Since(start)
		seen[code]++
		if !containsCode(want, code) {
			t.Fatalf("during the fault a call answered %v, want one of %v", code, want)
		}
		// three RPCs, each bounded by deadline
		if took > 3*deadline+time.Second {
			t.Fatalf("a call during the fault took %v, deadline %v per RPC", took, deadline)
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Logf("during the fault: %v", seen)
	return seen
}

// recovery clears the fault and returns how long until the first fully successful call.
func (r *rig) recovery(t *testing.T) time.Duration {
	t.Helper()
	r.c.clear()
	return r.untilOK(t)
}

func (r *rig) untilOK(t *testing.T) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		code := r.call(t, time.Second)
		if code == codes.OK {
			d := time.Since(start)
			t.Logf("recovered %v after the fault cleared", d.Round(time.Millisecond))
			if d > recoveryLimit {
				t.Errorf("recovery took %v, want < %v", d, recoveryLimit)
			}
			return d
		}
		if !containsCode([]codes.Code{codes.Unavailable, codes.DeadlineExceeded}, code) {
			t.Fatalf("after the fault cleared a call answered %v", code)
		}
		if time.Since(start) > 4*recoveryLimit {
			t.Fatalf("no recovery %v after the fault cleared (last %v)", time.Since(start), code)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func containsCode(cs []codes.Code, c codes.Code) bool {
	for _, x := range cs {
		if x == c {
			return true
		}
	}
	return false
}

// TestFaultCKR covers every CK_RV fault: the client sees Unavailable while it lasts,
// never wrong data, and the plugin recovers by itself within recoveryLimit.
func TestFaultCKR(t *testing.T) {
	down := func(rv uint) func(*chaos) { return func(c *chaos) { c.down = rv } }
	isDown := map[string]bool{"CKR_DEVICE_REMOVED": true, "CKR_TOKEN_NOT_PRESENT": true, "CKR_CRYPTOKI_NOT_INITIALIZED": true, "CKR_DEVICE_ERROR": true}
	onOps := func(rv uint, fns ...string) func(*chaos) {
		return func(c *chaos) {
			for _, fn := range fns {
				c.fail[fn] = rv
			}
		}
	}
	for _, tc := range []struct {
		name string
		arm  func(*chaos)
	}{
		{"CKR_DEVICE_REMOVED", down(pkcs11.CKR_DEVICE_REMOVED)},
		{"CKR_TOKEN_NOT_PRESENT", down(pkcs11.CKR_TOKEN_NOT_PRESENT)},
		{"CKR_CRYPTOKI_NOT_INITIALIZED", down(pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED)},
		{"CKR_DEVICE_ERROR", down(pkcs11.CKR_DEVICE_ERROR)},
		{"CKR_SESSION_HANDLE_INVALID", onOps(pkcs11.CKR_SESSION_HANDLE_INVALID, "Encrypt", "Decrypt")},
		{"CKR_SESSION_CLOSED", onOps(pkcs11.CKR_SESSION_CLOSED, "EncryptInit", "DecryptInit")},
		{"CKR_OBJECT_HANDLE_INVALID", onOps(pkcs11.CKR_OBJECT_HANDLE_INVALID, "EncryptInit", "DecryptInit")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t, 2)
			inits := r.c.count("Initialize")
			okBefore, failedBefore := r.k.Reinits()
			r.c.set(tc.arm)
			r.during(t, 1500*time.Millisecond, 500*time.Millisecond, codes.Unavailable)
			n := r.c.count("Initialize") - inits
			if n > 12 {
				t.Errorf("%d re-initialisations in 1.5 s of fault: backoff does not hold", n)
			}
			r.recovery(t)
			ok, failed := r.k.Reinits()
			ok, failed = ok-okBefore, failed-failedBefore
			if ok+failed != uint64(r.c.count("Initialize")-inits) {
				t.Errorf("Reinits() counted %d ok + %d failed, but C_Initialize ran %d times", ok, failed, r.c.count("Initialize")-inits)
			}
			if isDown[tc.name] && (ok == 0 || failed == 0) {
				t.Errorf("Reinits() = %d ok, %d failed after a device that was down and came back; want both > 0", ok, failed)
			}
		})
	}
}

// TestFaultTransientDeviceError: a device-class error that clears by itself is
// recovered inside the same request (re-init, re-login, retry once): the client never
// sees it.
func TestFaultTransientDeviceError(t *testing.T) {
	r := newRig(t, 2)
	for _, rv := range []uint{pkcs11.CKR_DEVICE_REMOVED, pkcs11.CKR_TOKEN_NOT_PRESENT, pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED, pkcs11.CKR_DEVICE_ERROR} {
		r.c.set(func(c *chaos) { c.once["DecryptInit"] = []error{pkcs11.Error(rv)} })
		if code := r.call(t, 2*time.Second); code != codes.OK {
			t.Errorf("%v once: call answered %v, want OK after an in-request recovery", pkcs11.Error(rv), code)
		}
	}
}

// TestFaultPINIncorrectOnRelogin: the device goes away and, at the re-login, the token
// refuses the PIN. hwkms stops: Unavailable, exactly one C_Login, none while requests
// keep coming, none either for a config reload that reads the same PIN (a new Open of
// the token); a new process (restart) tries once more and recovers.
func TestFaultPINIncorrectOnRelogin(t *testing.T) {
	r := newRig(t, 2)
	logins := r.c.count("Login")
	r.c.set(func(c *chaos) {
		c.once["DecryptInit"] = []error{pkcs11.Error(pkcs11.CKR_DEVICE_REMOVED)}
		c.once["Login"] = []error{pkcs11.Error(pkcs11.CKR_PIN_INCORRECT)}
	})
	r.during(t, time.Second, 500*time.Millisecond, codes.Unavailable)
	if n := r.c.count("Login") - logins; n != 1 {
		t.Fatalf("C_Login called %d times after CKR_PIN_INCORRECT, want exactly 1 (never retried)", n)
	}
	if h := r.svc.ProbeNow(context.Background()); h.OK {
		t.Error("health probe OK while the PIN is refused")
	}
	// Config reload with the same PIN: refused without a C_Login.
	var pe *PINError
	if _, err := Open(context.Background(), r.cfg); !errors.As(err, &pe) || !pe.Repeated {
		t.Fatalf("Open on reload with the refused PIN = %v, want a Repeated *PINError", err)
	}
	if n := r.c.count("Login") - logins; n != 1 {
		t.Fatalf("C_Login called %d times after a reload with the refused PIN, want still 1", n)
	}
	// A restart forgets refused PINs (a new process); its Open makes one new attempt.
	refusedPINs.Lock()
	clear(refusedPINs.m)
	refusedPINs.Unlock()
	start := time.Now()
	k2, err := Open(context.Background(), r.cfg)
	if err != nil {
		t.Fatalf("Open on reload: %v", err)
	}
	defer k2.Close()
	if n := r.c.count("Login") - logins; n != 2 {
		t.Errorf("C_Login called %d times in all, want 2 (the refused one and the restart's)", n)
	}
	r.untilOK(t) // the old KEK works again too: the token is logged in
	t.Logf("recovered %v after the reload started", time.Since(start).Round(time.Millisecond))
}

// TestFaultSlowCalls: a device slower than the request deadline gives DeadlineExceeded
// at the deadline (not later); when it is fast again, requests succeed at once.
func TestFaultSlowCalls(t *testing.T) {
	r := newRig(t, 4)
	r.c.set(func(c *chaos) { c.delay["Decrypt"], c.delay["Encrypt"] = 300*time.Millisecond, 300*time.Millisecond })
	r.during(t, 1500*time.Millisecond, 100*time.Millisecond, codes.DeadlineExceeded, codes.Unavailable)
	r.recovery(t)
}

// TestFaultHang: a call that never returns. The request returns DeadlineExceeded at
// its deadline; the stuck call keeps its session (other sessions serve); when the
// device answers again, everything recovers and no goroutine is left behind.
func TestFaultHang(t *testing.T) {
	r := newRig(t, 2)
	before := runtime.NumGoroutine()
	hung := make(chan string, 8)
	r.c.set(func(c *chaos) {
		c.hang["Decrypt"] = make(chan struct{})
		c.hungIn = hung
	})
	seen := r.during(t, time.Second, 200*time.Millisecond, codes.DeadlineExceeded)
	if seen[codes.DeadlineExceeded] == 0 {
		t.Fatal("no request saw DeadlineExceeded")
	}
	if len(hung) == 0 {
		t.Fatal("no call hung")
	}
	// Both sessions are stuck; at most Sessions calls hang at once.
	if n := runtime.NumGoroutine() - before; n > 2+2 {
		t.Errorf("%d more goroutines while hung, want at most Sessions (2) plus slack", n)
	}
	r.recovery(t)
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before+1 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > before+1 {
		t.Errorf("%d goroutines after recovery, %d before the hang", n, before)
	}
}

// TestFaultSharedModule: two KEKs on two tokens of one module see CKR_DEVICE_REMOVED
// together; one re-initialisation serves both.
func TestFaultSharedModule(t *testing.T) {
	fx, toks := newTokens(t, 2)
	c := newChaos()
	seam(t, func(p p11) p11 { c.p11 = p; return c })
	var keks []*KEK
	for _, tok := range toks {
		cfg := cfgFor(fx, tok, "kek")
		createKey(t, cfg)
		keks = append(keks, openKEK(t, cfg))
	}
	bodies := make([][]byte, len(keks))
	for i, k := range keks {
		bodies[i] = roundTrip(t, k, []byte("seed"), aad)
	}
	c.set(func(c *chaos) { c.down = pkcs11.CKR_DEVICE_REMOVED })
	for _, k := range keks {
		if _, err := k.Unwrap(context.Background(), bodies[0], aad); err == nil {
			t.Fatal("Unwrap succeeded on a removed device")
		}
	}
	c.clear()
	time.Sleep(maxBackoff) // let any backoff from the fault expire; this test counts calls, not time
	inits, logins := c.count("Initialize"), c.count("Login")
	done := make(chan error, len(keks))
	for i, k := range keks {
		go func() {
			got, err := k.Unwrap(context.Background(), bodies[i], aad)
			if err == nil && string(got) != "seed" {
				t.Errorf("wrong data %q", got)
			}
			done <- err
		}()
	}
	for range keks {
		if err := <-done; err != nil {
			t.Fatalf("Unwrap after the device is back: %v", err)
		}
	}
	if n := c.count("Initialize") - inits; n != 1 {
		t.Errorf("%d re-initialisations for two KEKs on one module, want 1", n)
	}
	if n := c.count("Login") - logins; n != 2 {
		t.Errorf("%d logins for two tokens, want 2", n)
	}
}

// TestFaultHungCallThenDeviceError: one call hangs (a half-open network HSM
// connection) and another gets a device-class error. The re-initialisation cannot run
// under the hung call; it gives up after reinitWait instead of stalling the module,
// operations on the free session go on, and once the hung call returns a later
// re-initialisation succeeds.
func TestFaultHungCallThenDeviceError(t *testing.T) {
	old := reinitWait
	reinitWait = 300 * time.Millisecond
	t.Cleanup(func() { reinitWait = old })
	r := newRig(t, 2)
	release := make(chan struct{})
	hung := make(chan string, 1)
	r.c.set(func(c *chaos) {
		c.hang["Decrypt"] = release
		c.hungIn = hung
	})
	go func() { // one Decrypt hangs, holding one of the two sessions
		ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
		defer cancel()
		r.svc.Decrypt(ctx, "hung", &service.DecryptRequest{Ciphertext: r.ct, KeyID: r.k.ID()})
	}()
	select {
	case <-hung:
	case <-time.After(5 * time.Second):
		t.Fatal("the Decrypt did not hang")
	}
	r.c.set(func(c *chaos) {
		delete(c.hang, "Decrypt")
		c.once["Encrypt"] = []error{pkcs11.Error(pkcs11.CKR_DEVICE_ERROR)}
	})
	okBefore, failedBefore := r.k.Reinits()
	start := time.Now()
	var encOK time.Duration
	for time.Since(start) < 5*time.Second {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := r.svc.Encrypt(ctx, "t", r.seed)
		cancel()
		if err == nil && encOK == 0 {
			encOK = time.Since(start)
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if encOK == 0 {
		t.Fatal("no Encrypt succeeded within 5 s while one call hung: the module stalled behind it")
	}
	t.Logf("Encrypt works again %v after the device error, with the other call still hung", encOK.Round(time.Millisecond))
	if _, failed := r.k.Reinits(); failed == failedBefore {
		t.Error("no re-initialisation attempt was counted as failed while the call hung")
	}
	close(release)                                // the hung call returns; the next device error is recovered for real
	time.Sleep(maxBackoff + 100*time.Millisecond) // past the backoff of the failed attempt
	r.c.set(func(c *chaos) { c.once["Decrypt"] = []error{pkcs11.Error(pkcs11.CKR_DEVICE_ERROR)} })
	r.untilOK(t)
	if ok, _ := r.k.Reinits(); ok == okBefore {
		t.Error("no successful re-initialisation after the hung call returned")
	}
}

// TestFaultGeneralErrorAtDecrypt: CKR_GENERAL_ERROR from C_Decrypt is what SoftHSM2
// answers for a bad GCM tag, but also how a token reports an internal failure. A
// persistent one on valid data is a device fault (Unavailable), not bad data; a
// one-off is retried; a tampered body is still InvalidArgument.
func TestFaultGeneralErrorAtDecrypt(t *testing.T) {
	r := newRig(t, 2)
	ctx := context.Background()
	r.c.set(func(c *chaos) { c.failAfter["Decrypt"] = pkcs11.CKR_GENERAL_ERROR })
	_, err := r.svc.Decrypt(ctx, "t", &service.DecryptRequest{Ciphertext: r.ct, KeyID: r.k.ID()})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("valid data, token answering CKR_GENERAL_ERROR to every C_Decrypt: %v, want Unavailable", err)
	}
	if h := r.svc.ProbeNow(ctx); h.OK || !errors.Is(h.Err, kek.ErrUnavailable) {
		t.Errorf("health probe with the faulty token: %+v, want a failure wrapping ErrUnavailable", h)
	}
	r.c.set(func(c *chaos) {
		delete(c.failAfter, "Decrypt")
		c.onceAfter["Decrypt"] = []uint{pkcs11.CKR_GENERAL_ERROR}
	})
	if pt, err := r.svc.Decrypt(ctx, "t", &service.DecryptRequest{Ciphertext: r.ct, KeyID: r.k.ID()}); err != nil || !bytes.Equal(pt, r.seed) {
		t.Fatalf("valid data, one CKR_GENERAL_ERROR: %v, want the plaintext after the retry", err)
	}
	bad := bytes.Clone(r.ct)
	bad[len(bad)-1] ^= 1 // SoftHSM2 itself answers CKR_GENERAL_ERROR for it
	if _, err := r.svc.Decrypt(ctx, "t", &service.DecryptRequest{Ciphertext: bad, KeyID: r.k.ID()}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("tampered body: %v, want InvalidArgument", err)
	}
}
