package hsm

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/miekg/pkcs11"
)

// Body format version 1 (see doc.go). These values are stored in etcd inside every
// ciphertext and can never change meaning.
const (
	// mechAESGCM: CKM_AES_GCM, 12-byte IV chosen by hwkms, 128-bit tag.
	mechAESGCM byte = 0x01

	gcmIVSize  = 12
	gcmTagSize = 16
	headerSize = 1 + gcmIVSize
	minBody    = headerSize + gcmTagSize + 1
	maxBody    = headerSize + kek.MaxPlaintext + gcmTagSize
)

// KEK is a key on a PKCS#11 token (an AES key; with an HMAC key for aes-cbc-hmac; an
// RSA key pair for rsa-oaep) used with the mechanism chosen at Open (Mechanism) to
// wrap and unwrap kube-apiserver DEK seeds. Its value never leaves the token.
//
// A KEK is safe for concurrent use: each operation takes a session from a pool of
// Config.Sessions sessions and waits for one at most until its context is done. Close
// is idempotent; it makes waiting and new operations return an error wrapping
// kek.ErrClosed, waits for operations already on the device to finish, then closes
// the sessions and releases the shared module and token (logging out and finalising
// the module when no other KEK in the process uses them).
//
// A context bounds the whole operation, including a PKCS#11 call that hangs: device
// calls run on a goroutine of their own, and the operation returns at its deadline with
// an error wrapping context.DeadlineExceeded while the call finishes in the background.
// The session it holds goes back to the pool only when the call returns, so at most
// Config.Sessions calls per KEK can be stuck at once; further operations wait for a
// session until their deadline. Close waits for stuck calls to return.
type KEK struct {
	id          string
	keyLabel    string
	ckaID       []byte // raw CKA_ID of the key found at Open; refinds match it exactly
	allowUnsafe bool
	tok         *token
	pool        *pool

	macUnsafe bool      // Config.AllowExtractable, for the HMAC key (never copied by ReplicateKey)
	hasMAC    bool      // the key has an HMAC partner key (aes-cbc-hmac); found at Open
	gcmVendor uint      // Config.GCMMechanism: a vendor GCM mechanism Unwrap accepts in 0x02 bodies
	mech      mechanism // chosen at Open; fixed afterwards
	rsa       bool      // an rsa-oaep key: keys.enc is the public key, keys.priv the private key
	oaepHash  byte      // rsa-oaep: oaepSHA256 or oaepSHA1, chosen at Open

	keyMu  sync.Mutex // guards keys, keyGen and keysOK; held while finding the key again
	keys   keyHandles
	keyGen uint64 // module generation keys belong to
	keysOK bool   // keys may be used: false after a re-find found another key (ErrKeyChanged)

	// Identity of the key material found at Open, to prove that a key found again
	// (after a re-initialisation or a stale handle) is the same (sameKey). Fixed after
	// Open.
	kcv, macKCV []byte // CKA_CHECK_VALUE of the AES and the HMAC key; nil if the token gives none
	probe       []byte // a body of probePlaintext wrapped at Open

	mu       sync.RWMutex   // held shared by operations, exclusively by Close
	inflight sync.WaitGroup // device-call goroutines, which may outlive their operation
	closed   atomic.Bool
	done     chan struct{}
	closing  sync.Once
}

var _ kek.KEK = (*KEK)(nil)

