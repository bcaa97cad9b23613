package tpm

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/hwkms/hwkms/plugin/kek"
)

// Errors of this package. Each is wrapped together with the plugin sentinel that
// decides the gRPC code and, where there is one, the TPM's own typed error
// (tpm2.TPMRC), so errors.Is and errors.As work on all of them.
var (
	// ErrPolicy means a sealed object's PCR policy is not satisfied: a selected PCR
	// no longer has the value it had at Wrap time (firmware, boot loader or Secure
	// Boot configuration changed). It is always wrapped together with
	// kek.ErrUnavailable: the body is authentic, this TPM state just cannot open
	// it. Recovery is described in doc.go.
	ErrPolicy = errors.New("tpm: PCR policy not satisfied")
	// ErrNotKEK means the object at the configured handle or in the blob file is not
	// an hwkms KEK (wrong type or attributes), or, after a reconnect, is not the same
	// KEK that Open found (its Name changed).
	ErrNotKEK = errors.New("tpm: object is not the configured hwkms KEK")
)

// errDesync marks an error from go-tpm that is neither a TPM response code nor a
// transport failure (response parsing, response HMAC check): our view of the
// session nonces can no longer be trusted, so the connection is rebuilt.
var errDesync = errors.New("tpm session state lost")

const (
	nonceSize = 16
	// cleanupTimeout bounds best-effort flushes on error paths and in Close.
	cleanupTimeout = 2 * time.Second
)

var _ kek.KEK = (*KEK)(nil)

// KEK is a key-encryption key held in a TPM 2.0: a restricted-decrypt storage key
// under which Wrap seals each plaintext as a sealed-data object (see doc.go).
//
// A KEK owns one connection to the TPM and serialises every command on it; it is
// safe for concurrent use. Each call waits for the connection no longer than its
// ctx allows. When the connection or the TPM's state is lost (TPM or swtpm
// restart), the next call reconnects, runs TPM2_Startup if needed, reloads the KEK
// and recreates the sessions; calls fail with an error wrapping
// kek.ErrUnavailable until that succeeds. Close flushes every transient handle
// and session the KEK created and is idempotent; every method after Close returns
// an error wrapping kek.ErrClosed.
type KEK struct {
	// Immutable after Open.
	dev        device
	auth       []byte // KEK auth value; never logged or put in an error
	pcrs       []uint
	persistent tpm2.TPMHandle // 0 for the blob form
	blobPub    []byte         // TPMT_PUBLIC of the KEK (blob form)
	blobPriv   []byte         // TPM2B_PRIVATE contents of the KEK (blob form)
	name       []byte         // the KEK's TPM Name, pinned at Open
	imported   bool           // an imported KEK (importkey.go): sealed objects have fixedTPM clear
	id         string

	closed     atomic.Bool
	reconnects atomic.Uint64 // successful connects after Open's
	line       *line         // shared connection on a TPM without a resource manager (line.go); nil on /dev/tpmrm*
	sem        chan struct{} // held while using the connection and the fields below; line.sem if line is set

	c            *conn
	kek          tpm2.TPMHandle // loaded KEK: the persistent handle or a transient one
	kekTransient bool
	kekPub       tpm2.TPMTPublic
	sIn          tpm2.Session // salted HMAC, AES-128-CFB command encryption, KEK auth
	sOut         tpm2.Session // salted HMAC, AES-128-CFB response encryption, KEK auth
	sPol         tpm2.Session // salted policy session, AES-128-CFB response encryption (PCR mode)
	needReset    bool         // a cleanup failed: rebuild the connection after this call
}

