package hsm

import (
	"fmt"

	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/miekg/pkcs11"
)

// opError carries a PKCS#11 function name and the pkcs11.Error it returned, until the
// caller adds the token name and the plugin sentinel.
type opError struct {
	op  string
	err error
}

func (e opError) Error() string { return e.op + ": " + e.err.Error() }
func (e opError) Unwrap() error { return e.err }

// rvClass groups CK_RVs by the recovery they call for (doc.go, "Recovery").
type rvClass int

const (
	// rvOther: not a recovery case; returned as is.
	rvOther rvClass = iota
	// rvSession: the session is unusable; drop it, open a fresh one, retry once.
	rvSession
	// rvObject: the cached key handle is stale; find the key again, retry once.
	rvObject
	// rvDevice: the module or token is gone; report kek.ErrUnavailable.
	rvDevice
)

func classify(err error) rvClass {
	switch {
	case err == nil:
		return rvOther
	case isRV(err, pkcs11.CKR_SESSION_HANDLE_INVALID, pkcs11.CKR_SESSION_CLOSED, pkcs11.CKR_OPERATION_ACTIVE):
		return rvSession
	case isRV(err, pkcs11.CKR_OBJECT_HANDLE_INVALID, pkcs11.CKR_KEY_HANDLE_INVALID):
		return rvObject
	case isRV(err, pkcs11.CKR_DEVICE_REMOVED, pkcs11.CKR_TOKEN_NOT_PRESENT, pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED,
		pkcs11.CKR_DEVICE_ERROR, pkcs11.CKR_DEVICE_MEMORY, pkcs11.CKR_TOKEN_NOT_RECOGNIZED,
		pkcs11.CKR_USER_NOT_LOGGED_IN, pkcs11.CKR_SESSION_COUNT):
		return rvDevice
	}
	return rvOther
}

// tokenError turns an opError into the error hsm returns: it names the function and the
// token, wraps kek.ErrUnavailable for recovery-class CK_RVs, and keeps the
// pkcs11.Error for errors.As.
func tokenError(t *token, oe opError) error {
	if classify(oe.err) != rvOther {
		return fmt.Errorf("hsm: %s on token %q: %w: %w", oe.op, t.label, kek.ErrUnavailable, oe.err)
	}
	return fmt.Errorf("hsm: %s on token %q: %w", oe.op, t.label, oe.err)
}

// asTokenError is tokenError for an error that is usually an opError; any other error
// is returned unchanged.
func asTokenError(t *token, err error) error {
	if oe, ok := err.(opError); ok {
		return tokenError(t, oe)
	}
	return err
}