// Open loads cfg.Module (once per process, shared and reference-counted with every
// other KEK on it), selects the token, logs in as CKU_USER unless this process already
// is (C_Login is attempted at most once: a refused PIN is returned as *PINError and never
// retried), opens the session pool, finds the one AES secret key labelled cfg.KeyLabel
// (and with CKA_ID cfg.KeyCKAID if set; for rsa-oaep the RSA private key and its public
// key; for an aes-cbc-hmac key also its HMAC key), checks that its attributes keep it
// inside the token unless cfg.AllowExtractable, caches the handles, and chooses the
// mechanism (cfg.Mechanism; doc.go, "Mechanisms"): C_GetMechanismInfo and a
// wrap/unwrap round trip, failing with ErrNoMechanism if none is usable.
func Open(ctx context.Context, cfg Config) (_ *KEK, err error) {
	cfg = cfg.Resolved()
	if err := cfg.Validate(""); err != nil {
		return nil, fmt.Errorf("hsm: invalid config: %w", err)
	}
	pin, err := cfg.readPIN()
	if err != nil {
		return nil, err
	}
	tok, err := acquireToken(ctx, cfg, pin)
	if err != nil {
		return nil, err
	}
	k := &KEK{
		keyLabel:    cfg.KeyLabel,
		allowUnsafe: cfg.AllowExtractable || cfg.AllowReplicated,
		tok:         tok,
		done:        make(chan struct{}),
	}
	k.pool, err = newPool(tok, cfg.sessions(), k.done)
	if err != nil {
		return nil, errors.Join(err, releaseToken(tok))
	}
	defer func() {
		if err != nil {
			k.inflight.Wait() // self-test calls that outlived ctx
			err = errors.Join(err, k.pool.closeAll(), releaseToken(tok))
		}
	}()
	if err := k.findAtOpen(ctx, cfg); err != nil {
		return nil, err
	}
	k.gcmVendor = cfg.GCMMechanism
	// choose keeps the body of the round trip that chose the mechanism as the
	// same-key probe (k.probe).
	if err := k.choose(ctx, cfg); err != nil {
		return nil, err
	}
	return k, nil
}

// The round trip of selfTest wraps probePlaintext with probeAAD. The body of the one
// that chose the mechanism at Open is kept as the same-key probe: a key found again
// must unwrap it (sameKey), which proves the key material without exposing it.
// probePlaintext is 41 bytes, so its CBC-PAD ciphertext (48 bytes) is longer than the
// 32 bytes that tpm2-pkcs11's CKM_AES_CBC_PAD decrypt handles: the round trip at Open
// must meet that failure to choose the CKM_AES_CBC decrypt instead (mech.go).
var (
	probePlaintext = []byte("hwkms: CKR_GENERAL_ERROR self-check, 32B")
	probeAAD       = []byte("hwkms self-check")
)

// findAtOpen finds and checks the key (and its HMAC partner key, if any) on a pooled
// session and caches the handles. It releases the session and the module gate before
// it returns, so that the mechanism self-test can run on the pool.
func (k *KEK) findAtOpen(ctx context.Context, cfg Config) error {
	tok := k.tok
	s, err := k.pool.acquire(ctx)
	if err != nil {
		return err
	}
	tok.mod.gate.RLock()
	defer tok.mod.gate.RUnlock()
	gen := tok.mod.gen.Load()
	defer k.pool.release(s, gen)
	if err := k.pool.ready(s, gen); err != nil {
		return asTokenError(tok, err)
	}
	if cfg.Mechanism == MechanismRSAOAEP {
		priv, pub, ki, id, err := selectRSAKeys(tok.ctx, s.h, tok.label, cfg.KeyLabel, cfg.ckaID(), cfg.AllowExtractable)
		if err != nil {
			return asTokenError(tok, err)
		}
		k.id, k.ckaID, k.rsa, k.oaepHash = ki.KeyID, id, true, oaepSHA256
		k.macUnsafe = cfg.AllowExtractable
		k.keys, k.keyGen, k.keysOK = keyHandles{enc: pub, priv: priv}, gen, true
		return nil
	}
	h, ki, id, err := selectKey(tok.ctx, s.h, tok.label, cfg.KeyLabel, cfg.ckaID(), k.allowUnsafe)
	if err == nil && !cfg.AllowExtractable && !ki.Safe() {
		var ok bool
		if ok, err = replicaAcceptable(tok.ctx, s.h, h, ki); err == nil && !ok {
			err = fmt.Errorf("hsm: key %q on token %q refused: %s, and it is not a replicated key that allowReplicated accepts: %w",
				cfg.KeyLabel, tok.label, ki.unsafeReason(), ErrUnsafeKey)
		}
	}
	var mh pkcs11.ObjectHandle
	if err == nil {
		k.macUnsafe = cfg.AllowExtractable
		mh, err = selectMACKey(tok.ctx, s.h, tok.label, cfg.KeyLabel, id, k.macUnsafe)
	}
	if err != nil {
		if oe, ok := err.(opError); ok {
			return tokenError(tok, oe)
		}
		return err
	}
	k.id, k.ckaID = ki.KeyID, id
	k.keys, k.keyGen, k.keysOK = keyHandles{enc: h, mac: mh}, gen, true
	k.hasMAC = mh != 0
	k.kcv = checkValue(tok.ctx, s.h, h)
	if mh != 0 {
		k.macKCV = checkValue(tok.ctx, s.h, mh)
	}
	return nil
}

