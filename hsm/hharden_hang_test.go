package hsm

import (
	"bytes"
	"context"
	"runtime"
	"sync"
	"testing"
	"time"
)

// hangRig is two KEKs (a and b) on one token and a third (c) on another token of the
// same module, behind the chaos seam, with one C_Decrypt of a hung on the device.
type hangRig struct {
	c       *chaos
	a, b, o *KEK
	cfgB    Config
	release chan struct{} // closed by free, to let the hung call return
	freeing sync.Once
	body    []byte // a body of a, to keep a's free session busy
	before  int    // goroutines before the hang
}

func newHangRig(t *testing.T, openB bool) *hangRig {
	t.Helper()
	fx, toks := newTokens(t, 2)
	c := newChaos()
	seam(t, func(p p11) p11 { c.p11 = p; return c })
	cfgA := cfgFor(fx, toks[0], "a")
	cfgA.Sessions = 2
	cfgB := cfgFor(fx, toks[0], "b")
	cfgO := cfgFor(fx, toks[1], "o")
	createKey(t, cfgA)
	createKey(t, cfgB)
	createKey(t, cfgO)
	r := &hangRig{c: c, cfgB: cfgB, release: make(chan struct{})}
	r.a = openKEK(t, cfgA)
	r.o = openKEK(t, cfgO)
	if openB {
		r.b = openKEK(t, cfgB)
	}
	r.body = roundTrip(t, r.a, []byte("seed"), aad)
	t.Cleanup(c.clear) // runs before the KEKs' Close, which waits for the hung call
	t.Cleanup(r.free)  // also if the test fails before it lets the call return
	r.before = runtime.NumGoroutine()

	hung := make(chan string, 1)
	c.set(func(c *chaos) { c.hang["Decrypt"], c.hungIn = r.release, hung })
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		r.a.Unwrap(ctx, r.body, aad) //nolint:errcheck // it hangs; its result does not matter
	}()
	select {
	case <-hung:
	case <-time.After(5 * time.Second):
		t.Fatal("the C_Decrypt did not hang")
	}
	// Later calls do not hang; the first one stays stuck until release is closed.
	c.set(func(c *chaos) { delete(c.hang, "Decrypt"); c.hungIn = nil })
	return r
}

// free lets the hung call return.
func (r *hangRig) free() { r.freeing.Do(func() { close(r.release) }) }

// serve runs round trips on k for d with a 500 ms deadline each, as the serving keyring
// does while something else happens on the module, and returns how many succeeded and
// the slowest. Any failure fails the test (t.Error: serve may run on another
// goroutine): k has a free session.
func serve(t *testing.T, k *KEK, d time.Duration) (n int, worst time.Duration) {
	t.Helper()
	for end := time.Now().Add(d); time.Now().Before(end); {
		start := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
		body, err := k.Wrap(ctx, []byte("seed"), aad)
		if err == nil {
			var pt []byte
			pt, err = k.Unwrap(ctx, body, aad)
			if err == nil && !bytes.Equal(pt, []byte("seed")) {
				t.Errorf("round trip answered wrong data %x", pt)
			}
		}
		cancel()
		if t.Failed() {
			return n, worst
		}
		if err != nil {
			t.Errorf("a round trip on key %q with a free session failed while a call hung: %v", k.keyLabel, err)
			return n, worst
		}
		n++
		worst = max(worst, time.Since(start))
	}
	return n, worst
}

// within runs fn on a goroutine and returns its error and how long it took, failing
// the test if it takes longer than d (its goroutine is then left to the test's end).
func within(t *testing.T, what string, d time.Duration, fn func() error) (error, time.Duration) {
	t.Helper()
	start := time.Now()
	done := make(chan error, 1)
	go func() { done <- fn() }()
	select {
	case err := <-done:
		return err, time.Since(start)
	case <-time.After(d):
		t.Fatalf("%s did not finish within %v while a call of another key on the module hung", what, d)
		return nil, 0
	}
}