// Open connects to the TPM in cfg, loads the KEK (a persistent handle, or a blob
// file loaded under the owner SRK), and starts the KEK's salted sessions. On a TPM
// without a resource manager (anything but /dev/tpmrm*) it first flushes every
// transient object and session left by earlier processes.
func Open(ctx context.Context, cfg Config) (*KEK, error) {
	if err := cfg.Validate("tpm"); err != nil {
		return nil, err
	}
	dev, _ := parseDevice(cfg.Device)
	pcrs, _ := pcrList(cfg.PCRs)
	auth, err := readAuth(cfg.AuthFile)
	if err != nil {
		return nil, err
	}
	k := &KEK{dev: dev, auth: auth, pcrs: pcrs, sem: make(chan struct{}, 1)}
	if !dev.rm {
		k.line = acquireLine(dev)
		k.sem = k.line.sem
	}
	if cfg.PersistentHandle != "" {
		k.persistent, _ = parseHandle(cfg.PersistentHandle)
	} else {
		pub, pubBytes, priv, err := readBlobFile(cfg.BlobFile)
		if err == nil {
			k.blobPub, k.blobPriv = pubBytes, priv
			if k.name, err = objectName(pub); err != nil {
				err = fmt.Errorf("tpm: blobFile %s: %w: %w", cfg.BlobFile, ErrNotKEK, err)
			}
		}
		if err != nil {
			k.abandon()
			return nil, err
		}
	}
	if err := k.openConnect(ctx); err != nil {
		k.abandon()
		return nil, fmt.Errorf("tpm: open %s: %w", dev, err)
	}
	k.id = keyID(k.name)
	k.imported = isImportedKEK(&k.kekPub)
	if err := k.selfTest(ctx); err != nil {
		k.Close()
		return nil, fmt.Errorf("tpm: open %s: self-test: %w", dev, err)
	}
	return k, nil
}

// openConnect is Open's first connect, under the semaphore: on a shared line another
// KEK may be using the TPM.
func (k *KEK) openConnect(ctx context.Context) error {
	select {
	case k.sem <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("waiting for the TPM: %w: %w", kek.ErrUnavailable, ctx.Err())
	}
	defer func() { <-k.sem }()
	_, err := k.connect(ctx)
	return err
}

// abandon releases what a failed Open holds: the auth value and its line reference.
func (k *KEK) abandon() {
	clear(k.auth)
	if k.line != nil {
		k.sem <- struct{}{}
		releaseLine(k.line)
		<-k.sem
	}
}

// selfTest wraps and unwraps a random value, so that a wrong auth value, an
// unusable PCR bank or a broken session fails Open rather than the first request.
func (k *KEK) selfTest(ctx context.Context) error {
	var probe [32]byte
	if _, err := rand.Read(probe[:]); err != nil {
		return err
	}
	aad := []byte("hwkms tpm self-test")
	body, err := k.Wrap(ctx, probe[:], aad)
	if err != nil {
		return err
	}
	got, err := k.Unwrap(ctx, body, aad)
	if err != nil {
		return err
	}
	defer clear(got)
	if subtle.ConstantTimeCompare(got, probe[:]) != 1 {
		return errors.New("unwrapped value differs")
	}
	return nil
}

func keyID(name []byte) string { return "tpm:" + hex.EncodeToString(name) }

// ID returns "tpm:" followed by the lowercase hex TPM Name of the KEK (nameAlg
// 0x000b || SHA-256 of its public area): stable across restarts, unique per key.
func (k *KEK) ID() string { return k.id }

// Backend returns kek.BackendTPM.
func (k *KEK) Backend() kek.Backend { return kek.BackendTPM }

// Wrap seals SHA-256(aad) || plaintext in a new sealed-data object under the KEK
// (TPM2_Create, Part 3 section 12.1), with the command's sensitive parameter
// encrypted by the salted session, and returns the body described in doc.go.
// plaintext must be 1..kek.MaxPlaintext bytes.
func (k *KEK) Wrap(ctx context.Context, plaintext, aad []byte) ([]byte, error) {
	if len(plaintext) == 0 || len(plaintext) > kek.MaxPlaintext {
		return nil, fmt.Errorf("tpm: wrap: %w: plaintext is %d bytes, want 1..%d", kek.ErrInvalidInput, len(plaintext), kek.MaxPlaintext)
	}
	digest := sha256.Sum256(aad)
	sealed := make([]byte, 0, len(digest)+len(plaintext))
	sealed = append(append(sealed, digest[:]...), plaintext...)
	defer clear(sealed)
	var body []byte
	err := k.do(ctx, "wrap", func() error {
		var err error
		body, err = k.wrapLocked(sealed)
		return err
	})
	return body, err
}