// checkValue reads CKA_CHECK_VALUE of a secret key (a short value derived from the
// key, such as the first 3 bytes of the encryption of a zero block, which does not
// reveal the key); nil if the token does not give one.
func checkValue(c p11, sh pkcs11.SessionHandle, h pkcs11.ObjectHandle) []byte {
	attrs, err := c.GetAttributeValue(sh, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CHECK_VALUE, nil)})
	if err != nil || len(attrs) != 1 || len(attrs[0].Value) == 0 {
		return nil
	}
	return bytes.Clone(attrs[0].Value)
}

// sameKey proves that keys, found again by label and CKA_ID, are the key material
// found at Open: their CKA_CHECK_VALUE (where the token gave one at Open) is the same,
// and they unwrap the probe body wrapped at Open (both keys of an aes-cbc-hmac key,
// the private key of an rsa-oaep key). A key that fails either is another key under
// the same name: the error wraps ErrKeyChanged and kek.ErrUnavailable. A device or
// session error of the probe is returned as such (the usual recovery). The caller
// holds keyMu and the module gate, and sh is its session.
func (k *KEK) sameKey(sh pkcs11.SessionHandle, keys keyHandles) error {
	c := k.tok.ctx
	for _, kc := range []struct {
		what string
		h    pkcs11.ObjectHandle
		want []byte
	}{{"AES key", keys.enc, k.kcv}, {"HMAC key", keys.mac, k.macKCV}} {
		if kc.want == nil || kc.h == 0 {
			continue
		}
		if got := checkValue(c, sh, kc.h); got != nil && !bytes.Equal(got, kc.want) {
			return k.keyChanged(fmt.Sprintf("the %s's CKA_CHECK_VALUE is %x, it was %x at Open", kc.what, got, kc.want))
		}
	}
	if k.probe == nil {
		return nil // Open has not finished: the key it found is the reference
	}
	ctx := context.WithValue(context.Background(), directKey{}, &directRun{c: c, sh: sh, keys: keys})
	do, err := k.unwrapFunc(ctx, k.probe, probeAAD)
	var pt []byte
	if err == nil {
		pt, err = do()
	}
	switch {
	case err == nil && bytes.Equal(pt, probePlaintext):
		return nil
	case err == nil:
		return k.keyChanged("it unwraps the probe body wrapped at Open to other bytes")
	case classify(err) != rvOther:
		return err
	}
	return k.keyChanged(fmt.Sprintf("it does not unwrap the probe body wrapped at Open (%v)", err))
}

// keyChanged is the error of sameKey. why never quotes key material.
func (k *KEK) keyChanged(why string) error {
	return fmt.Errorf("hsm: key %q (CKA_ID %x) on token %q was found again, but it is not the key opened: %s; another key has taken its label and CKA_ID (and so its key_id), and it is not used: restore the original key; a restart would adopt the new one under the same key_id, and data wrapped under the original could not be unwrapped with it: %w: %w",
		k.keyLabel, k.ckaID, k.tok.label, why, ErrKeyChanged, kek.ErrUnavailable)
}

