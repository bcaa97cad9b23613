package tpm

import (
	"bytes"
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/tpm/swtpm/latency"
	"github.com/hwkms/hwkms/tpm/swtpm/swtpmtest"
)

func TestAdmissionCheck(t *testing.T) {
	soon := func(d time.Duration) context.Context {
		ctx, cancel := context.WithTimeout(context.Background(), d)
		t.Cleanup(cancel)
		return ctx
	}
	cases := []struct {
		name   string
		ctx    context.Context
		mean   time.Duration
		ahead  int64
		off    bool
		refuse bool
	}{
		{"nothing observed yet", soon(time.Second), 0, 1000, false, false},
		{"no deadline", context.Background(), time.Second, 1000, false, false},
		{"fits", soon(time.Second), 10 * time.Millisecond, 10, false, false},
		{"does not fit", soon(time.Second), 10 * time.Millisecond, 200, false, true},
		{"alone but too slow", soon(5 * time.Millisecond), 10 * time.Millisecond, 0, false, true},
		{"does not fit, admission off", soon(time.Second), 10 * time.Millisecond, 200, true, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var a admission
			a.off.Store(c.off)
			if c.mean > 0 {
				a.observe(c.mean)
			}
			err := a.check(c.ctx, c.ahead, false)
			if !c.refuse {
				if err != nil {
					t.Fatalf("check = %v, want admitted", err)
				}
				return
			}
			if !errors.Is(err, kek.ErrUnavailable) || !errors.Is(err, ErrWouldMissDeadline) || errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("check = %v, want ErrUnavailable and ErrWouldMissDeadline", err)
			}
			if err := a.check(c.ctx, c.ahead, true); !errors.Is(err, ErrWouldMissDeadline) || !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("check at turn = %v, want ErrWouldMissDeadline and DeadlineExceeded", err)
			}
		})
	}
}

func TestAdmissionObserve(t *testing.T) {
	var a admission
	a.observe(8 * time.Millisecond)
	if got := time.Duration(a.meanNs.Load()); got != 8*time.Millisecond {
		t.Fatalf("first observation: mean %v, want 8ms", got)
	}
	a.observe(16 * time.Millisecond)
	if got := time.Duration(a.meanNs.Load()); got != 9*time.Millisecond {
		t.Fatalf("mean %v, want 9ms (weight 1/8)", got)
	}
	a.observe(time.Second) // a stall counts as twice the mean
	if got := time.Duration(a.meanNs.Load()); got != 9*time.Millisecond+9*time.Millisecond/8 {
		t.Fatalf("mean after a stall %v, want 10.125ms", got)
	}
}

// TestAdmissionStorm sends more concurrent Unwraps than a TPM at discrete-TPM speed
// can serve before their deadline. With admission, the calls that cannot make it are
// refused at once with ErrUnavailable; without, they wait and fail at their deadline.
func TestAdmissionStorm(t *testing.T) {
	sim := swtpmtest.New(t)
	for _, off := range []bool{false, true} {
		name := map[bool]string{false: "admission", true: "no admission"}[off]
		t.Run(name, func(t *testing.T) {
			cfg := keyForms[1].cfg(t, sim)
			createKey(t, cfg)
			x, err := latency.StartFor(sim.Device, latency.SLB9670)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { x.Close() })
			cfg.Device, cfg.DisableAdmission = x.Device, off
			k, err := Open(testCtx(t), cfg)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { k.Close() })
			seed := bytes.Repeat([]byte{7}, 32)
			body, err := k.Wrap(testCtx(t), seed, nil)
			if err != nil {
				t.Fatal(err)
			}
			for range 3 { // the mean is observed
				if _, err := k.Unwrap(testCtx(t), body, nil); err != nil {
					t.Fatal(err)
				}
			}
			const n, deadline = 40, 150 * time.Millisecond // ~10 ms per Unwrap: ~15 fit
			var (
				mu                   sync.Mutex
				ok, refused, expired int
				slowestRefusal       time.Duration
				fastRefusals         int
			)
			var wg sync.WaitGroup
			for range n {
				wg.Add(1)
				go func() {
					defer wg.Done()
					ctx, cancel := context.WithTimeout(context.Background(), deadline)
					defer cancel()
					start := time.Now()
					got, err := k.Unwrap(ctx, body, nil)
					took := time.Since(start)
					mu.Lock()
					defer mu.Unlock()
					switch {
					case err == nil:
						if !bytes.Equal(got, seed) {
							t.Error("Unwrap returned another seed")
						}
						ok++
					case errors.Is(err, ErrWouldMissDeadline):
						if !errors.Is(err, kek.ErrUnavailable) {
							t.Errorf("refusal %v does not wrap ErrUnavailable", err)
						}
						refused++
						slowestRefusal = max(slowestRefusal, took)
						if took < deadline/4 {
							fastRefusals++
						}
					case errors.Is(err, kek.ErrUnavailable) && errors.Is(err, context.DeadlineExceeded):
						expired++
					default:
						t.Errorf("Unwrap: %v", err)
					}
				}()
			}
			wg.Wait()
			t.Logf("%s: %d ok, %d refused (%d within deadline/4, slowest %v), %d expired", name, ok, refused, fastRefusals, slowestRefusal, expired)
			if ok == 0 {
				t.Error("no call succeeded")
			}
			if off {
				if refused != 0 || expired == 0 {
					t.Errorf("without admission: %d refused, %d expired; want 0 refused, some expired", refused, expired)
				}
				return
			}
			if refused == 0 {
				t.Error("with admission no call was refused")
			}
			// Refused on arrival (queue too long) or, rarely, when its turn comes too
			// late to finish: never after its deadline.
			if slowestRefusal >= deadline+20*time.Millisecond { // scheduling slack
				t.Errorf("a refusal took %v, not before the deadline %v", slowestRefusal, deadline)
			}
			if fastRefusals < refused/2 {
				t.Errorf("only %d of %d refusals came at once", fastRefusals, refused)
			}
			// The TPM still serves after the storm.
			if _, err := k.Unwrap(testCtx(t), body, nil); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestAdmissionExpired(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Nanosecond)
	defer cancel()
	<-ctx.Done()
	for _, off := range []bool{false, true} {
		var a admission
		a.off.Store(off)
		err := a.check(ctx, 0, false)
		if !errors.Is(err, kek.ErrUnavailable) || !errors.Is(err, context.DeadlineExceeded) || errors.Is(err, ErrWouldMissDeadline) {
			t.Fatalf("off=%v: check = %v, want ErrUnavailable and DeadlineExceeded", off, err)
		}
	}
}