func (k *KEK) wrapLocked(sealed []byte) ([]byte, error) {
	var policy []byte
	userAuth := k.auth
	if len(k.pcrs) > 0 {
		var err error
		if policy, err = k.pcrPolicy(); err != nil {
			return nil, fmt.Errorf("tpm: wrap: read PCRs: %w: %w", kek.ErrUnavailable, err)
		}
		userAuth = nil // policy-only object
	}
	rsp, err := tpm2.Create{
		ParentHandle: tpm2.AuthHandle{Handle: k.kek, Name: tpm2.TPM2BName{Buffer: k.name}, Auth: k.sIn},
		InSensitive: tpm2.TPM2BSensitiveCreate{Sensitive: &tpm2.TPMSSensitiveCreate{
			UserAuth: tpm2.TPM2BAuth{Buffer: userAuth},
			Data:     tpm2.NewTPMUSensitiveCreate(&tpm2.TPM2BSensitiveData{Buffer: sealed}),
		}},
		InPublic: tpm2.New2B(sealedTemplateFor(policy, k.imported)),
	}.Execute(k.c)
	if err != nil {
		return nil, fmt.Errorf("tpm: wrap: TPM2_Create: %w: %w", kek.ErrUnavailable, tpmCall(err))
	}
	body, err := encodeObject(bodyV1, rsp.OutPublic.Bytes(), rsp.OutPrivate.Buffer)
	if err != nil {
		return nil, fmt.Errorf("tpm: wrap: %w", err)
	}
	// Never hand out a body that Unwrap would refuse.
	pub, _, _, err := decodeObject(bodyV1, body)
	if err == nil {
		err = checkSealedPublicFor(pub, k.imported)
	}
	if err != nil {
		return nil, fmt.Errorf("tpm: wrap: TPM returned an unexpected object: %w", err)
	}
	return body, nil
}

// Unwrap parses body strictly, loads it under the KEK (TPM2_Load, Part 3 section
// 12.2; the TPM checks the private area's integrity HMAC and that it was made under
// this KEK), unseals it (TPM2_Unseal, section 12.7) with the response encrypted by
// the salted session (or, for a PCR-policy object, a salted policy session running
// TPM2_PolicyPCR), flushes it, and checks SHA-256(aad) in constant time.
// A malformed, tampered or foreign body or a wrong aad gives an error wrapping
// kek.ErrInvalidCiphertext; an unsatisfied PCR policy gives ErrPolicy.
func (k *KEK) Unwrap(ctx context.Context, body, aad []byte) ([]byte, error) {
	pub, pubBytes, priv, err := decodeObject(bodyV1, body)
	if err == nil {
		err = checkSealedPublicFor(pub, k.imported)
	}
	if err != nil {
		return nil, fmt.Errorf("tpm: unwrap: %w: %w", kek.ErrInvalidCiphertext, err)
	}
	name, err := objectName(pub)
	if err != nil {
		return nil, fmt.Errorf("tpm: unwrap: %w: %w", kek.ErrInvalidCiphertext, err)
	}
	var data []byte
	err = k.do(ctx, "unwrap", func() error {
		var err error
		data, err = k.unwrapLocked(pub, pubBytes, priv, name)
		return err
	})
	if err != nil {
		return nil, err
	}
	defer clear(data)
	digest := sha256.Sum256(aad)
	if len(data) <= len(digest) || len(data) > len(digest)+kek.MaxPlaintext ||
		subtle.ConstantTimeCompare(data[:len(digest)], digest[:]) != 1 {
		return nil, fmt.Errorf("tpm: unwrap: %w: aad does not match", kek.ErrInvalidCiphertext)
	}
	return bytes.Clone(data[len(digest):]), nil
}