// directRun, in a context under directKey, makes run call its op once, on this
// session with these handles, instead of taking a pooled session: sameKey uses it to
// run an unwrap on the session and the candidate handles of a re-find.
type directRun struct {
	c    p11
	sh   pkcs11.SessionHandle
	keys keyHandles
}

type directKey struct{}

// ID returns the key_id: KeyID(CKA_LABEL, CKA_ID) of the key. It is valid after Close.
func (k *KEK) ID() string { return k.id }

// Backend returns kek.BackendPKCS11.
func (k *KEK) Backend() kek.Backend { return kek.BackendPKCS11 }

// Wrap encrypts plaintext (1..kek.MaxPlaintext bytes) on the token with the KEK's
// mechanism (Mechanism) and aad as additional authenticated data, and returns a body
// whose first byte names its version and mechanism (doc.go, "Body formats"):
// 0x01 for aes-gcm, 0x02 for aes-gcm-token-iv, 0x03 for aes-cbc-hmac, 0x04 for
// rsa-oaep.
func (k *KEK) Wrap(ctx context.Context, plaintext, aad []byte) ([]byte, error) {
	if n := len(plaintext); n == 0 || n > kek.MaxPlaintext {
		return nil, fmt.Errorf("hsm: plaintext is %d bytes, want 1..%d: %w", n, kek.MaxPlaintext, kek.ErrInvalidInput)
	}
	leave, err := k.enter()
	if err != nil {
		return nil, err
	}
	defer leave()
	switch k.mech.name {
	case MechanismAESGCM:
		return k.wrapGCM(ctx, plaintext, aad)
	case MechanismAESGCMTokenIV:
		return k.wrapGCMTokenIV(ctx, plaintext, aad)
	case MechanismAESCBCHMAC:
		return k.wrapCBCHMAC(ctx, plaintext, aad)
	case MechanismRSAOAEP:
		return k.wrapRSAOAEP(ctx, plaintext, aad)
	}
	return nil, fmt.Errorf("hsm: key %q has no mechanism chosen: %w", k.keyLabel, ErrNoMechanism)
}

// wrapGCM makes a version 0x01 body: CKM_AES_GCM, a fresh random 12-byte IV from
// crypto/rand, aad as GCM additional data, a 128-bit tag: 0x01 | IV | ciphertext || tag.
func (k *KEK) wrapGCM(ctx context.Context, plaintext, aad []byte) ([]byte, error) {
	iv := make([]byte, gcmIVSize)
	if _, err := rand.Read(iv); err != nil {
		return nil, fmt.Errorf("hsm: generating IV: %w", err)
	}
	var ct []byte
	err := k.run(ctx, func(c p11, sh pkcs11.SessionHandle, keys keyHandles) error {
		params := pkcs11.NewGCMParams(iv, aad, gcmTagSize*8)
		defer params.Free()
		if err := c.EncryptInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}, keys.enc); err != nil {
			return opError{op: "C_EncryptInit", err: err}
		}
		// One C_Encrypt into plaintext+tag bytes: the NSS softoken's length query
		// leaves out the tag (rawcall.go).
		out, err := c.EncryptOnce(sh, plaintext, len(plaintext)+gcmTagSize)
		if err != nil {
			return opError{op: "C_Encrypt", err: err}
		}
		// Some tokens ignore the caller's IV and write their own back into the
		// parameters; a body carrying our IV would then never decrypt.
		if !bytes.Equal(params.IV(), iv) {
			return fmt.Errorf("hsm: token %q replaced the GCM IV; it needs mechanism %s (body version 0x02): %w", k.tok.label, MechanismAESGCMTokenIV, ErrIVNotKept)
		}
		ct = out
		return nil
	})
	if err != nil {
		return nil, err
	}
	if len(ct) != len(plaintext)+gcmTagSize {
		return nil, fmt.Errorf("hsm: C_Encrypt on token %q returned %d bytes for %d bytes of plaintext, want %d",
			k.tok.label, len(ct), len(plaintext), len(plaintext)+gcmTagSize)
	}
	body := make([]byte, 0, headerSize+len(ct))
	body = append(body, mechAESGCM)
	body = append(body, iv...)
	return append(body, ct...), nil
}

