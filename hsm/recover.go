package hsm

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/miekg/pkcs11"
)

// Backoff between re-initialisation attempts of one module: the first attempt after a
// device-class error is immediate; after a failed attempt the next one is allowed only
// after minBackoff, doubling up to maxBackoff. Requests that arrive during the wait fail
// at once with kek.ErrUnavailable instead of touching the device. maxBackoff bounds
// the time from a device coming back to the first success (the recovery target is 2 s).
const (
	minBackoff = 50 * time.Millisecond
	maxBackoff = time.Second
)

// reinitWait bounds how long a re-initialisation waits for device calls still running
// on the module (C_Finalize must not run under them). A call that hangs longer (a
// network HSM whose connection went half-open) makes that attempt fail instead of
// stalling the module: operations resume on the current sessions, and the next attempt
// follows the backoff. A var so tests can shorten it.
var reinitWait = 2 * time.Second

// recovery is the single-flight and backoff state of one module's re-initialisation.
type recovery struct {
	mu       sync.Mutex
	inflight *reinitCall // the running re-init, nil if none
	backoff  time.Duration
	next     time.Time // no new attempt before this
	lastErr  error     // error of the last failed attempt
}

// reinitCall is one re-initialisation; done is closed when err is set.
type reinitCall struct {
	done    chan struct{}
	stalled bool             // no re-initialisation ran: calls still running held the gate (err says so)
	err     error            // module-level failure (C_Initialize) or a token's login failure
	tokErr  map[*token]error // per token: why operations cannot run after the re-init (nil: they can)
}

// errBackoff marks a request refused because the module failed to re-initialise
// recently and the next attempt is not due yet.
var errBackoff = errors.New("waiting before the next re-initialisation attempt")

// recoverDevice re-initialises the module after an operation in generation seen failed with a
// device-class CK_RV (doc.go, "Recovery"): C_Finalize, C_Initialize, and for every token
// of the module a new login session and C_Login with the PIN read again from its file or
// variable. One re-init serves every KEK on the module: concurrent callers share it, and
// a caller whose generation is already stale returns nil at once (someone recovered).
// The re-init runs in its own goroutine; the caller waits for it no longer than ctx.
// A nil return means the operation may be retried in the new generation.
func (m *module) recoverDevice(ctx context.Context, t *token, seen uint64, cause error) error {
	r := &m.rec
	r.mu.Lock()
	if m.gen.Load() != seen {
		r.mu.Unlock()
		return nil
	}
	call := r.inflight
	if call == nil {
		if wait := time.Until(r.next); wait > 0 {
			last := r.lastErr
			r.mu.Unlock()
			return fmt.Errorf("hsm: module %q: %w (%v): %w: %w", m.path, errBackoff, wait.Round(time.Millisecond), kek.ErrUnavailable, last)
		}
		call = &reinitCall{done: make(chan struct{})}
		r.inflight = call
		registry.Lock()
		m.refs++ // keeps the module loaded while the re-init runs, even if every KEK closes
		registry.Unlock()
		go m.reinit(seen, call)
	}
	r.mu.Unlock()
	select {
	case <-call.done:
		if call.stalled {
			return fmt.Errorf("hsm: module %q: re-initialisation after %v: %w", m.path, cause, call.err)
		}
		if err, ok := call.tokErr[t]; ok && err != nil {
			return fmt.Errorf("hsm: module %q: re-initialisation after %v: %w", m.path, cause, err)
		}
		return nil
	case <-ctx.Done():
		return fmt.Errorf("hsm: module %q: waiting for re-initialisation: %w: %w", m.path, kek.ErrUnavailable, ctx.Err())
	}
}

// reinit runs one re-initialisation for generation seen and publishes its result.
func (m *module) reinit(seen uint64, call *reinitCall) {
	var err error
	tokErr := map[*token]error{}
	if m.lockForReinit() {
		if m.gen.Load() == seen {
			err = m.reinitLocked()
			if err != nil {
				m.reinitsFailed.Add(1)
			} else {
				m.reinitsOK.Add(1)
			}
		}
		for _, t := range m.tokens {
			tokErr[t] = t.state()
		}
		m.gate.Unlock()
	} else {
		m.reinitsFailed.Add(1)
		err = fmt.Errorf("C_Finalize not attempted: a device call on the module has not returned after %v: %w", reinitWait, kek.ErrUnavailable)
		call.stalled = true
	}

	r := &m.rec
	r.mu.Lock()
	if err != nil {
		r.backoff = min(max(2*r.backoff, minBackoff), maxBackoff)
		r.next, r.lastErr = time.Now().Add(r.backoff), err
	} else {
		r.backoff, r.next, r.lastErr = 0, time.Time{}, nil
	}
	call.err, call.tokErr = err, tokErr
	r.inflight = nil
	close(call.done)
	r.mu.Unlock()

	registry.Lock()
	releaseModuleLocked(m) //nolint:errcheck // a C_Finalize error of an unused module has no one to report to
	registry.Unlock()
}