// goroutinesBack waits until the goroutine count is back to at most want.
func goroutinesBack(t *testing.T, want int) time.Duration {
	t.Helper()
	start := time.Now()
	for runtime.NumGoroutine() > want {
		if time.Since(start) > 5*time.Second {
			buf := make([]byte, 1<<16)
			t.Fatalf("%d goroutines 5 s after the hung call returned, %d before the hang:\n%s", runtime.NumGoroutine(), want, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(5 * time.Millisecond)
	}
	return time.Since(start)
}

// TestHungCallDuringReload: while a C_Decrypt of key a hangs, a reload opens key b on
// the same token (hsm.Open) and then closes it (the release of the previous keyring).
// Neither waits for the hung call, operations on a's free session and on another
// token of the module go on succeeding throughout, and once the hung call returns no
// goroutine is left behind.
func TestHungCallDuringReload(t *testing.T) {
	r := newHangRig(t, false)
	stop := make(chan struct{})
	served := make(chan struct{}, 2)
	for _, k := range []*KEK{r.a, r.o} {
		go func() {
			defer func() { served <- struct{}{} }()
			n, worst := 0, time.Duration(0)
			for !t.Failed() {
				select {
				case <-stop:
					t.Logf("key %q: %d round trips during the reload, slowest %v", k.keyLabel, n, worst.Round(time.Millisecond))
					return
				default:
				}
				m, w := serve(t, k, 50*time.Millisecond)
				n, worst = n+m, max(worst, w)
			}
		}()
	}
	var b *KEK
	err, took := within(t, "hsm.Open of a second key on the module (a reload)", 3*time.Second, func() error {
		var err error
		b, err = Open(context.Background(), r.cfgB)
		return err
	})
	if err != nil {
		t.Fatalf("Open during the hung call: %v", err)
	}
	t.Logf("Open of key b took %v while a call hung", took.Round(time.Millisecond))
	roundTrip(t, b, []byte("seed"), aad)
	err, took = within(t, "Close of key b", 3*time.Second, b.Close)
	if err != nil {
		t.Fatalf("Close of key b: %v", err)
	}
	t.Logf("Close of key b took %v while a call hung", took.Round(time.Millisecond))
	time.Sleep(100 * time.Millisecond) // keep serving a little after the reload
	close(stop)
	<-served
	<-served
	r.free()
	t.Logf("goroutines back to the count before the hang %v after the hung call returned",
		goroutinesBack(t, r.before+1).Round(time.Millisecond))
}

// TestHungCallDuringShutdown: while a C_Decrypt of key a hangs, every key on the
// module is closed (shutdown). The keys without a hung call close at once; a's Close
// waits for its own hung call only, and returns as soon as it does; the other token's
// key serves until it is closed.
func TestHungCallDuringShutdown(t *testing.T) {
	r := newHangRig(t, true)
	err, took := within(t, "Close of key b", 3*time.Second, r.b.Close)
	if err != nil {
		t.Fatalf("Close of key b: %v", err)
	}
	t.Logf("Close of key b (same token) took %v while a call of key a hung", took.Round(time.Millisecond))
	aClosed := make(chan error, 1)
	go func() { aClosed <- r.a.Close() }()
	n, worst := serve(t, r.o, 300*time.Millisecond)
	t.Logf("key on the other token: %d round trips while key a's Close waited, slowest %v", n, worst.Round(time.Millisecond))
	select {
	case err := <-aClosed:
		t.Fatalf("Close of key a returned (%v) before its hung call did", err)
	default:
	}
	err, took = within(t, "Close of the other token's key", 3*time.Second, r.o.Close)
	if err != nil {
		t.Fatalf("Close of the other token's key: %v", err)
	}
	t.Logf("Close of the other token's key took %v", took.Round(time.Millisecond))
	released := time.Now()
	r.free()
	select {
	case err := <-aClosed:
		if err != nil {
			t.Fatalf("Close of key a: %v", err)
		}
		t.Logf("Close of key a returned %v after its hung call did", time.Since(released).Round(time.Millisecond))
	case <-time.After(3 * time.Second):
		t.Fatal("Close of key a did not return within 3 s of its hung call returning")
	}
	goroutinesBack(t, r.before+1)
}