// Unwrap checks that body is a well-formed body of a known version (0x01, 0x02, 0x03
// or 0x04; the AES versions whatever the KEK's own AES mechanism: every version stays
// readable; 0x04 needs the KEK's RSA key), then decrypts
// it on the token with aad. A body that fails authentication (wrong key, aad or any
// changed bit; a bad GCM tag, a bad HMAC, bad CBC padding) returns an error wrapping
// kek.ErrInvalidCiphertext; tokens report a bad GCM tag as CKR_ENCRYPTED_DATA_INVALID,
// CKR_ENCRYPTED_DATA_LEN_RANGE, or (SoftHSM2) CKR_GENERAL_ERROR, which a round trip
// on the same key tells apart from a failing token.
func (k *KEK) Unwrap(ctx context.Context, body, aad []byte) ([]byte, error) {
	pt, err := k.unwrapOnce(ctx, body, aad)
	if err != nil && isRV(err, pkcs11.CKR_GENERAL_ERROR) && errors.Is(err, kek.ErrInvalidCiphertext) {
		if err := k.generalError(ctx, err); errors.Is(err, kek.ErrUnavailable) {
			return nil, err
		}
		// The device works: a one-off internal error gets one more try, a body that
		// does not authenticate fails again the same way.
		return k.unwrapOnce(ctx, body, aad)
	}
	return pt, err
}

// unwrapOnce is Unwrap without the CKR_GENERAL_ERROR self-check.
func (k *KEK) unwrapOnce(ctx context.Context, body, aad []byte) ([]byte, error) {
	do, err := k.unwrapFunc(ctx, body, aad)
	if err != nil {
		return nil, err
	}
	leave, err := k.enter()
	if err != nil {
		return nil, err
	}
	defer leave()
	return do()
}

// unwrapFunc checks body without touching the token and returns the function that
// unwraps it.
func (k *KEK) unwrapFunc(ctx context.Context, body, aad []byte) (func() ([]byte, error), error) {
	if len(body) == 0 {
		return nil, fmt.Errorf("hsm: body is empty: %w", kek.ErrInvalidCiphertext)
	}
	// Parse before touching the token: a malformed body never reaches it.
	if k.rsa && body[0] != mechRSAOAEP && body[0] <= mechAESCBCHMAC && body[0] != 0 {
		return nil, fmt.Errorf("hsm: body version 0x%02x needs an AES key, and key %q is an RSA key: %w", body[0], k.keyLabel, kek.ErrInvalidCiphertext)
	}
	var do func() ([]byte, error)
	switch body[0] {
	case mechAESGCM:
		if len(body) < minBody || len(body) > maxBody {
			return nil, fmt.Errorf("hsm: body version 0x01 is %d bytes, want %d..%d: %w", len(body), minBody, maxBody, kek.ErrInvalidCiphertext)
		}
		do = func() ([]byte, error) {
			return k.decryptGCM(ctx, pkcs11.CKM_AES_GCM, body[1:headerSize], body[headerSize:], aad)
		}
	case mechAESGCMTokenIV:
		mt, iv, ct, err := k.parseTokenIVBody(body)
		if err != nil {
			return nil, err
		}
		do = func() ([]byte, error) { return k.decryptGCM(ctx, mt, iv, ct, aad) }
	case mechAESCBCHMAC:
		if err := k.checkCBCBody(body); err != nil {
			return nil, err
		}
		do = func() ([]byte, error) { return k.unwrapCBCHMAC(ctx, body, aad) }
	case mechRSAOAEP:
		if err := k.checkRSABody(body); err != nil {
			return nil, err
		}
		do = func() ([]byte, error) { return k.unwrapRSAOAEP(ctx, body, aad) }
	default:
		return nil, fmt.Errorf("hsm: unknown body version 0x%02x: %w", body[0], kek.ErrInvalidCiphertext)
	}
	return do, nil
}