func (k *KEK) unwrapLocked(pub *tpm2.TPMTPublic, pubBytes, priv, name []byte) ([]byte, error) {
	lr, err := tpm2.Load{
		ParentHandle: tpm2.AuthHandle{Handle: k.kek, Name: tpm2.TPM2BName{Buffer: k.name}, Auth: k.sOut},
		InPrivate:    tpm2.TPM2BPrivate{Buffer: priv},
		InPublic:     tpm2.BytesAs2B[tpm2.TPMTPublic](pubBytes),
	}.Execute(k.c)
	if err != nil {
		err = tpmCall(err)
		if loadRejectsBody(err) {
			return nil, fmt.Errorf("tpm: unwrap: TPM2_Load: %w: %w", kek.ErrInvalidCiphertext, err)
		}
		return nil, fmt.Errorf("tpm: unwrap: TPM2_Load: %w: %w", kek.ErrUnavailable, err)
	}
	defer k.flush(lr.ObjectHandle)
	if !bytes.Equal(lr.Name.Buffer, name) {
		k.needReset = true
		return nil, fmt.Errorf("tpm: unwrap: TPM2_Load returned an unexpected Name: %w", kek.ErrUnavailable)
	}
	item := tpm2.TPM2BName{Buffer: name}
	var rsp *tpm2.UnsealResponse
	if pub.ObjectAttributes.UserWithAuth {
		rsp, err = tpm2.Unseal{ItemHandle: tpm2.AuthHandle{Handle: lr.ObjectHandle, Name: item, Auth: k.sOut}}.Execute(k.c)
	} else {
		rsp, err = k.unsealPolicy(lr.ObjectHandle, item)
	}
	if err != nil {
		err = tpmCall(err)
		switch {
		case errors.Is(err, ErrPolicy), errors.Is(err, tpm2.TPMRCPolicyFail), errors.Is(err, tpm2.TPMRCPCRChanged):
			return nil, fmt.Errorf("tpm: unwrap: TPM2_Unseal: %w: %w: %w", ErrPolicy, kek.ErrUnavailable, err)
		case errors.Is(err, tpm2.TPMRCAuthFail), errors.Is(err, tpm2.TPMRCBadAuth):
			// Loaded under our KEK but made with another auth value: not ours.
			return nil, fmt.Errorf("tpm: unwrap: TPM2_Unseal: %w: %w", kek.ErrInvalidCiphertext, err)
		}
		return nil, fmt.Errorf("tpm: unwrap: TPM2_Unseal: %w: %w", kek.ErrUnavailable, err)
	}
	return rsp.OutData.Buffer, nil
}

// loadRejectsBody reports whether a TPM2_Load error is about the object given
// (integrity, size, attributes, ...: a format-1 error on a parameter) rather than
// about the TPM or the parent.
func loadRejectsBody(err error) bool {
	if errors.Is(err, tpm2.TPMRCIntegrity) {
		return true
	}
	var fmt1 tpm2.TPMFmt1Error
	if errors.As(err, &fmt1) {
		isParam, _ := fmt1.Parameter()
		return isParam
	}
	return false
}

