package hsm

import (
	"errors"
	"strings"

	"github.com/miekg/pkcs11"
)

// Errors that tell which stage of opening a token failed, for diagnostics (hwkms
// doctor). They are attached to the returned error without changing its message.
var (
	// ErrModule means the PKCS#11 module could not be loaded (dlopen,
	// C_GetFunctionList) or initialised (C_Initialize).
	ErrModule = errors.New("PKCS#11 module could not be loaded or initialised")
	// ErrPINSource means the configured PIN file or environment variable could not
	// be read or is empty. The token was not contacted.
	ErrPINSource = errors.New("PIN source unreadable")
)

// marked attaches a sentinel to err for errors.Is without changing err's message.
type marked struct {
	err  error
	mark error
}

func (m marked) Error() string   { return m.err.Error() }
func (m marked) Unwrap() []error { return []error{m.err, m.mark} }

func mark(err, sentinel error) error {
	if err == nil {
		return nil
	}
	return marked{err: err, mark: sentinel}
}

// Reason returns the name of the CK_RV carried by err, such as "CKR_DEVICE_REMOVED",
// or "other" when err carries no pkcs11.Error or one with a vendor-defined or unknown
// value. The result is one of a fixed set of names (the CK_RVs of PKCS#11 v2.40 known
// to github.com/miekg/pkcs11, plus "other"), so it is safe as a metric label.
func Reason(err error) string {
	var e pkcs11.Error
	if !errors.As(err, &e) {
		return "other"
	}
	// pkcs11.Error formats as "pkcs11: 0x<hex>: <CKR_NAME>", the name from a fixed table.
	s := e.Error()
	i := strings.LastIndex(s, ": ")
	if i < 0 {
		return "other"
	}
	name := s[i+2:]
	if !strings.HasPrefix(name, "CKR_") || strings.IndexFunc(name, func(r rune) bool {
		return !(r == '_' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9')
	}) >= 0 {
		return "other"
	}
	return name
}

// PoolStats is a snapshot of a KEK's session pool.
type PoolStats struct {
	// Size is the number of session slots (Config.Sessions).
	Size int
	// InUse is the number of slots held by operations right now.
	InUse int
}

// Reinits returns how many re-initialisations of the PKCS#11 module this KEK uses
// (C_Finalize, C_Initialize, every token logged in again, after a device-class error;
// doc.go, "Recovery") succeeded and failed since the module was loaded. The module is
// shared by every KEK on it, so they all report the same counts. It never touches the
// token and is safe to call at any time, also after Close.
func (k *KEK) Reinits() (ok, failed uint64) {
	m := k.tok.mod
	return m.reinitsOK.Load(), m.reinitsFailed.Load()
}

// Stats returns a snapshot of the KEK's session pool. It never touches the token and
// is safe to call at any time, also after Close.
func (k *KEK) Stats() PoolStats {
	size := cap(k.pool.slots)
	return PoolStats{Size: size, InUse: size - len(k.pool.slots)}
}