// decryptGCM decrypts ct (ciphertext || 16-byte tag) with GCM mechanism mt, iv and aad.
func (k *KEK) decryptGCM(ctx context.Context, mt uint, iv, ct, aad []byte) ([]byte, error) {
	var pt []byte
	err := k.run(ctx, func(c p11, sh pkcs11.SessionHandle, keys keyHandles) error {
		params := pkcs11.NewGCMParams(iv, aad, gcmTagSize*8)
		defer params.Free()
		if err := c.DecryptInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(mt, params)}, keys.enc); err != nil {
			return decryptInitError(k.tok, err)
		}
		out, err := c.Decrypt(sh, ct)
		if err != nil {
			if isRV(err, pkcs11.CKR_GENERAL_ERROR, pkcs11.CKR_ENCRYPTED_DATA_INVALID, pkcs11.CKR_ENCRYPTED_DATA_LEN_RANGE) {
				return fmt.Errorf("hsm: C_Decrypt on token %q: %w: %w", k.tok.label, kek.ErrInvalidCiphertext, err)
			}
			return opError{op: "C_Decrypt", err: err}
		}
		pt = out
		return nil
	})
	if err != nil {
		return nil, err
	}
	if len(pt) != len(ct)-gcmTagSize {
		return nil, fmt.Errorf("hsm: C_Decrypt on token %q returned %d bytes for %d bytes of ciphertext, want %d",
			k.tok.label, len(pt), len(ct), len(ct)-gcmTagSize)
	}
	return pt, nil
}

// generalError decides what CKR_GENERAL_ERROR from C_Decrypt meant. SoftHSM2 (and
// other tokens) answer it for a GCM tag that does not verify, but it is also how a
// token reports an internal failure. A round trip of a fixed plaintext on the same
// key tells them apart: if it works, the device is fine (err is returned; Unwrap then
// tries the body once more); if it fails, the device is at fault and the error says
// so, wrapping kek.ErrUnavailable and quoting the round trip's own failure (which
// went through the usual recovery).
func (k *KEK) generalError(ctx context.Context, err error) error {
	werr := k.selfTest(ctx)
	if werr == nil {
		return err
	}
	// werr as text only: it may wrap ErrInvalidCiphertext, which is not the verdict.
	return fmt.Errorf("hsm: C_Decrypt on token %q answered CKR_GENERAL_ERROR and a round trip on the same key then failed too, so the token is at fault, not the ciphertext: %w (%v)", k.tok.label, kek.ErrUnavailable, werr)
}

// selfTest wraps and unwraps probePlaintext with the KEK's mechanism and checks the
// result: nil means the token and the mechanism work with this key.
func (k *KEK) selfTest(ctx context.Context) error {
	_, err := k.roundTrip(ctx)
	return err
}

// roundTrip is selfTest, returning the body it wrapped when the round trip worked.
func (k *KEK) roundTrip(ctx context.Context) ([]byte, error) {
	body, err := k.Wrap(ctx, probePlaintext, probeAAD)
	if err != nil {
		return nil, err
	}
	got, err := k.unwrapOnce(ctx, body, probeAAD)
	if err != nil {
		return nil, err
	}
	if !bytes.Equal(got, probePlaintext) {
		return nil, errors.New("the self-check round trip returned other bytes")
	}
	return body, nil
}

// Close closes the KEK's sessions and releases its module and token references. It is
// idempotent: later calls return nil. Operations after Close return kek.ErrClosed.
func (k *KEK) Close() error {
	var err error
	k.closing.Do(func() {
		k.closed.Store(true)
		close(k.done) // wakes operations waiting for a session
		k.mu.Lock()   // waits for operations
		defer k.mu.Unlock()
		k.inflight.Wait() // and for device calls that outlived their operation's deadline
		err = errors.Join(k.pool.closeAll(), releaseToken(k.tok))
	})
	return err
}

