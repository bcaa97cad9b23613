package tpm

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/hwkms/hwkms/plugin/files"
	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/tpm/swtpm"
	"github.com/hwkms/hwkms/tpm/swtpm/swtpmtest"
)

func randBytes(t testing.TB, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestBodyShape: on both key forms the key_id is the one CreateKey reported and a
// body has the size doc.go gives (209 bytes plus the plaintext: 241 for a 32-byte
// seed), and round trips leave only the KEK's own handles in the TPM. The generic
// round trips are kektest's (TestConformance).
func TestBodyShape(t *testing.T) {
	for _, form := range keyForms {
		t.Run(form.name, func(t *testing.T) {
			sim := swtpmtest.New(t)
			cfg := form.cfg(t, sim)
			info := createKey(t, cfg)
			k := openKEK(t, sim, cfg)
			if k.ID() != info.KeyID {
				t.Errorf("ID() = %s, CreateKey said %s", k.ID(), info.KeyID)
			}
			ctx := testCtx(t)
			for _, size := range []int{1, 32, kek.MaxPlaintext} {
				pt := randBytes(t, size)
				body, err := k.Wrap(ctx, pt, nil)
				if err != nil {
					t.Fatalf("Wrap(%d bytes): %v", size, err)
				}
				if len(body) != 209+size || body[0] != bodyV1 {
					t.Errorf("body of %d bytes (version %#x) for %d plaintext bytes, want %d, version 1", len(body), body[0], size, 209+size)
				}
				if got, err := k.Unwrap(ctx, body, nil); err != nil || !bytes.Equal(got, pt) {
					t.Fatalf("Unwrap(%d bytes) = %x, %v", size, got, err)
				}
			}
			assertOnlyOwn(t, k)
		})
	}
}

func TestWrapEmptyAAD(t *testing.T) {
	sim := swtpmtest.New(t)
	cfg := keyForms[0].cfg(t, sim)
	createKey(t, cfg)
	k := openKEK(t, sim, cfg)
	ctx := testCtx(t)
	body, err := k.Wrap(ctx, []byte("seed"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := k.Unwrap(ctx, body, []byte{}); err != nil {
		t.Errorf("nil and empty aad must be the same: %v", err)
	}
	if _, err := k.Unwrap(ctx, body, []byte{0}); !errors.Is(err, kek.ErrInvalidCiphertext) {
		t.Errorf("aad {0}: %v, want ErrInvalidCiphertext", err)
	}
}

func TestKeyIDStable(t *testing.T) {
	for _, form := range keyForms {
		t.Run(form.name, func(t *testing.T) {
			sim := swtpmtest.New(t)
			cfg := form.cfg(t, sim)
			info := createKey(t, cfg)
			ctx := testCtx(t)

			k, err := Open(ctx, cfg)
			if err != nil {
				t.Fatal(err)
			}
			id := k.ID()
			body, err := k.Wrap(ctx, []byte("before restart"), []byte("aad"))
			if err != nil {
				t.Fatal(err)
			}
			if err := k.Close(); err != nil {
				t.Fatal(err)
			}
			if id != info.KeyID || len(id) != len("tpm:")+2*34 {
				t.Fatalf("ID %q, CreateKey said %q", id, info.KeyID)
			}

			// Restart of hwkms.
			k2, err := Open(ctx, cfg)
			if err != nil {
				t.Fatal(err)
			}
			if k2.ID() != id {
				t.Errorf("after Close/Open: ID %s, was %s", k2.ID(), id)
			}
			k2.Close()

			// Restart of the TPM.
			if err := sim.Restart(ctx); err != nil {
				t.Fatal(err)
			}
			p, err := Probe(ctx, cfg)
			if err != nil {
				t.Fatal(err)
			}
			if p.KeyID != id {
				t.Errorf("Probe after swtpm restart: %s, was %s", p.KeyID, id)
			}
			k3 := openKEK(t, sim, cfg)
			if k3.ID() != id {
				t.Errorf("after swtpm restart: ID %s, was %s", k3.ID(), id)
			}
			got, err := k3.Unwrap(ctx, body, []byte("aad"))
			if err != nil || string(got) != "before restart" {
				t.Errorf("Unwrap after swtpm restart: %q, %v", got, err)
			}
		})
	}
}

// TestTamper changes each byte of a body's public and private areas and swaps in
// another body's private area: when the body still parses the TPM refuses it, and
// every case fails with ErrInvalidCiphertext (never ErrUnavailable, which would make
// the plugin report the TPM down), the foreign private area with the TPM's response
// code; nothing leaks a handle. Truncation, appended bytes and wrong aad are
// kektest's (TestConformance).
func TestTamper(t *testing.T) {
	sim := swtpmtest.New(t)
	cfg := keyForms[0].cfg(t, sim)
	createKey(t, cfg)
	k := openKEK(t, sim, cfg)
	ctx := testCtx(t)
	aad := []byte("aad")
	body, err := k.Wrap(ctx, randBytes(t, 32), aad)
	if err != nil {
		t.Fatal(err)
	}
	other, err := k.Wrap(ctx, randBytes(t, 32), aad)
	if err != nil {
		t.Fatal(err)
	}
	pubLen := int(body[1])<<8 | int(body[2])
	privOff := 3 + pubLen + 2

	type tc struct {
		name string
		body []byte
		tpm  bool // refused by the TPM (typed TPM error in the chain), not by parsing
	}
	var cases []tc
	for i := 3; i < len(body); i++ {
		if i == 3+pubLen || i == 3+pubLen+1 {
			continue // the private area's size: a parsing case
		}
		b := bytes.Clone(body)
		b[i] ^= 0x01
		area := "public"
		if i >= privOff {
			area = "private"
		}
		cases = append(cases, tc{name: fmt.Sprintf("flip %s byte %d", area, i), body: b, tpm: i >= privOff})
	}
	otherPubLen := int(other[1])<<8 | int(other[2])
	cases = append(cases, tc{name: "private of another body", body: append(bytes.Clone(body[:3+pubLen]), other[3+otherPubLen:]...), tpm: true})
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := k.Unwrap(ctx, c.body, aad)
			if !errors.Is(err, kek.ErrInvalidCiphertext) {
				t.Fatalf("Unwrap = %x, %v; want ErrInvalidCiphertext", got, err)
			}
			if errors.Is(err, kek.ErrUnavailable) {
				t.Errorf("error also wraps ErrUnavailable: %v", err)
			}
			var rc tpm2.TPMRC
			if c.tpm && !errors.As(err, &rc) {
				t.Errorf("error does not carry the TPM's response code: %v", err)
			}
		})
	}
	// The KEK still works and nothing leaked.
	if _, err := k.Unwrap(ctx, body, aad); err != nil {
		t.Fatal(err)
	}
	assertOnlyOwn(t, k)
}