// unsealPolicy satisfies a PCR-policy object's authPolicy with TPM2_PolicyPCR
// (Part 3 section 23.7) over the configured PCRs and unseals it. The policy session
// is reused (the TPM resets its policy digest after each successful use) and
// dropped after any failure.
func (k *KEK) unsealPolicy(item tpm2.TPMHandle, name tpm2.TPM2BName) (_ *tpm2.UnsealResponse, err error) {
	if len(k.pcrs) == 0 {
		return nil, fmt.Errorf("%w: the object is sealed under a PCR policy and this key's config selects no pcrs", ErrPolicy)
	}
	if k.sPol == nil {
		s, _, err := tpm2.PolicySession(k.c, tpm2.TPMAlgSHA256, nonceSize,
			tpm2.Salted(k.kek, k.kekPub), tpm2.AESEncryption(128, tpm2.EncryptOut))
		if err != nil {
			return nil, fmt.Errorf("start policy session: %w", tpmCall(err))
		}
		k.sPol = s
	}
	defer func() {
		if err != nil {
			k.dropPolicySession()
		}
	}()
	if _, err := (tpm2.PolicyPCR{PolicySession: k.sPol.Handle(), Pcrs: k.pcrSelection()}).Execute(k.c); err != nil {
		return nil, fmt.Errorf("TPM2_PolicyPCR: %w", tpmCall(err))
	}
	return tpm2.Unseal{ItemHandle: tpm2.AuthHandle{Handle: item, Name: name, Auth: k.sPol}}.Execute(k.c)
}

func (k *KEK) dropPolicySession() {
	if k.sPol == nil {
		return
	}
	h := k.sPol.Handle()
	k.sPol = nil
	if h != tpm2.TPMRHNull {
		k.flush(h)
	}
}

func (k *KEK) pcrSelection() tpm2.TPMLPCRSelection {
	return tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{
		Hash:      tpm2.TPMAlgSHA256,
		PCRSelect: tpm2.PCClientCompatible.PCRs(k.pcrs...),
	}}}
}

// pcrPolicy reads the selected SHA-256 PCRs and returns the policy digest of
// TPM2_PolicyPCR over their current values (Part 3 section 23.7):
// H(0^32 || TPM_CC_PolicyPCR || TPML_PCR_SELECTION || H(PCR values in index order)).
func (k *KEK) pcrPolicy() ([]byte, error) {
	sel := k.pcrSelection()
	rsp, err := tpm2.PCRRead{PCRSelectionIn: sel}.Execute(k.c)
	if err != nil {
		return nil, tpmCall(err)
	}
	if !bytes.Equal(tpm2.Marshal(rsp.PCRSelectionOut), tpm2.Marshal(sel)) || len(rsp.PCRValues.Digests) != len(k.pcrs) {
		return nil, errors.New("the TPM did not return every selected SHA-256 PCR (is the SHA-256 bank allocated?)")
	}
	h := sha256.New()
	for _, d := range rsp.PCRValues.Digests {
		if len(d.Buffer) != sha256.Size {
			return nil, errors.New("PCR value is not a SHA-256 digest")
		}
		h.Write(d.Buffer)
	}
	calc, err := tpm2.NewPolicyCalculator(tpm2.TPMAlgSHA256)
	if err != nil {
		return nil, err
	}
	if err := (tpm2.PolicyPCR{PcrDigest: tpm2.TPM2BDigest{Buffer: h.Sum(nil)}, Pcrs: sel}).Update(calc); err != nil {
		return nil, err
	}
	return calc.Hash().Digest, nil
}

// Close flushes the sessions and the transient KEK this KEK created and closes the
// connection. It waits for a call in progress. Idempotent.
func (k *KEK) Close() error {
	k.sem <- struct{}{}
	defer func() { <-k.sem }()
	if k.closed.Swap(true) {
		return nil
	}
	var err error
	if k.line == nil {
		err = k.teardown()
	} else {
		if k.line.owner == k {
			if err = k.flushOwn(); err != nil {
				k.line.drop()
			} else {
				k.forget()
				k.line.owner = nil
			}
		}
		err = errors.Join(err, releaseLine(k.line))
	}
	clear(k.auth)
	return err
}