// enter admits an operation unless the KEK is closed; call the returned func when done.
func (k *KEK) enter() (func(), error) {
	k.mu.RLock()
	if k.closed.Load() {
		k.mu.RUnlock()
		return nil, fmt.Errorf("hsm: key %q: %w", k.keyLabel, kek.ErrClosed)
	}
	return k.mu.RUnlock, nil
}

// keyHandles are the handles of the KEK's key objects: enc, the AES key, and, for
// aes-cbc-hmac keys, mac, the HMAC key (0 when the key has none); for rsa-oaep keys
// enc is the public and priv the private key.
type keyHandles struct {
	enc, mac pkcs11.ObjectHandle
	priv     pkcs11.ObjectHandle // rsa-oaep: the private key (enc is then the public key)
}

// opFunc runs one operation on a session with the key handles.
type opFunc func(c p11, sh pkcs11.SessionHandle, keys keyHandles) error

// run runs op on a pooled session, with the recovery described in doc.go: a lost
// session is dropped and op retried once on a fresh one; a stale key handle is refreshed
// and op retried once; a device-class error re-initialises the module (shared with every
// KEK on it, with backoff) and op is retried once. Errors come back with the token named
// and the right sentinel. run returns when ctx is done even if a device call hangs.
func (k *KEK) run(ctx context.Context, op opFunc) error {
	if d, ok := ctx.Value(directKey{}).(*directRun); ok {
		return k.wrapErr(op(d.c, d.sh, d.keys))
	}
	var r attemptResult
	for attempt := 0; attempt < 2; attempt++ {
		r = k.attempt(ctx, op)
		if r.class == rvOther || attempt == 1 {
			break
		}
		if r.class == rvDevice {
			if err := k.tok.mod.recoverDevice(ctx, k.tok, r.gen, r.err); err != nil {
				return errors.Join(k.wrapErr(r.err), err)
			}
		}
	}
	return k.wrapErr(r.err)
}

func (k *KEK) wrapErr(err error) error {
	if oe, ok := err.(opError); ok {
		return tokenError(k.tok, oe)
	}
	return err
}

// attemptResult is the outcome of one attempt: its error, the recovery class of that
// error and the module generation it ran in.
type attemptResult struct {
	err   error
	class rvClass
	gen   uint64
}

// attempt takes a session and runs op on it on a goroutine of its own (PKCS#11 calls
// cannot be interrupted), returning the goroutine's result or, if ctx ends first, an
// error wrapping ctx.Err(). The goroutine keeps the session until its calls return.
func (k *KEK) attempt(ctx context.Context, op opFunc) attemptResult {
	s, err := k.pool.acquire(ctx)
	if err != nil {
		if errors.Is(err, kek.ErrClosed) {
			err = fmt.Errorf("hsm: key %q: %w", k.keyLabel, err)
		}
		return attemptResult{err: err}
	}
	res := make(chan attemptResult, 1)
	k.inflight.Add(1)
	go func() {
		defer k.inflight.Done()
		res <- k.attemptOn(s, op)
	}()
	select {
	case r := <-res:
		return r
	case <-ctx.Done():
		return attemptResult{err: fmt.Errorf("hsm: token %q did not answer before the deadline (the call goes on in the background and its session is not reused until it returns): %w: %w",
			k.tok.label, kek.ErrUnavailable, ctx.Err())}
	}
}

