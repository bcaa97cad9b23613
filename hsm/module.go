package hsm

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/miekg/pkcs11"
)

// p11 is the slice of *pkcs11.Ctx that hsm uses. Every PKCS#11 call goes through it so
// that a test can wrap the real module (count calls, inject CK_RV faults).
type p11 interface {
	Initialize(opts ...pkcs11.InitializeOption) error
	Finalize() error
	Destroy()
	GetSlotList(tokenPresent bool) ([]uint, error)
	GetTokenInfo(slotID uint) (pkcs11.TokenInfo, error)
	OpenSession(slotID uint, flags uint) (pkcs11.SessionHandle, error)
	CloseSession(sh pkcs11.SessionHandle) error
	Login(sh pkcs11.SessionHandle, userType uint, pin string) error
	Logout(sh pkcs11.SessionHandle) error
	FindObjectsInit(sh pkcs11.SessionHandle, temp []*pkcs11.Attribute) error
	FindObjects(sh pkcs11.SessionHandle, max int) ([]pkcs11.ObjectHandle, bool, error)
	FindObjectsFinal(sh pkcs11.SessionHandle) error
	GetAttributeValue(sh pkcs11.SessionHandle, o pkcs11.ObjectHandle, a []*pkcs11.Attribute) ([]*pkcs11.Attribute, error)
	GenerateKey(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, temp []*pkcs11.Attribute) (pkcs11.ObjectHandle, error)
	DestroyObject(sh pkcs11.SessionHandle, oh pkcs11.ObjectHandle) error
	EncryptInit(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error
	Encrypt(sh pkcs11.SessionHandle, message []byte) ([]byte, error)
	DecryptInit(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error
	Decrypt(sh pkcs11.SessionHandle, cipher []byte) ([]byte, error)
	// EncryptOnce and DecryptOnce make one C_Encrypt or C_Decrypt with an output buffer
	// of outLen bytes and no length query (rawcall.go).
	EncryptOnce(sh pkcs11.SessionHandle, in []byte, outLen int) ([]byte, error)
	DecryptOnce(sh pkcs11.SessionHandle, in []byte, outLen int) ([]byte, error)
	GetMechanismInfo(slotID uint, m []*pkcs11.Mechanism) (pkcs11.MechanismInfo, error)
	SignInit(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error
	Sign(sh pkcs11.SessionHandle, message []byte) ([]byte, error)
	GenerateKeyPair(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, public, private []*pkcs11.Attribute) (pkcs11.ObjectHandle, pkcs11.ObjectHandle, error)
}

// loadModule dlopens a PKCS#11 module. Tests replace it to wrap the real module.
var loadModule = func(path string) (p11, error) {
	c := pkcs11.New(path)
	if c == nil {
		return nil, fmt.Errorf("hsm: cannot load PKCS#11 module %q (dlopen failed or C_GetFunctionList missing)", path)
	}
	r, err := newRawCtx(path, c)
	if err != nil {
		c.Destroy()
		return nil, err
	}
	return r, nil
}

// registry holds every module loaded in this process, by canonical path. C_Initialize
// and C_Finalize are per process, and login state is per token per process, so KEKs that
// share a module or a token share one module and one token entry, reference-counted.
var registry = struct {
	sync.Mutex
	modules map[string]*module
}{modules: map[string]*module{}}

// module is one loaded and initialised PKCS#11 module. path, ctx and refs are guarded
// by registry. Every PKCS#11 call on ctx is made holding gate for reading, logins and
// logouts too; only C_Finalize and C_Initialize (re-initialisation, recover.go) hold it
// for writing, and they take it without queueing (TryLock, bounded by reinitWait), so
// that a hung call never makes another caller wait on the gate.
type module struct {
	path     string
	ctx      p11
	refs     int  // token references and running re-inits; guarded by registry
	ownsInit bool // false if C_Initialize said CKR_CRYPTOKI_ALREADY_INITIALIZED
	tokens   map[uint]*token
	initArgs string         // Config.InitArgs of every config that shares the module
	cArgs    unsafe.Pointer // initArgs as a C string while the module is loaded (initargs.go)

	// gate is held shared by every device call (logins and logouts included) and
	// exclusively only by re-initialisation, so that C_Finalize never runs under
	// another call. Nothing ever blocks in gate.Lock: a writer waiting on a
	// sync.RWMutex would block every new reader, and so every operation on the module,
	// behind a hung call (lockForReinit polls TryLock instead).
	gate sync.RWMutex
	// admin serialises acquireToken and releaseToken (the token table, first logins,
	// last logouts) among themselves; operations never take it. Waiting for it is
	// bounded by the caller's context (lockAdmin). The token table is written holding
	// admin and gate for reading, or gate exclusively (re-initialisation).
	admin sync.Mutex
	// gen counts re-initialisations. Sessions and object handles are valid only in the
	// generation they were obtained in; after a re-init they are dropped, never closed
	// (their numbers may have been given to new sessions). Written under gate.
	gen atomic.Uint64
	rec recovery
	// draining is set while a re-initialisation waits for calls still running on the
	// module: new operations then fail at once with kek.ErrUnavailable instead of
	// queueing behind it (see reinit).
	draining atomic.Bool
	// reinitsOK and reinitsFailed count re-initialisations since the module was loaded,
	// for metrics (KEK.Reinits).
	reinitsOK, reinitsFailed atomic.Uint64
}

// token is a logged-in token. It keeps one session open for its lifetime: login state
// lasts while the application has a session open with the token (PKCS#11 v2.40 section
// 5.6, C_CloseSession), so pool sessions may come and go without logging out.
//
// mod, ctx, sel, label and serial are fixed. slot is written only holding mod.gate
// exclusively (re-initialisation) and read holding it. The login state (the fields
// after refs) is guarded by mu, which is never held across a device call.
type token struct {
	mod    *module
	ctx    p11
	sel    Config // token selector and PIN source, to find the token and read the PIN again at re-init
	slot   uint
	label  string
	serial string
	refs   int                  // guarded by registry
	mu     sync.Mutex           // guards the fields below
	hold   pkcs11.SessionHandle // session that carries the login, valid while loggedIn
	pinMAC []byte               // HMAC of the PIN under pinMACKey, to compare later logins

	// loggedIn is false after a re-initialisation until the login succeeded again.
	loggedIn bool
	// pinErr is set when C_Login refused the PIN at a re-login. It is sticky: every
	// operation on the token fails with it and no login is attempted again until Open
	// is called for the token (a config reload or restart).
	pinErr *PINError
	// loginFail is set when C_Login failed with any other CK_RV. It is sticky in the
	// same way as pinErr: a token that reports a wrong PIN with an unexpected code must
	// not be counted down to a lock by automatic retries.
	loginFail *LoginError
	// loginErr is why the last re-login did not happen (the PIN source, the token not
	// found, or another token in its place: ErrTokenChanged). Not sticky.
	loginErr error
}

// pinMACKey is a per-process random key. token.pinMAC lets a second Open on a token that
// is already logged in prove it knows the same PIN without the PIN being kept in memory.
var pinMACKey = func() []byte {
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		panic("hsm: crypto/rand failed: " + err.Error())
	}
	return k
}()

// refusedPINs remembers, per token (module path, serial, label), the MAC of the last
// PIN the token refused and its error, across module loads: an Open (config reload,
// SIGHUP, a doctor run in the same process) that reads the same PIN again gets the
// remembered PINError without a C_Login, so repeated reloads with an unfixed PIN file
// cannot count down the token's failed-login limit. A different PIN gets one attempt;
// a successful login forgets the entry.
var refusedPINs = struct {
	sync.Mutex
	m map[string]refusedPIN
}{m: map[string]refusedPIN{}}

type refusedPIN struct {
	mac []byte
	err error // the pkcs11.Error C_Login returned
}

func (t *token) pinKey() string { return t.mod.path + "\x00" + t.serial + "\x00" + t.label }

func macPIN(pin string) []byte {
	m := hmac.New(sha256.New, pinMACKey)
	m.Write([]byte(pin))
	return m.Sum(nil)
}

// PINError reports that the token refused the user PIN at C_Login: CKR_PIN_INCORRECT,
// CKR_PIN_LOCKED, CKR_PIN_EXPIRED, CKR_PIN_INVALID or CKR_PIN_LEN_RANGE. hsm never
// retries such a login (another attempt could lock the token). It unwraps to the
// pkcs11.Error and to kek.ErrUnavailable. It never contains the PIN.
type PINError struct {
	// Token names the token (its label) that refused the PIN.
	Token string
	// Err is the pkcs11.Error returned by C_Login.
	Err error
	// Repeated is set when no C_Login was made: the token had already refused this
	// same PIN in this process (the PIN file or variable has not been fixed since).
	Repeated bool
	// Record is set, with Repeated, when the refusal was found in the file
	// RememberRefusals keeps: an earlier process (before a restart) made the attempt.
	Record string
	// NotRecorded says why a new refusal could not be written to that file.
	NotRecorded string
}

// Error implements error.
func (e *PINError) Error() string {
	if e.Record != "" {
		return fmt.Sprintf("hsm: token %q refused this user PIN in an earlier run (recorded in %s): %v (no C_Login until the PIN file or variable changes, as another attempt could lock the token; if the token's PIN was changed to this one instead, remove %s)", e.Token, e.Record, e.Err, e.Record)
	}
	if e.NotRecorded != "" {
		return fmt.Sprintf("hsm: token %q refused the user PIN at C_Login: %v (not retried: another attempt could lock the token; the refusal could not be recorded for restarts: %s)", e.Token, e.Err, e.NotRecorded)
	}
	if e.Repeated {
		return fmt.Sprintf("hsm: token %q already refused this user PIN at C_Login: %v (no new attempt by this process until the PIN changes, as another could lock the token; restart hwkms if the token's PIN was changed instead)", e.Token, e.Err)
	}
	return fmt.Sprintf("hsm: token %q refused the user PIN at C_Login: %v (not retried: another attempt could lock the token)", e.Token, e.Err)
}

// Unwrap returns the pkcs11.Error and kek.ErrUnavailable.
func (e *PINError) Unwrap() []error { return []error{e.Err, kek.ErrUnavailable} }

// LoginError reports that C_Login as CKU_USER failed with a CK_RV other than the PIN
// codes of PINError (CKR_GENERAL_ERROR, CKR_FUNCTION_FAILED, a vendor code, ...). It is
// treated like a refused PIN: never retried automatically, since a token that reports a
// wrong PIN in another way could otherwise be counted down to a lock. Every operation on
// the token fails with it (the health probe too) until hwkms restarts, or a reload
// reads a different PIN (which makes one new attempt; the same PIN makes none). It
// unwraps to the pkcs11.Error (Reason names the CK_RV) and to kek.ErrUnavailable, and
// never contains the PIN.
type LoginError struct {
	// Token names the token (its label).
	Token string
	// Err is the pkcs11.Error returned by C_Login.
	Err error
	// Repeated is set when no C_Login was made: C_Login with this same PIN already
	// failed in this process.
	Repeated bool
}

// Error implements error.
func (e *LoginError) Error() string {
	if e.Repeated {
		return fmt.Sprintf("hsm: token %q: C_Login with this user PIN already failed in this process: %v (no new attempt until the PIN changes or hwkms restarts: the token may count failed logins)", e.Token, e.Err)
	}
	return fmt.Sprintf("hsm: token %q: C_Login as CKU_USER failed: %v (not retried automatically: the token may count failed logins; fix the cause, then restart hwkms or reload with a changed PIN)", e.Token, e.Err)
}

// Unwrap returns the pkcs11.Error and kek.ErrUnavailable.
func (e *LoginError) Unwrap() []error { return []error{e.Err, kek.ErrUnavailable} }

// acquireToken loads and initialises the module if needed, selects the token, opens its
// login session and logs in as CKU_USER if this process has not yet, and takes a
// reference. Release it with releaseToken. It holds the module's gate only shared
// (never waiting behind a hung call) and waits for another acquireToken or
// releaseToken of the module at most until ctx is done.
func acquireToken(ctx context.Context, cfg Config, pin string) (*token, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	registry.Lock()
	mod, err := acquireModuleLocked(cfg.Module, cfg.InitArgs)
	registry.Unlock()
	if err != nil {
		return nil, err
	}
	var tok *token
	if err = mod.lockAdmin(ctx); err == nil {
		mod.gate.RLock()
		tok, err = mod.tokenLocked(cfg, pin)
		mod.gate.RUnlock()
		mod.admin.Unlock()
	}
	if err != nil {
		registry.Lock()
		releaseModuleLocked(mod)
		registry.Unlock()
		return nil, err
	}
	return tok, nil
}

// releaseToken drops a reference taken by acquireToken. The last reference to a token
// logs out and closes its login session; the last reference to a module finalises and
// unloads it.
//
// It never waits on the module gate for writing, so it does not stall other KEKs on
// the module behind a hung call; it waits only for another acquireToken or
// releaseToken of the module that is running (lockAdmin).
func releaseToken(t *token) error {
	var errs []error
	_ = t.mod.lockAdmin(context.Background()) // cannot fail without a deadline
	t.mod.gate.RLock()
	registry.Lock()
	t.refs--
	last := t.refs == 0
	registry.Unlock()
	if last {
		if t.mod.tokens[t.slot] == t {
			delete(t.mod.tokens, t.slot)
		}
		t.mu.Lock()
		loggedIn, hold := t.loggedIn, t.hold
		t.loggedIn = false
		t.mu.Unlock()
		if loggedIn {
			if err := t.ctx.Logout(hold); err != nil && classify(err) == rvOther && !isRV(err, pkcs11.CKR_USER_NOT_LOGGED_IN) {
				errs = append(errs, fmt.Errorf("hsm: C_Logout on token %q: %w", t.label, err))
			}
			if err := t.ctx.CloseSession(hold); err != nil && classify(err) == rvOther {
				errs = append(errs, fmt.Errorf("hsm: C_CloseSession on token %q: %w", t.label, err))
			}
		}
	}
	t.mod.gate.RUnlock()
	t.mod.admin.Unlock()
	registry.Lock()
	if err := releaseModuleLocked(t.mod); err != nil {
		errs = append(errs, err)
	}
	registry.Unlock()
	return errors.Join(errs...)
}

func acquireModuleLocked(path, initArgs string) (*module, error) {
	key := path
	if p, err := filepath.EvalSymlinks(path); err == nil {
		key = p
	}
	if m, ok := registry.modules[key]; ok {
		if err := m.sameInitArgs(initArgs); err != nil {
			return nil, err
		}
		m.refs++
		return m, nil
	}
	c, err := loadModule(path)
	if err != nil {
		return nil, mark(err, ErrModule)
	}
	m := &module{path: key, ctx: c, refs: 1, ownsInit: true, tokens: map[uint]*token{}, initArgs: initArgs}
	if err := m.initialize(); err != nil {
		if !isRV(err, pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED) {
			c.Destroy()
			m.freeInitArgs()
			return nil, mark(fmt.Errorf("hsm: C_Initialize of module %q: %w: %w", path, kek.ErrUnavailable, err), ErrModule)
		}
		// Someone else in this process initialised it (another path to the same
		// library): use it, but never finalise it.
		m.ownsInit = false
	}
	registry.modules[key] = m
	return m, nil
}

func releaseModuleLocked(m *module) error {
	m.refs--
	if m.refs > 0 {
		return nil
	}
	delete(registry.modules, m.path)
	var err error
	if m.ownsInit {
		if ferr := m.ctx.Finalize(); ferr != nil {
			err = fmt.Errorf("hsm: C_Finalize of module %q: %w", m.path, ferr)
		}
	}
	m.ctx.Destroy() // dlclose drops only our reference to the library
	m.freeInitArgs()
	return err
}

// tokenLocked finds the configured token and returns it with a new reference, logging
// in if this process has no login on it yet. The caller holds m.admin and m.gate for
// reading.
//
// A token whose login failed (pinErr, loginFail) gets exactly one new C_Login here
// if the caller read a different PIN: Open is the explicit retry (config reload,
// restart). The same PIN is refused again without a C_Login (refusedPINs).
func (m *module) tokenLocked(cfg Config, pin string) (*token, error) {
	slot, info, err := m.selectSlot(cfg)
	if err != nil {
		return nil, err
	}
	serial := strings.TrimRight(info.SerialNumber, " \x00")
	if t, ok := m.tokens[slot]; ok {
		if t.serial != serial {
			return nil, t.changed(slot, serial)
		}
		t.mu.Lock()
		blocked, mac := t.pinErr != nil || t.loginFail != nil, t.pinMAC
		t.mu.Unlock()
		switch {
		case blocked:
			if err := t.login(pin); err != nil {
				return nil, err
			}
		case !hmac.Equal(mac, macPIN(pin)):
			return nil, fmt.Errorf("hsm: token %q is already logged in by this process with a different PIN; refusing a second configuration with another PIN", t.label)
		}
		registry.Lock()
		t.refs++
		registry.Unlock()
		return t, nil
	}
	label := strings.TrimRight(info.Label, " \x00")
	if cfg.TokenSerial == "" {
		// Selected by label or slot: a token this process is logged in to under the
		// same label, now gone from its slot, and another with that label in its place
		// is a substitution, not a new token (a reload must not send it the PIN).
		for _, old := range m.tokens {
			if old.label == label && old.serial != serial {
				return nil, old.changed(slot, serial)
			}
		}
	}
	t := &token{
		mod:    m,
		ctx:    m.ctx,
		sel:    cfg,
		slot:   slot,
		label:  label,
		serial: serial,
	}
	if err := t.login(pin); err != nil {
		return nil, err
	}
	t.refs = 1
	m.tokens[slot] = t
	return t, nil
}

// changed is the error for a token found in t's place whose serial number is not the
// one t had when this process first logged in to it.
func (t *token) changed(slot uint, serial string) error {
	return fmt.Errorf("hsm: token %q in slot %d now has serial number %q, but this process logged in to serial number %q: another token is in its place (re-initialised or substituted); no login is attempted on it and no key on it is used; restart hwkms if the change is intended: %w: %w",
		t.label, slot, serial, t.serial, ErrTokenChanged, kek.ErrUnavailable)
}

// isPINRV reports whether err is one of the CK_RVs with which C_Login refuses a PIN.
func isPINRV(err error) bool {
	return isRV(err, pkcs11.CKR_PIN_INCORRECT, pkcs11.CKR_PIN_LOCKED, pkcs11.CKR_PIN_EXPIRED,
		pkcs11.CKR_PIN_INVALID, pkcs11.CKR_PIN_LEN_RANGE)
}

// loginFailed records a failed C_Login (rv, its error) on t and returns the sticky
// error: a *PINError for the PIN codes, a *LoginError for any other.
func (t *token) loginFailed(rv error, repeated bool) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.loggedIn = false
	if isPINRV(rv) {
		t.pinErr = &PINError{Token: t.label, Err: rv, Repeated: repeated}
		return t.pinErr
	}
	t.loginFail = &LoginError{Token: t.label, Err: rv, Repeated: repeated}
	return t.loginFail
}

// login opens the login session and makes exactly one C_Login attempt as CKU_USER: a
// failed login, whatever its CK_RV, is never retried with the same PIN. A failure sets
// t.pinErr (the PIN codes) or t.loginFail (any other code) and returns it. The caller
// holds t.mod.gate (shared, with t.mod.admin; or exclusively).
func (t *token) login(pin string) error {
	mac := macPIN(pin)
	refusedPINs.Lock()
	r, refused := refusedPINs.m[t.pinKey()]
	refusedPINs.Unlock()
	if refused && hmac.Equal(r.mac, mac) {
		return t.loginFailed(r.err, true)
	}
	if rv, record, ok := persistedRefusal(t.pinKey(), pin); ok {
		refusedPINs.Lock()
		refusedPINs.m[t.pinKey()] = refusedPIN{mac: mac, err: rv}
		refusedPINs.Unlock()
		err := t.loginFailed(rv, true)
		var pe *PINError
		if errors.As(err, &pe) {
			pe.Record = record
		}
		return err
	}
	hold, err := t.ctx.OpenSession(t.slot, pkcs11.CKF_SERIAL_SESSION)
	if err != nil {
		return fmt.Errorf("hsm: C_OpenSession on token %q: %w: %w", t.label, kek.ErrUnavailable, err)
	}
	if err := t.ctx.Login(hold, pkcs11.CKU_USER, pin); err != nil && !isRV(err, pkcs11.CKR_USER_ALREADY_LOGGED_IN) {
		_ = t.ctx.CloseSession(hold)
		refusedPINs.Lock()
		refusedPINs.m[t.pinKey()] = refusedPIN{mac: mac, err: err}
		refusedPINs.Unlock()
		ferr := t.loginFailed(err, false)
		var (
			pe *PINError
			rv pkcs11.Error
		)
		if errors.As(ferr, &pe) && errors.As(err, &rv) {
			// Only PIN refusals outlive the process: another code may be a passing fault
			// that a restart should be able to try again.
			if perr := persistRefusal(t.pinKey(), pin, rv); perr != nil {
				pe.NotRecorded = perr.Error()
			}
		}
		return ferr
	}
	t.mu.Lock()
	t.hold, t.loggedIn, t.pinErr, t.loginFail, t.loginErr = hold, true, nil, nil, nil
	t.pinMAC = mac
	t.mu.Unlock()
	refusedPINs.Lock()
	delete(refusedPINs.m, t.pinKey())
	refusedPINs.Unlock()
	// A stale record is harmless for this PIN (it no longer matches); if it cannot be
	// erased now, the next successful login tries again.
	_ = persistRefusal(t.pinKey(), "", 0)
	return nil
}

// lockAdmin takes m.admin, waiting at most until ctx is done (for another Open or
// Close of the module whose device call does not return).
func (m *module) lockAdmin(ctx context.Context) error {
	if m.admin.TryLock() {
		return nil
	}
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for !m.admin.TryLock() {
		select {
		case <-ctx.Done():
			return fmt.Errorf("hsm: module %q: waiting for another Open or Close of a key on the module, whose device call has not returned: %w: %w", m.path, kek.ErrUnavailable, ctx.Err())
		case <-tick.C:
		}
	}
	return nil
}

// selectSlot returns the slot holding the one token that matches cfg's selector.
func (m *module) selectSlot(cfg Config) (uint, pkcs11.TokenInfo, error) {
	slots, err := m.ctx.GetSlotList(true)
	if err != nil {
		return 0, pkcs11.TokenInfo{}, fmt.Errorf("hsm: C_GetSlotList of module %q: %w: %w", cfg.Module, kek.ErrUnavailable, err)
	}
	var (
		found []uint
		infos []pkcs11.TokenInfo
	)
	for _, s := range slots {
		if cfg.Slot != nil && s != *cfg.Slot {
			continue
		}
		info, err := m.ctx.GetTokenInfo(s)
		if err != nil {
			if cfg.Slot != nil {
				return 0, info, fmt.Errorf("hsm: C_GetTokenInfo of slot %d: %w: %w", s, kek.ErrUnavailable, err)
			}
			continue // a slot we cannot read is not the one we are looking for
		}
		switch {
		case cfg.Slot != nil:
		case cfg.TokenLabel != "" && strings.TrimRight(info.Label, " \x00") == cfg.TokenLabel:
		case cfg.TokenSerial != "" && strings.TrimRight(info.SerialNumber, " \x00") == cfg.TokenSerial:
		default:
			continue
		}
		if info.Flags&pkcs11.CKF_TOKEN_INITIALIZED == 0 {
			if cfg.Slot != nil {
				return 0, info, fmt.Errorf("hsm: token in slot %d is not initialised", s)
			}
			continue
		}
		found = append(found, s)
		infos = append(infos, info)
	}
	switch len(found) {
	case 0:
		return 0, pkcs11.TokenInfo{}, fmt.Errorf("hsm: no %s in module %q (%d slots with a token present): %w",
			cfg.tokenName(), cfg.Module, len(slots), ErrTokenNotFound)
	case 1:
		return found[0], infos[0], nil
	default:
		return 0, pkcs11.TokenInfo{}, fmt.Errorf("hsm: %s is ambiguous: %d tokens match (slots %v); select by tokenSerial or slot",
			cfg.tokenName(), len(found), found)
	}
}

// isRV reports whether err is a pkcs11.Error equal to one of rvs.
func isRV(err error, rvs ...uint) bool {
	var e pkcs11.Error
	if !errors.As(err, &e) {
		return false
	}
	for _, rv := range rvs {
		if uint(e) == rv {
			return true
		}
	}
	return false
}
