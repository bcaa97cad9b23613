package tpm

import (
	"context"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
)

// flushOwn flushes the sessions and the transient KEK this KEK loaded, best effort
// and bounded by cleanupTimeout and by parent (a request's deadline: a flush that a
// busy TPM keeps answering with TPM_RC_RETRY must not hold the TPM, and the request,
// past it); the connection stays open.
func (k *KEK) flushOwn(parent context.Context) error {
	c := k.c
	if c == nil || c.dead {
		return nil
	}
	ctx, cancel := context.WithTimeout(parent, cleanupTimeout)
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

// flush flushes a transient handle or session now; on failure the connection is
// rebuilt after the current call so nothing stays loaded.
func (k *KEK) flush(h tpm2.TPMHandle) {
	if err := flushHandle(k.c, h); err != nil {
		k.needReset = true
	}
}

func flushHandle(c *conn, h tpm2.TPMHandle) error {
	if err := flushFast(c, h); err != nil {
		return fmt.Errorf("TPM2_FlushContext(0x%08x): %w", uint32(h), err)
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