// TestForeignBody: a body sealed by another TPM's KEK (same handle, same
// config) and that TPM's KEK blob are refused.
func TestForeignBody(t *testing.T) {
	ctx := testCtx(t)
	simA, simB := swtpmtest.New(t), swtpmtest.New(t)
	cfgA := Config{Device: simA.Device, PersistentHandle: testHandle}
	cfgB := Config{Device: simB.Device, PersistentHandle: testHandle}
	createKey(t, cfgA)
	createKey(t, cfgB)
	kA := openKEK(t, simA, cfgA)
	kB := openKEK(t, simB, cfgB)
	if kA.ID() == kB.ID() {
		t.Fatalf("two TPMs gave the same key_id %s", kA.ID())
	}
	bodyB, err := kB.Wrap(ctx, []byte("seed of B"), []byte("aad"))
	if err != nil {
		t.Fatal(err)
	}
	_, err = kA.Unwrap(ctx, bodyB, []byte("aad"))
	if !errors.Is(err, kek.ErrInvalidCiphertext) {
		t.Fatalf("Unwrap of another TPM's body = %v, want ErrInvalidCiphertext", err)
	}
	var rc tpm2.TPMRC
	if !errors.As(err, &rc) {
		t.Errorf("error does not carry the TPM's response code: %v", err)
	}
	assertOnlyOwn(t, kA)

	// A KEK blob made on B does not load on A.
	blob := Config{Device: simB.Device, BlobFile: keyForms[1].cfg(t, simB).BlobFile}
	kB.Close() // swtpm serves one connection at a time
	createKey(t, blob)
	blob.Device = simA.Device
	kA.Close()
	if _, err := Open(ctx, blob); !errors.Is(err, ErrNotKEK) {
		t.Errorf("Open of another TPM's KEK blob = %v, want ErrNotKEK", err)
	}
	if _, err := Probe(ctx, blob); !errors.Is(err, ErrNotKEK) {
		t.Errorf("Probe of another TPM's KEK blob = %v, want ErrNotKEK", err)
	}
	assertNoHandles(t, simA)
}