// do runs fn with the connection held, connecting first if needed. When fn fails
// because the connection or the TPM's state was lost, the connection is dropped
// and fn is retried once on a fresh one, within ctx.
func (k *KEK) do(ctx context.Context, op string, fn func() error) error {
	if k.closed.Load() {
		return fmt.Errorf("tpm: %s: %w", op, kek.ErrClosed)
	}
	select {
	case k.sem <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("tpm: %s: waiting for the TPM: %w: %w", op, kek.ErrUnavailable, ctx.Err())
	}
	defer func() { <-k.sem }()
	if k.closed.Load() {
		return fmt.Errorf("tpm: %s: %w", op, kek.ErrClosed)
	}
	for attempt := 0; ; attempt++ {
		if k.c == nil {
			dialed, err := k.connect(ctx)
			if err != nil {
				return fmt.Errorf("tpm: %s: reconnect %s: %w: %w", op, k.dev, kek.ErrUnavailable, err)
			}
			if dialed {
				k.reconnects.Add(1)
			}
		}
		k.c.ctx = ctx
		err := fn()
		if k.c != nil {
			k.c.ctx = nil
		}
		reset := k.needReset || needsReset(err)
		if !reset {
			return err
		}
		k.teardown()
		if err == nil || attempt > 0 || ctx.Err() != nil {
			return err
		}
	}
}

// needsReset reports whether err means the connection or the TPM's state (loaded
// KEK, sessions) is gone: transport failure, TPM not started (TPM_RC_INITIALIZE, as
// after a TPM or swtpm restart), a handle or session that no longer exists, a full
// object or session memory, or a desynchronised session.
func needsReset(err error) bool {
	if err == nil {
		return false
	}
	if errors.Is(err, errTransport) || errors.Is(err, errDesync) {
		return true
	}
	var rc tpm2.TPMRC
	if !errors.As(err, &rc) {
		return false
	}
	switch {
	case errors.Is(rc, tpm2.TPMRCInitialize),
		errors.Is(rc, tpm2.TPMRCObjectMemory),
		errors.Is(rc, tpm2.TPMRCSessionMemory),
		rc >= tpm2.TPMRCReferenceH0 && rc <= tpm2.TPMRCReferenceS0+6:
		return true
	}
	var fmt1 tpm2.TPMFmt1Error
	if errors.As(rc, &fmt1) && errors.Is(rc, tpm2.TPMRCHandle) {
		return true
	}
	return false
}

// tpmCall passes TPM response codes and transport errors through and marks any
// other go-tpm error (response parsing, response HMAC mismatch) as errDesync.
func tpmCall(err error) error {
	if err == nil {
		return nil
	}
	var rc tpm2.TPMRC
	if errors.As(err, &rc) || errors.Is(err, errTransport) || errors.Is(err, errDesync) {
		return err
	}
	return fmt.Errorf("%w: %w", errDesync, err)
}

// connect makes the KEK usable: it opens the transport (on a shared line, only if
// the line has none; then it evicts the line's owner instead), starts the TPM if
// needed, flushes leftovers when no resource manager is present, loads the KEK and
// starts the sessions. dialed reports whether a new connection was opened. On
// failure everything it created is released.
func (k *KEK) connect(ctx context.Context) (dialed bool, err error) {
	c, dialed, err := k.attach(ctx)
	if err != nil {
		return dialed, err
	}
	k.c = c
	if k.line != nil {
		k.line.owner = k
	}
	defer func() {
		if err != nil {
			k.teardown()
		}
	}()
	if err := k.loadKEK(); err != nil {
		return dialed, err
	}
	k.sIn, err = k.startSession(tpm2.AESEncryption(128, tpm2.EncryptIn))
	if err != nil {
		return dialed, err
	}
	k.sOut, err = k.startSession(tpm2.AESEncryption(128, tpm2.EncryptOut))
	if err != nil {
		return dialed, err
	}
	k.c.ctx = nil
	return dialed, nil
}

