package hsm

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
	"google.golang.org/grpc/codes"

	"github.com/hwkms/hwkms/plugin/kek"
)

// TestLoginFailureNeverRetried: at the re-login after a device removal, C_Login fails
// with a code that is not one of the PIN codes (CKR_GENERAL_ERROR: a token may report
// a wrong PIN that way). More device errors follow. hwkms never calls C_Login again on
// its own: the token stays failed (Unavailable, the health probe names the CK_RV), a
// reload with the same PIN makes no C_Login either, and only a restart (or a reload
// with another PIN) makes one new attempt.
func TestLoginFailureNeverRetried(t *testing.T) {
	for _, rv := range []uint{pkcs11.CKR_GENERAL_ERROR, pkcs11.CKR_DEVICE_ERROR} {
		t.Run(pkcs11.Error(rv).Error(), func(t *testing.T) {
			r := newRig(t, 2)
			logins := r.c.count("Login")
			r.c.set(func(c *chaos) {
				c.once["DecryptInit"] = []error{pkcs11.Error(pkcs11.CKR_DEVICE_REMOVED)}
				c.once["Login"] = []error{pkcs11.Error(rv)}
			})
			r.during(t, 300*time.Millisecond, 500*time.Millisecond, codes.Unavailable)
			// Several more device errors armed, each past the backoff of the one before
			// (requests keep coming; none may lead to a C_Login).
			for range 3 {
				r.c.set(func(c *chaos) {
					c.once["DecryptInit"] = []error{pkcs11.Error(pkcs11.CKR_DEVICE_ERROR)}
					c.once["EncryptInit"] = []error{pkcs11.Error(pkcs11.CKR_DEVICE_REMOVED)}
				})
				r.during(t, maxBackoff+50*time.Millisecond, 500*time.Millisecond, codes.Unavailable)
			}
			if n := r.c.count("Login") - logins; n != 1 {
				t.Fatalf("C_Login called %d times after it failed with %v, want exactly 1 (never retried)", n, pkcs11.Error(rv))
			}
			h := r.svc.ProbeNow(context.Background())
			var le *LoginError
			if h.OK || !errors.As(h.Err, &le) || !errors.Is(h.Err, kek.ErrUnavailable) || Reason(h.Err) != Reason(pkcs11.Error(rv)) {
				t.Fatalf("health probe = %+v, want a *LoginError wrapping ErrUnavailable with reason %s", h, Reason(pkcs11.Error(rv)))
			}
			if !strings.Contains(h.Err.Error(), Reason(pkcs11.Error(rv))) {
				t.Errorf("health error %q does not name the CK_RV", h.Err)
			}
			// A reload with the same PIN: refused without a C_Login.
			if _, err := Open(context.Background(), r.cfg); !errors.As(err, &le) || !le.Repeated {
				t.Fatalf("Open on reload with the same PIN = %v, want a Repeated *LoginError", err)
			}
			if n := r.c.count("Login") - logins; n != 1 {
				t.Fatalf("C_Login called %d times after a reload with the same PIN, want still 1", n)
			}
			// A restart forgets (a new process): one new attempt, and the old KEK works again.
			r.c.set(func(c *chaos) { clear(c.once) }) // the armed errors that found no call
			refusedPINs.Lock()
			clear(refusedPINs.m)
			refusedPINs.Unlock()
			start := time.Now()
			k2, err := Open(context.Background(), r.cfg)
			if err != nil {
				t.Fatalf("Open after a restart: %v", err)
			}
			defer k2.Close()
			if n := r.c.count("Login") - logins; n != 2 {
				t.Errorf("C_Login called %d times in all, want 2 (the failed one and the restart's)", n)
			}
			r.untilOK(t)
			t.Logf("serving again %v after the new Open started", time.Since(start).Round(time.Millisecond))
		})
	}
}