// lockForReinit takes the gate exclusively for a re-initialisation. It stops new
// operations first (draining: they fail at once with kek.ErrUnavailable) and
// waits for the calls already running, at most reinitWait; it reports false when they
// did not all return in time, leaving the gate to them.
func (m *module) lockForReinit() bool {
	m.draining.Store(true)
	defer m.draining.Store(false)
	deadline := time.Now().Add(reinitWait)
	for !m.gate.TryLock() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(time.Millisecond)
	}
	return true
}

// reinitLocked finalises and initialises the module and logs every token in again. The
// caller holds m.gate exclusively. The generation advances once C_Finalize has been
// called, whatever follows, since every session and object handle is gone then.
func (m *module) reinitLocked() error {
	if m.ownsInit {
		// The module may already consider itself finalised (CKR_CRYPTOKI_NOT_INITIALIZED)
		// or be unable to talk to the device: neither stops a new C_Initialize.
		_ = m.ctx.Finalize()
	}
	m.gen.Add(1)
	for _, t := range m.tokens {
		t.mu.Lock()
		t.loggedIn = false
		t.mu.Unlock()
	}
	if err := m.initialize(); err != nil && !isRV(err, pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED) {
		return fmt.Errorf("C_Initialize: %w: %w", kek.ErrUnavailable, err)
	}
	toks := make([]*token, 0, len(m.tokens))
	for _, t := range m.tokens {
		toks = append(toks, t)
	}
	var errs []error
	for _, t := range toks {
		if _, sticky := t.status(); sticky {
			continue // a failed login is never retried automatically; operations fail with it
		}
		if err := m.relogin(t); err != nil {
			t.mu.Lock()
			t.loginErr = err
			t.mu.Unlock()
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// relogin finds t's token again, checks that it is the same token (its serial number)
// and logs in with the PIN read again from its source. Another token in its place
// (ErrTokenChanged) gets no C_Login: the PIN is never sent to it.
func (m *module) relogin(t *token) error {
	pin, err := t.sel.readPIN()
	if err != nil {
		return fmt.Errorf("%w: %w", kek.ErrUnavailable, err)
	}
	// The slot ID may change when a device is removed and inserted again.
	slot, info, err := m.selectSlot(t.sel)
	if err != nil {
		return fmt.Errorf("%w: %w", kek.ErrUnavailable, err)
	}
	if serial := strings.TrimRight(info.SerialNumber, " \x00"); serial != t.serial {
		return t.changed(slot, serial)
	}
	if other, ok := m.tokens[slot]; ok && other != t {
		return fmt.Errorf("hsm: token %q: slot %d is taken by token %q of this process: %w", t.label, slot, other.label, kek.ErrUnavailable)
	}
	if slot != t.slot {
		delete(m.tokens, t.slot)
		t.slot = slot
		m.tokens[slot] = t
	}
	if err := t.login(pin); err != nil {
		if _, sticky := t.status(); sticky {
			return nil // sticky in t.pinErr or t.loginFail; not a reason to back off the module
		}
		return err
	}
	return nil
}

// state reports why operations on t cannot run now: a failed login (sticky), or a
// re-login that did not happen at the last re-init. The caller holds t.mod.gate.
func (t *token) state() error {
	err, _ := t.status()
	return err
}

// status is state, and whether the error is sticky: a failed C_Login, which no
// re-initialisation retries.
func (t *token) status() (err error, sticky bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	switch {
	case t.pinErr != nil:
		return t.pinErr, true
	case t.loginFail != nil:
		return t.loginFail, true
	case !t.loggedIn && t.loginErr != nil:
		return t.loginErr, false
	case !t.loggedIn:
		return fmt.Errorf("hsm: token %q is not logged in: %w", t.label, kek.ErrUnavailable), false
	}
	return nil, false
}