// attach returns a started connection with no other KEK's state loaded: the shared
// line's (after evicting its owner), or a new one.
func (k *KEK) attach(ctx context.Context) (c *conn, dialed bool, err error) {
	if k.line != nil {
		k.line.evict(k)
		if k.line.c != nil && k.line.c.dead {
			k.line.drop()
		}
		if k.line.c != nil {
			k.line.c.ctx = ctx
			return k.line.c, false, nil
		}
	}
	if c, err = dial(ctx, k.dev); err != nil {
		return nil, false, err
	}
	if err := startup(c); err != nil {
		c.Close()
		return nil, false, err
	}
	if !k.dev.rm {
		if err := flushAll(c); err != nil {
			c.Close()
			return nil, false, fmt.Errorf("flush leftover handles: %w", err)
		}
	}
	if k.line != nil {
		k.line.c = c
	}
	return c, true, nil
}

// startSession starts a reusable HMAC session salted with the KEK's public key, with
// the given AES-128-CFB parameter encryption and the KEK's auth value.
func (k *KEK) startSession(encryption tpm2.AuthOption) (tpm2.Session, error) {
	s, _, err := tpm2.HMACSession(k.c, tpm2.TPMAlgSHA256, nonceSize,
		tpm2.Salted(k.kek, k.kekPub), encryption, tpm2.Auth(k.auth))
	if err != nil {
		return nil, fmt.Errorf("start salted session: %w", tpmCall(err))
	}
	return s, nil
}

// loadKEK makes the KEK usable: reads and checks the persistent object, or loads the
// blob under the SRK. The KEK's Name must equal the one pinned at Open.
func (k *KEK) loadKEK() error {
	if k.persistent != 0 {
		pub, name, err := readKEKPublic(k.c, k.persistent)
		if err != nil {
			return err
		}
		if k.name != nil && !bytes.Equal(name, k.name) {
			return fmt.Errorf("%w: the object at 0x%08x has a different Name than at Open", ErrNotKEK, uint32(k.persistent))
		}
		k.kek, k.kekPub, k.name = k.persistent, *pub, name
		return nil
	}
	pub, err := safeUnmarshalPublic(k.blobPub)
	if err != nil {
		return err
	}
	h, err := loadUnderSRK(k.c, k.blobPub, k.blobPriv, k.name)
	if err != nil {
		return err
	}
	k.kek, k.kekTransient, k.kekPub = h, true, *pub
	return nil
}

// teardown flushes what this KEK created (best effort, bounded by cleanupTimeout)
// and closes the connection (on a shared line, the line's: the TPM's state is in
// doubt and the next user redials and flushes leftovers).
func (k *KEK) teardown() error {
	c := k.c
	if c == nil {
		return nil
	}
	err := k.flushOwn()
	if k.line != nil {
		return errors.Join(err, k.line.drop())
	}
	err = errors.Join(err, c.Close())
	k.forget()
	return err
}