// attemptOn runs op once on s, holding the module's gate, and releases s.
func (k *KEK) attemptOn(s *session, op opFunc) attemptResult {
	m := k.tok.mod
	if m.draining.Load() {
		k.pool.release(s, m.gen.Load())
		return attemptResult{err: fmt.Errorf("hsm: token %q: the module is being re-initialised: %w", k.tok.label, kek.ErrUnavailable)}
	}
	m.gate.RLock()
	defer m.gate.RUnlock()
	gen := m.gen.Load()
	defer k.pool.release(s, gen)
	if err, sticky := k.tok.status(); err != nil {
		if sticky {
			return attemptResult{err: err, gen: gen} // never retried automatically
		}
		return attemptResult{err: err, class: rvDevice, gen: gen}
	}
	if err := k.pool.ready(s, gen); err != nil {
		return attemptResult{err: err, class: classify(err), gen: gen}
	}
	keys, err := k.keyFor(s.h, gen, keyHandles{})
	if err != nil {
		return attemptResult{err: err, class: classify(err), gen: gen}
	}
	err = op(k.tok.ctx, s.h, keys)
	class := classify(err)
	switch class {
	case rvSession, rvDevice:
		s.broken = true
	case rvObject:
		if _, ferr := k.keyFor(s.h, gen, keys); ferr != nil {
			return attemptResult{err: ferr, class: classify(ferr), gen: gen}
		}
	}
	return attemptResult{err: err, class: class, gen: gen}
}

// keyFor returns the key handles for generation gen, finding the key (and its HMAC
// partner key) again when the cached handles are from an older generation or equal
// stale (after CKR_OBJECT_HANDLE_INVALID; the zero keyHandles means none is known
// stale). The search matches the label and the exact CKA_ID found at Open, and
// sameKey then proves that what it found is the key material found at Open: a
// different key that took the label and CKA_ID is refused (ErrKeyChanged), never used.
// Holding gate.
func (k *KEK) keyFor(sh pkcs11.SessionHandle, gen uint64, stale keyHandles) (keyHandles, error) {
	k.keyMu.Lock()
	defer k.keyMu.Unlock()
	if k.keysOK && k.keyGen == gen && (stale == keyHandles{} || k.keys != stale) {
		return k.keys, nil
	}
	if k.rsa {
		priv, pub, _, _, err := selectRSAKeys(k.tok.ctx, sh, k.tok.label, k.keyLabel, k.ckaID, k.macUnsafe)
		if err != nil {
			if classify(err) != rvOther {
				return keyHandles{}, err
			}
			return keyHandles{}, fmt.Errorf("hsm: handle of key %q on token %q went stale and the key could not be found again: %w: %w",
				k.keyLabel, k.tok.label, kek.ErrUnavailable, k.wrapErr(err))
		}
		if err := k.adopt(sh, gen, keyHandles{enc: pub, priv: priv}); err != nil {
			return keyHandles{}, err
		}
		return k.keys, nil
	}
	h, _, _, err := selectKey(k.tok.ctx, sh, k.tok.label, k.keyLabel, k.ckaID, k.allowUnsafe)
	var mh pkcs11.ObjectHandle
	if err == nil && k.hasMAC {
		mh, err = selectMACKey(k.tok.ctx, sh, k.tok.label, k.keyLabel, k.ckaID, k.macUnsafe)
		if err == nil && mh == 0 {
			err = fmt.Errorf("hsm: HMAC key labelled %q with CKA_ID %x: %w", k.keyLabel, k.ckaID, kek.ErrKeyNotFound)
		}
	}
	if err != nil {
		if classify(err) != rvOther {
			return keyHandles{}, err // a device or session error: recover as for any call
		}
		return keyHandles{}, fmt.Errorf("hsm: handle of key %q on token %q went stale and the key could not be found again: %w: %w",
			k.keyLabel, k.tok.label, kek.ErrUnavailable, k.wrapErr(err))
	}
	if err := k.adopt(sh, gen, keyHandles{enc: h, mac: mh}); err != nil {
		return keyHandles{}, err
	}
	return k.keys, nil
}

// adopt makes keys, found again in generation gen, the cached handles once sameKey
// proved them. A key that is not the same leaves no usable handles cached (keysOK
// false), so every operation finds and checks again. Holding keyMu and gate.
func (k *KEK) adopt(sh pkcs11.SessionHandle, gen uint64, keys keyHandles) error {
	if err := k.sameKey(sh, keys); err != nil {
		if classify(err) == rvOther {
			k.keysOK = false
		}
		return err
	}
	k.keys, k.keyGen, k.keysOK = keys, gen, true
	return nil
}
