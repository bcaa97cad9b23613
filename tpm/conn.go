package tpm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/tpm/internal/wire"
)

// do runs fn with the connection held, connecting first if needed. When fn fails
// because the connection or the TPM's state was lost, the connection is dropped
// and fn is retried once on a fresh one, within ctx.
func (k *KEK) do(ctx context.Context, op string, fn func() error) error {
	if k.closed.Load() {
		return fmt.Errorf("tpm: %s: %w", op, kek.ErrClosed)
	}
	ahead := k.adm.enter()
	defer k.adm.leave()
	if err := k.adm.check(ctx, ahead, false); err != nil {
		return fmt.Errorf("tpm: %s: %w", op, err)
	}
	select {
	case k.sem <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("tpm: %s: waiting for the TPM: %w: %w", op, kek.ErrUnavailable, ctx.Err())
	}
	// Checked again with the TPM held: a command cut off by its deadline drops the
	// connection, and the reconnect costs every queued call far more than one call.
	if err := k.adm.check(ctx, 0, true); err != nil {
		<-k.sem
		return fmt.Errorf("tpm: %s: %w", op, err)
	}
	held := time.Now()
	reconnected := false
	defer func() {
		if !reconnected {
			k.adm.observe(time.Since(held))
		}
		<-k.sem
	}()
	if k.closed.Load() {
		return fmt.Errorf("tpm: %s: %w", op, kek.ErrClosed)
	}
	for attempt := 0; ; attempt++ {
		if k.c == nil {
			reconnected = true
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
		k.teardown(ctx)
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
			k.teardown(ctx)
		}
	}()
	// A KEK of kind hmac needs the SRK twice (its parent, and the salt of its
	// session, hmac.go): create it once, flush it once the session is started, or
	// here on failure (before the teardown above).
	var srk *primaryObject
	if k.hmac {
		s, err := createSRK(k.c, k.srkPin)
		if err != nil {
			return dialed, err
		}
		srk = &s
		defer func() {
			if srk != nil {
				flushHandle(k.c, srk.Handle)
			}
		}()
	}
	if err := k.loadKEK(srk); err != nil {
		return dialed, err
	}
	if err := checkKEKKind(&k.kekPub, map[bool]string{false: KindSealed, true: KindHMAC}[k.hmac]); err != nil {
		return dialed, fmt.Errorf("%w: %w", ErrNotKEK, err)
	}
	if k.hmac {
		// A keyed-hash key cannot salt a session: salt with the SRK (hmac.go).
		if err := k.startHMACSession(*srk); err != nil {
			return dialed, err
		}
		h := srk.Handle
		srk = nil
		if err := flushHandle(k.c, h); err != nil {
			return dialed, tpmCall(err)
		}
	} else {
		k.sIn, err = k.startSession(tpm2.AESEncryption(128, tpm2.EncryptIn))
		if err != nil {
			return dialed, err
		}
		k.sOut, err = k.startSession(tpm2.AESEncryption(128, tpm2.EncryptOut))
		if err != nil {
			return dialed, err
		}
	}
	k.c.ctx = nil
	return dialed, nil
}

// attach returns a started connection with no other KEK's state loaded: the shared
// line's (after evicting its owner), or a new one.
func (k *KEK) attach(ctx context.Context) (c *conn, dialed bool, err error) {
	if k.line != nil {
		k.line.evict(ctx, k)
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
// blob under the SRK (srk if given, else one created and flushed here). The KEK's Name must equal the one pinned at Open.
func (k *KEK) loadKEK(srk *primaryObject) error {
	if k.persistent != 0 {
		pub, name, err := readKEKPublic(k.c, k.persistent)
		if err != nil {
			return err
		}
		if k.name != nil && !bytes.Equal(name, k.name) {
			by := "Open found"
			if k.idPinned {
				by = "the config's keyID pins"
			}
			return checkPinned(name, k.name, fmt.Sprintf("persistent handle 0x%08x", uint32(k.persistent)), by)
		}
		k.kek, k.kekPub, k.name = k.persistent, *pub, name
		return nil
	}
	pub, err := wire.SafeUnmarshalPublic(k.blobPub)
	if err != nil {
		return err
	}
	var h tpm2.TPMHandle
	if srk != nil { // created and checked (checkSRK, srkPin) by connect
		h, err = loadUnderSRKWith(k.c, *srk, k.blobPub, k.blobPriv, k.name)
	} else {
		h, err = loadUnderSRK(k.c, k.blobPub, k.blobPriv, k.name, k.srkPin)
	}
	if err != nil {
		return err
	}
	k.kek, k.kekTransient, k.kekPub = h, true, *pub
	return nil
}

// teardown flushes what this KEK created (best effort, bounded by cleanupTimeout and
// ctx) and closes the connection (on a shared line, the line's: the TPM's state is in
// doubt and the next user redials, which flushes whatever the flush here left).
func (k *KEK) teardown(ctx context.Context) error {
	c := k.c
	if c == nil {
		return nil
	}
	err := k.flushOwn(ctx)
	if k.line != nil {
		return errors.Join(err, k.line.drop())
	}
	err = errors.Join(err, c.Close())
	k.forget()
	return err
}

// forget drops the KEK's connection state without touching the TPM.
func (k *KEK) forget() {
	k.c, k.kek, k.kekTransient, k.sIn, k.sOut, k.sPol, k.needReset = nil, 0, false, nil, nil, nil, false
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