// flushOwn flushes the sessions and the transient KEK this KEK loaded, best effort
// and bounded by cleanupTimeout; the connection stays open.
func (k *KEK) flushOwn() error {
	c := k.c
	if c == nil || c.dead {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
	defer cancel()
	c.ctx = ctx
	defer func() { c.ctx = nil }()
	var errs []error
	for _, s := range []tpm2.Session{k.sIn, k.sOut, k.sPol} {
		if s != nil && s.Handle() != tpm2.TPMRHNull {
			errs = append(errs, flushHandle(c, s.Handle()))
		}
	}
	if k.kekTransient && k.kek != 0 {
		errs = append(errs, flushHandle(c, k.kek))
	}
	return errors.Join(errs...)
}

// forget drops the KEK's connection state without touching the TPM.
func (k *KEK) forget() {
	k.c, k.kek, k.kekTransient, k.sIn, k.sOut, k.sPol, k.needReset = nil, 0, false, nil, nil, nil, false
}

// flush flushes a transient handle or session now; on failure the connection is
// rebuilt after the current call so nothing stays loaded.
func (k *KEK) flush(h tpm2.TPMHandle) {
	if err := flushHandle(k.c, h); err != nil {
		k.needReset = true
	}
}

func flushHandle(c *conn, h tpm2.TPMHandle) error {
	if _, err := (tpm2.FlushContext{FlushHandle: h}).Execute(c); err != nil {
		return fmt.Errorf("TPM2_FlushContext(0x%08x): %w", uint32(h), err)
	}
	return nil
}

// startup sends a cheap command and runs TPM2_Startup(CLEAR) when the TPM answers
// TPM_RC_INITIALIZE (powered on but not started, e.g. a fresh simulator).
func startup(c *conn) error {
	_, err := tpm2.GetCapability{Capability: tpm2.TPMCapTPMProperties, Property: uint32(tpm2.TPMPTManufacturer), PropertyCount: 1}.Execute(c)
	if errors.Is(err, tpm2.TPMRCInitialize) {
		_, err = tpm2.Startup{StartupType: tpm2.TPMSUClear}.Execute(c)
	}
	if err != nil {
		return fmt.Errorf("TPM not usable: %w", err)
	}
	return nil
}

// listHandles returns the handles of one type currently in the TPM (Part 3 section
// 30.2, TPM_CAP_HANDLES): TPM_HT_TRANSIENT objects, or sessions with
// TPM_HT_LOADED_SESSION (0x02) / TPM_HT_SAVED_SESSION (0x03). A session query
// returns HMAC (0x02xxxxxx) and policy (0x03xxxxxx) session handles alike.
func listHandles(c *conn, ht tpm2.TPMHT) ([]tpm2.TPMHandle, error) {
	session := ht == tpm2.TPMHTHMACSession || ht == tpm2.TPMHTPolicySession
	var out []tpm2.TPMHandle
	next := uint32(ht) << 24
	for {
		rsp, err := tpm2.GetCapability{Capability: tpm2.TPMCapHandles, Property: next, PropertyCount: 64}.Execute(c)
		if err != nil {
			return nil, err
		}
		hs, err := rsp.CapabilityData.Data.Handles()
		if err != nil {
			return nil, err
		}
		for _, h := range hs.Handle {
			top := tpm2.TPMHT(uint32(h) >> 24)
			if top != ht && !(session && (top == tpm2.TPMHTHMACSession || top == tpm2.TPMHTPolicySession)) {
				return out, nil
			}
			out = append(out, h)
		}
		if !rsp.MoreData || len(hs.Handle) == 0 {
			return out, nil
		}
		next = uint32(ht)<<24 | (uint32(hs.Handle[len(hs.Handle)-1])&0x00ffffff + 1)
	}
}

// flushAll flushes every transient object and every loaded or saved session. Only
// used when no resource manager is present, where hwkms is the TPM's only user and
// anything left over belongs to an earlier hwkms process.
func flushAll(c *conn) error {
	for _, ht := range []tpm2.TPMHT{tpm2.TPMHTTransient, tpm2.TPMHTHMACSession, tpm2.TPMHTPolicySession} {
		hs, err := listHandles(c, ht)
		if err != nil {
			return err
		}
		for _, h := range hs {
			if err := flushHandle(c, h); err != nil && !errors.Is(err, tpm2.TPMRCHandle) {
				return err
			}
		}
	}
	return nil
}

// readBlobFile reads and checks a KEK blob file.
func readBlobFile(path string) (pub *tpm2.TPMTPublic, pubBytes, priv []byte, err error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil, nil, fmt.Errorf("tpm: blobFile %s: %w", path, kek.ErrKeyNotFound)
	}
	if err != nil {
		return nil, nil, nil, fmt.Errorf("tpm: blobFile: %w", err)
	}
	pub, pubBytes, priv, err = decodeObject(blobV1, b)
	if err == nil {
		err = checkKEKPublic(pub)
	}
	if err != nil {
		return nil, nil, nil, fmt.Errorf("tpm: blobFile %s: %w: %w", path, ErrNotKEK, err)
	}
	return pub, pubBytes, priv, nil
}