func TestPCRPolicy(t *testing.T) {
	ctx := testCtx(t)
	sim := swtpmtest.New(t)
	plain := Config{Device: sim.Device, PersistentHandle: testHandle}
	withPCR := plain
	withPCR.PCRs, withPCR.AllowVolatilePCRs = []int{16, 7}, true // 16, the debug PCR, can be extended by the test
	createKey(t, plain)

	// A body sealed without a policy.
	k0, err := Open(ctx, plain)
	if err != nil {
		t.Fatal(err)
	}
	plainBody, err := k0.Wrap(ctx, []byte("no policy"), nil)
	if err != nil {
		t.Fatal(err)
	}
	k0.Close()

	k := openKEK(t, sim, withPCR)
	body, err := k.Wrap(ctx, []byte("sealed to PCRs"), []byte("aad"))
	if err != nil {
		t.Fatal(err)
	}
	pub, _, _, err := decodeObject(bodyV1, body)
	if err != nil {
		t.Fatal(err)
	}
	if pub.ObjectAttributes.UserWithAuth || len(pub.AuthPolicy.Buffer) != 32 {
		t.Fatalf("PCR body: userWithAuth=%v authPolicy=%x", pub.ObjectAttributes.UserWithAuth, pub.AuthPolicy.Buffer)
	}
	for range 3 { // the policy session is reused
		got, err := k.Unwrap(ctx, body, []byte("aad"))
		if err != nil || string(got) != "sealed to PCRs" {
			t.Fatalf("Unwrap = %q, %v", got, err)
		}
	}
	if got, err := k.Unwrap(ctx, plainBody, nil); err != nil || string(got) != "no policy" {
		t.Errorf("Unwrap of a no-policy body with a PCR config = %q, %v", got, err)
	}
	if _, err := k.Unwrap(ctx, body, []byte("aae")); !errors.Is(err, kek.ErrInvalidCiphertext) {
		t.Errorf("wrong aad = %v, want ErrInvalidCiphertext", err)
	}
	assertOnlyOwn(t, k)

	extendPCR(t, k, 16)
	_, err = k.Unwrap(ctx, body, []byte("aad"))
	if !errors.Is(err, ErrPolicy) || !errors.Is(err, kek.ErrUnavailable) {
		t.Fatalf("Unwrap after PCR extend = %v, want ErrPolicy and ErrUnavailable", err)
	}
	if errors.Is(err, kek.ErrInvalidCiphertext) {
		t.Errorf("a policy failure must not look like tampering: %v", err)
	}
	var rc tpm2.TPMRC
	if !errors.As(err, &rc) {
		t.Errorf("error does not carry the TPM's response code: %v", err)
	}
	assertOnlyOwn(t, k)

	// New bodies are sealed to the new values.
	body2, err := k.Wrap(ctx, []byte("after extend"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := k.Unwrap(ctx, body2, nil); err != nil || string(got) != "after extend" {
		t.Errorf("Unwrap of a body sealed after the extend = %q, %v", got, err)
	}
	assertOnlyOwn(t, k)

	// A PCR body under a config without pcrs.
	k.Close()
	k2 := openKEK(t, sim, plain)
	if _, err := k2.Unwrap(ctx, body2, nil); !errors.Is(err, ErrPolicy) {
		t.Errorf("Unwrap of a PCR body without pcrs configured = %v, want ErrPolicy", err)
	}
	assertOnlyOwn(t, k2)
}

// TestOutage kills swtpm mid-run: calls fail with ErrUnavailable within their
// deadline, then the KEK recovers when swtpm is back, without a new Open.
func TestOutage(t *testing.T) {
	for _, tcp := range []bool{false, true} {
		t.Run(fmt.Sprintf("tcp=%v", tcp), func(t *testing.T) {
			sim := swtpmtest.NewWith(t, swtpm.Options{TCP: tcp})
			for _, form := range keyForms {
				t.Run(form.name, func(t *testing.T) {
					testOutage(t, sim, form.cfg(t, sim))
				})
			}
		})
	}
}

func testOutage(t *testing.T, sim *swtpm.Sim, cfg Config) {
	ctx := testCtx(t)
	if _, err := CreateKey(ctx, cfg); err != nil && !errors.Is(err, kek.ErrKeyExists) {
		t.Fatal(err)
	}
	k := openKEK(t, sim, cfg)
	body, err := k.Wrap(ctx, []byte("seed"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := sim.Kill(); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		const deadline = 500 * time.Millisecond
		rctx, cancel := context.WithTimeout(ctx, deadline)
		start := time.Now()
		var err error
		if i%2 == 0 {
			_, err = k.Unwrap(rctx, body, nil)
		} else {
			_, err = k.Wrap(rctx, []byte("seed"), nil)
		}
		took := time.Since(start)
		cancel()
		if !errors.Is(err, kek.ErrUnavailable) {
			t.Fatalf("call %d during outage = %v, want ErrUnavailable", i, err)
		}
		if took > deadline+200*time.Millisecond {
			t.Errorf("call %d during outage took %v, deadline %v", i, took, deadline)
		}
	}
	if err := sim.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	got, err := k.Unwrap(ctx, body, nil)
	if err != nil || string(got) != "seed" {
		t.Fatalf("Unwrap after swtpm is back = %q, %v", got, err)
	}
	if _, err := k.Wrap(ctx, []byte("seed"), nil); err != nil {
		t.Fatalf("Wrap after swtpm is back: %v", err)
	}
	assertOnlyOwn(t, k)
}

// TestRestartBetweenCalls restarts swtpm cleanly between two calls: the next call
// reconnects and succeeds on its first try.
func TestRestartBetweenCalls(t *testing.T) {
	sim := swtpmtest.New(t)
	cfg := keyForms[1].cfg(t, sim)
	createKey(t, cfg)
	k := openKEK(t, sim, cfg)
	ctx := testCtx(t)
	body, err := k.Wrap(ctx, []byte("seed"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := sim.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	if got, err := k.Unwrap(ctx, body, nil); err != nil || string(got) != "seed" {
		t.Fatalf("Unwrap after restart = %q, %v", got, err)
	}
	assertOnlyOwn(t, k)
}

// TestHungTPM stops swtpm (SIGSTOP): calls fail when their deadline passes, and the
// KEK recovers once it continues.
func TestHungTPM(t *testing.T) {
	sim := swtpmtest.New(t)
	cfg := keyForms[0].cfg(t, sim)
	createKey(t, cfg)
	k := openKEK(t, sim, cfg)
	ctx := testCtx(t)
	body, err := k.Wrap(ctx, []byte("seed"), nil)
	if err != nil {
		t.Fatal(err)
	}
	pid := sim.PID()
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	cont := func() { syscall.Kill(pid, syscall.SIGCONT) }
	defer cont()
	// One call blocks on the TPM, the others wait for the connection: all return
	// by their deadline.
	const deadline = 300 * time.Millisecond
	var wg sync.WaitGroup
	for i := range 3 {
		wg.Go(func() {
			rctx, cancel := context.WithTimeout(ctx, deadline)
			defer cancel()
			start := time.Now()
			_, err := k.Unwrap(rctx, body, nil)
			took := time.Since(start)
			if !errors.Is(err, kek.ErrUnavailable) || !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("call %d on a hung TPM = %v, want ErrUnavailable and DeadlineExceeded", i, err)
			}
			if took > deadline+200*time.Millisecond {
				t.Errorf("call %d on a hung TPM took %v, deadline %v", i, took, deadline)
			}
		})
	}
	wg.Wait()
	cont()
	if got, err := k.Unwrap(ctx, body, nil); err != nil || string(got) != "seed" {
		t.Fatalf("Unwrap after the TPM continues = %q, %v", got, err)
	}
	assertOnlyOwn(t, k)
}

// TestStartup: a TPM that is powered on but not started answers TPM_RC_INITIALIZE;
// hwkms runs TPM2_Startup.
func TestStartup(t *testing.T) {
	sim := swtpmtest.NewWith(t, swtpm.Options{NoStartup: true})
	cfg := keyForms[1].cfg(t, sim)
	createKey(t, cfg)
	k := openKEK(t, sim, cfg)
	body, err := k.Wrap(testCtx(t), []byte("seed"), nil)
	if err != nil {
		t.Fatal(err)
	}
	// Power-cycle: swtpm comes back not started.
	if err := sim.Restart(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	if got, err := k.Unwrap(testCtx(t), body, nil); err != nil || string(got) != "seed" {
		t.Fatalf("Unwrap after an unstarted restart = %q, %v", got, err)
	}
	assertOnlyOwn(t, k)
}

// TestLeftoversFlushed: transient objects and sessions left by an earlier process
// on a TPM without a resource manager are flushed at Open.
func TestLeftoversFlushed(t *testing.T) {
	sim := swtpmtest.New(t)
	cfg := keyForms[1].cfg(t, sim)
	createKey(t, cfg)
	k, err := Open(testCtx(t), cfg)
	if err != nil {
		t.Fatal(err)
	}
	// Simulate a crash: drop the connection without flushing anything.
	k.sem <- struct{}{}
	k.line.drop()
	<-k.sem
	if hs := simHandles(t, sim); len(hs.Transient) == 0 || len(hs.Sessions) == 0 {
		t.Fatalf("expected leftovers, TPM holds %+v", hs)
	}
	if err := k.Close(); err != nil { // nothing of k's is reachable any more
		t.Fatal(err)
	}
	k2 := openKEK(t, sim, cfg)
	assertOnlyOwn(t, k2)
}

// TestCloseFlushes: Close flushes everything the KEK loaded and the ID stays
// readable. Idempotence and ErrClosed are kektest's (TestConformance).
func TestCloseFlushes(t *testing.T) {
	sim := swtpmtest.New(t)
	cfg := keyForms[1].cfg(t, sim)
	createKey(t, cfg)
	k, err := Open(testCtx(t), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := k.Wrap(testCtx(t), []byte("seed"), nil); err != nil {
		t.Fatal(err)
	}
	if err := k.Close(); err != nil {
		t.Fatal(err)
	}
	assertNoHandles(t, sim)
	if k.ID() == "" {
		t.Errorf("ID after Close is empty")
	}
}

// TestCloseDuringCalls closes the KEK while goroutines use it: every call either
// succeeds or returns ErrClosed, and nothing leaks.
func TestCloseDuringCalls(t *testing.T) {
	sim := swtpmtest.New(t)
	cfg := keyForms[1].cfg(t, sim)
	createKey(t, cfg)
	k, err := Open(testCtx(t), cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx := testCtx(t)
	var wg sync.WaitGroup
	started := make(chan struct{}, 4)
	for range 4 {
		wg.Go(func() {
			for i := range 50 {
				_, err := k.Wrap(ctx, []byte("seed"), nil)
				if errors.Is(err, kek.ErrClosed) {
					return
				}
				if err != nil {
					t.Errorf("Wrap: %v", err)
					return
				}
				if i == 0 {
					started <- struct{}{}
				}
			}
		})
	}
	<-started // close while calls are running
	if err := k.Close(); err != nil {
		t.Error(err)
	}
	wg.Wait()
	assertNoHandles(t, sim)
}

func TestAuthFile(t *testing.T) {
	sim := swtpmtest.New(t)
	ctx := testCtx(t)
	cfg := keyForms[1].cfg(t, sim)
	cfg.AuthFile = writeFile(t, "0123456789abcdef-correct\n")
	createKey(t, cfg)
	k, err := Open(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	body, err := k.Wrap(ctx, []byte("seed"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := k.Unwrap(ctx, body, nil); err != nil || string(got) != "seed" {
		t.Fatalf("Unwrap = %q, %v", got, err)
	}
	assertOnlyOwn(t, k)
	k.Close()

	wrong := cfg
	wrong.AuthFile = writeFile(t, "0123456789abcdef-wrong!!")
	_, err = Open(ctx, wrong)
	if err == nil {
		t.Fatal("Open with the wrong auth value succeeded")
	}
	if !errors.Is(err, tpm2.TPMRCBadAuth) { // noDA objects answer BAD_AUTH, not AUTH_FAIL
		t.Errorf("Open with the wrong auth value = %v, want TPM_RC_BAD_AUTH in the chain", err)
	}
	for _, secret := range []string{"0123456789abcdef", "wrong", "correct"} {
		if bytes.Contains([]byte(err.Error()), []byte(secret)) {
			t.Errorf("error contains the auth value: %v", err)
		}
	}
	assertNoHandles(t, sim)

	// Without the auth value the KEK cannot be used either.
	none := cfg
	none.AuthFile = ""
	if _, err := Open(ctx, none); err == nil {
		t.Error("Open without the auth value succeeded")
	}
	assertNoHandles(t, sim)
}

func TestReadAuth(t *testing.T) {
	for _, tc := range []struct {
		name, content string
		want          string // "" means an error
	}{
		{"newline trimmed", "0123456789abcdef\n", "0123456789abcdef"},
		{"crlf trimmed", "0123456789abcdef\r\n", "0123456789abcdef"},
		{"one newline only", "0123456789abcdef\n\n", "0123456789abcdef\n"},
		{"32 bytes", "0123456789abcdef0123456789abcdef", "0123456789abcdef0123456789abcdef"},
		{"too short", "0123456789abcde", ""},
		{"too long", "0123456789abcdef0123456789abcdef0", ""},
		{"NUL", "0123456789abcdef\x00", ""},
		{"empty", "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := readAuth(writeFile(t, tc.content))
			if tc.want == "" {
				if err == nil {
					t.Fatalf("readAuth accepted %q", tc.content)
				}
				if len(tc.content) > 4 && bytes.Contains([]byte(err.Error()), []byte(tc.content[:8])) {
					t.Errorf("error contains the auth value: %v", err)
				}
				return
			}
			if err != nil || string(got) != tc.want {
				t.Fatalf("readAuth = %q, %v; want %q", got, err, tc.want)
			}
		})
	}
	if _, err := readAuth(""); err != nil {
		t.Errorf("no auth file: %v", err)
	}
	// files.ReadSecret refuses an auth file other users can read.
	open := writeFile(t, "0123456789abcdef")
	if err := os.Chmod(open, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := readAuth(open); !errors.Is(err, files.ErrInsecureMode) {
		t.Errorf("readAuth of a 0644 file = %v, want files.ErrInsecureMode", err)
	}
}

func TestCreateKeyRefusesOverwrite(t *testing.T) {
	for _, form := range keyForms {
		t.Run(form.name, func(t *testing.T) {
			sim := swtpmtest.New(t)
			cfg := form.cfg(t, sim)
			first := createKey(t, cfg)
			var before []byte
			if cfg.BlobFile != "" {
				before, _ = os.ReadFile(cfg.BlobFile)
			}
			_, err := CreateKey(testCtx(t), cfg)
			if !errors.Is(err, kek.ErrKeyExists) {
				t.Fatalf("second CreateKey = %v, want kek.ErrKeyExists", err)
			}
			if cfg.BlobFile != "" {
				after, _ := os.ReadFile(cfg.BlobFile)
				if !bytes.Equal(before, after) {
					t.Fatal("blob file changed")
				}
				if fi, _ := os.Stat(cfg.BlobFile); fi.Mode().Perm() != 0o600 {
					t.Errorf("blob file mode %v, want 0600", fi.Mode().Perm())
				}
			}
			p, err := Probe(testCtx(t), cfg)
			if err != nil || p.KeyID != first.KeyID {
				t.Fatalf("Probe = %+v, %v; want key_id %s", p, err, first.KeyID)
			}
			assertNoHandles(t, sim)
		})
	}
}

func TestProbeDestroy(t *testing.T) {
	for _, form := range keyForms {
		t.Run(form.name, func(t *testing.T) {
			sim := swtpmtest.New(t)
			ctx := testCtx(t)
			cfg := form.cfg(t, sim)
			if _, err := Probe(ctx, cfg); !errors.Is(err, kek.ErrKeyNotFound) {
				t.Fatalf("Probe before create = %v, want kek.ErrKeyNotFound", err)
			}
			if _, err := Open(ctx, cfg); !errors.Is(err, kek.ErrKeyNotFound) {
				t.Fatalf("Open before create = %v, want kek.ErrKeyNotFound", err)
			}
			if err := DestroyKey(ctx, cfg); !errors.Is(err, kek.ErrKeyNotFound) {
				t.Fatalf("DestroyKey before create = %v, want kek.ErrKeyNotFound", err)
			}
			info := createKey(t, cfg)
			p, err := Probe(ctx, cfg)
			if err != nil {
				t.Fatal(err)
			}
			if p.KeyID != info.KeyID || !bytes.Equal(p.Name, info.Name) || p.Handle != info.Handle || p.BlobFile != info.BlobFile {
				t.Errorf("Probe = %+v, CreateKey = %+v", p, info)
			}
			if err := DestroyKey(ctx, cfg); err != nil {
				t.Fatal(err)
			}
			if _, err := Probe(ctx, cfg); !errors.Is(err, kek.ErrKeyNotFound) {
				t.Fatalf("Probe after destroy = %v, want kek.ErrKeyNotFound", err)
			}
			// A re-created key has a new key_id.
			again := createKey(t, cfg)
			if again.KeyID == info.KeyID {
				t.Errorf("re-created key reuses key_id %s", info.KeyID)
			}
			assertNoHandles(t, sim)
		})
	}
}

// TestNotAKEK: a persistent object that is not an hwkms KEK (here the SRK made
// persistent outside the SRK range) is refused by Open, Probe and DestroyKey.
func TestNotAKEK(t *testing.T) {
	sim := swtpmtest.New(t)
	ctx := testCtx(t)
	dev, _ := parseDevice(sim.Device)
	c, err := dial(ctx, dev)
	if err != nil {
		t.Fatal(err)
	}
	c.ctx = ctx
	rsp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		InPublic:      tpm2.New2B(tpm2.RSASRKTemplate),
	}.Execute(c)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := (tpm2.EvictControl{
		Auth:             tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		ObjectHandle:     tpm2.NamedHandle{Handle: rsp.ObjectHandle, Name: rsp.Name},
		PersistentHandle: 0x81010020,
	}).Execute(c); err != nil {
		t.Fatal(err)
	}
	flushHandle(c, rsp.ObjectHandle)
	c.Close()
	cfg := Config{Device: sim.Device, PersistentHandle: "0x81010020"}
	if _, err := Open(ctx, cfg); !errors.Is(err, ErrNotKEK) {
		t.Errorf("Open = %v, want ErrNotKEK", err)
	}
	if _, err := Probe(ctx, cfg); !errors.Is(err, ErrNotKEK) {
		t.Errorf("Probe = %v, want ErrNotKEK", err)
	}
	if err := DestroyKey(ctx, cfg); !errors.Is(err, ErrNotKEK) {
		t.Errorf("DestroyKey = %v, want ErrNotKEK", err)
	}
	if err := DestroyKey(ctx, Config{BlobFile: writeFile(t, "not a blob")}); !errors.Is(err, ErrNotKEK) {
		t.Errorf("DestroyKey(garbage blob) = %v, want ErrNotKEK", err)
	}
	assertNoHandles(t, sim)
}

func TestCreateKeyUnavailable(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	cfg := Config{Device: "unix://" + t.TempDir() + "/none.sock", PersistentHandle: testHandle}
	if _, err := CreateKey(ctx, cfg); !errors.Is(err, errTransport) {
		t.Errorf("CreateKey = %v", err)
	}
	if _, err := Open(ctx, cfg); !errors.Is(err, kek.ErrUnavailable) {
		t.Errorf("Open of a missing TPM = %v, want ErrUnavailable", err)
	}
	if _, err := CreateKey(ctx, cfg); !errors.Is(err, kek.ErrUnavailable) {
		t.Errorf("CreateKey on a missing TPM = %v, want ErrUnavailable", err)
	}
}

// TestKeyReplaced: after a reconnect the persistent handle holds another key; the
// KEK refuses to use it (its key_id would be a lie) until it is reopened.
func TestKeyReplaced(t *testing.T) {
	sim := swtpmtest.New(t)
	ctx := testCtx(t)
	cfg := keyForms[0].cfg(t, sim)
	createKey(t, cfg)
	k := openKEK(t, sim, cfg)
	body, err := k.Wrap(ctx, []byte("seed"), nil)
	if err != nil {
		t.Fatal(err)
	}
	// Evict the KEK over the KEK's connection, then drop the connection so that
	// CreateKey can connect (swtpm serves one connection at a time).
	err = k.do(ctx, "evict", func() error {
		_, err := tpm2.EvictControl{
			Auth:             tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
			ObjectHandle:     tpm2.NamedHandle{Handle: k.persistent, Name: tpm2.TPM2BName{Buffer: k.name}},
			PersistentHandle: k.persistent,
		}.Execute(k.c)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	k.sem <- struct{}{}
	k.teardown(context.Background())
	<-k.sem
	if _, err := k.Unwrap(ctx, body, nil); !errors.Is(err, kek.ErrKeyNotFound) || !errors.Is(err, kek.ErrUnavailable) {
		t.Fatalf("Unwrap with the key evicted = %v, want kek.ErrKeyNotFound and ErrUnavailable", err)
	}
	other := createKey(t, cfg)
	if other.KeyID == k.ID() {
		t.Fatal("new key has the old key_id")
	}
	for _, err := range []error{
		func() error { _, err := k.Unwrap(ctx, body, nil); return err }(),
		func() error { _, err := k.Wrap(ctx, []byte("seed"), nil); return err }(),
	} {
		if !errors.Is(err, ErrNotKEK) || !errors.Is(err, kek.ErrUnavailable) {
			t.Errorf("call with the key replaced = %v, want ErrNotKEK and ErrUnavailable", err)
		}
	}
}
